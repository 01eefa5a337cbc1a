"""Run observability: a JSONL metrics file (always), TensorBoard (optional, lazy import), sample completions, and
the per-step rollout statistics (sums per rank -> one reduction -> rates)."""

from __future__ import annotations

import json
import logging
import os

from . import parallel as D
from .run_dir import json_ready, write_text

log = logging.getLogger("red.metrics")


class MetricsFileError(ValueError):
    """A metrics file that cannot be continued; the message names the file, the line and the fix."""


def trim_for_resume(path: str, resume_step: int) -> None:
    """Keep the rows of `path` up to `resume_step` (rewritten atomically), each dropped part said in the log: a torn
    last line (a crash mid-write) is repaired, rows past the checkpoint (the interrupted run's) are dropped.
    A broken line before the last one is not a crash's trace: MetricsFileError."""
    with open(path, "rb") as fh:
        raw = fh.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    rows, keep = [], []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines) - 1:
                log.warning(
                    "%s: torn last line %d (%d bytes, a crash mid-write) removed", path, i + 1, len(ln)
                )
                continue
            raise MetricsFileError(
                f"{path}, line {i + 1}: expected one JSON object per line, got {ln[:60]!r}; delete or fix that "
                f"line (rows past step {resume_step} are dropped on resume anyway)"
            ) from None
        rows.append(row)
        if row.get("step", 0) <= resume_step:
            keep.append(json.dumps(row) + "\n")
    if len(keep) < len(rows):
        log.warning(
            "%s: %d row(s) after step %d (past the checkpoint resumed from) dropped",
            path,
            len(rows) - len(keep),
            resume_step,
        )
    if len(keep) < len(rows) or len(rows) < sum(1 for ln in lines if ln.strip()) or not raw.endswith(b"\n"):
        write_text(path, "".join(keep))


class MetricsLogger:
    """Rank 0 appends one JSON object per step to `path`; on resume rows after `resume_step` are dropped first
    (they belong to the interrupted run past its last checkpoint) and a torn last line is repaired."""

    def __init__(
        self,
        path: str,
        tensorboard_dir: str | None = None,
        resume_step: int | None = None,
        tracker=None,
    ):
        """tracker: an object with log(row) (red.tracking.WandbTracker) that gets every row too."""
        self.path = path
        self.tb = None
        self.tracker = tracker
        if not D.is_main():
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            trim_for_resume(path, resume_step)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "log.tensorboard=true needs the `tensorboard` package (pip install tensorboard)"
                ) from e
            self.tb = SummaryWriter(tensorboard_dir)

    def log(self, row: dict) -> None:
        if not D.is_main():
            return
        row = json_ready(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker.log(row)
        if self.tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(ln) for ln in open(path) if ln.strip()]


def write_samples(path: str, step: int, samples: list[dict]) -> None:
    if not D.is_main() or not samples:
        return
    with open(path, "a") as fh:
        for s in samples:
            fh.write(json.dumps({"step": step, **s}) + "\n")


def batch_sums(b, ds: dict) -> tuple[dict, dict]:
    """This rank's sums (and maxima) of the rollout statistics of every drawn group, for one reduction."""
    from .records import STATUSES

    on, off = ~b.is_offline, b.is_offline
    cor, L, R = b.correct, b.response_len.double(), b.reward.double()
    sets = {"on": on, "off": off, "cor": on & cor, "wrong": on & ~cor}
    sums = {
        "groups": b.G,
        **{
            k: ds[k]
            for k in ("draws", "dropped_all_correct", "dropped_all_wrong", "dropped_teacher_only", "short")
        },
    }
    for name, s in sets.items():
        sums.update(
            {
                f"n_{name}": s.sum(),
                f"len_{name}": L[s].sum(),
                f"reward_{name}": R[s].sum(),
                f"correct_{name}": (s & cor).sum(),
                f"trunc_{name}": (s & b.truncated).sum(),
            }
        )
    for code, st in enumerate(STATUSES):
        sums[f"status_online/{st}"] = (on & (b.status == code)).sum()
        sums[f"status_offline/{st}"] = (off & (b.status == code)).sum()
    return sums, {"len_online_max": int(L[on].max()) if bool(on.any()) else None}


RATES = {
    "reward_mean": ("reward_all", "n_all"),
    "reward_online": ("reward_on", "n_on"),
    "reward_offline": ("reward_off", "n_off"),
    "acc_online": ("correct_on", "n_on"),
    "acc_offline": ("correct_off", "n_off"),
    "len_online_mean": ("len_on", "n_on"),
    "len_offline_mean": ("len_off", "n_off"),
    "len_correct_mean": ("len_cor", "n_cor"),
    "len_wrong_mean": ("len_wrong", "n_wrong"),
    "truncated_frac": ("trunc_on", "n_on"),
    "truncated_frac_correct": ("trunc_cor", "n_cor"),
    "truncated_frac_wrong": ("trunc_wrong", "n_wrong"),
    "drop_frac_all_correct": ("dropped_all_correct", "groups"),
    "drop_frac_all_wrong": ("dropped_all_wrong", "groups"),
    "drop_frac_teacher_only": ("dropped_teacher_only", "groups"),
}


def finish_rollout_metrics(s: dict, mx: dict, tr) -> dict:
    """Metric rows from reduced `batch_sums` (rates over every drawn group, before dynamic sampling)."""
    s = dict(s, reward_all=s["reward_on"] + s["reward_off"], n_all=s["n_on"] + s["n_off"])
    out = {name: s[a] / s[b] if s[b] else None for name, (a, b) in RATES.items()}
    out.update(
        len_online_max=mx["len_online_max"] or 0,
        groups_drawn=s["groups"],
        groups_short=s["short"],
        draws=int(s["draws"] / D.world_size()),
    )
    out.update({k: v for k, v in s.items() if k.startswith("status_")})
    n_parts = s.get("reward_part_n") or 0
    out.update(
        {"reward/" + k.split("/", 1)[1]: v / n_parts for k, v in s.items() if k.startswith("reward_part/")}
    )
    tf, cfg = out["truncated_frac"], tr.cfg
    if tf is not None and tf > cfg.log.truncation_warn and D.is_main():
        log.warning(
            "step %d: %.0f%% of online samples hit rollout.max_new_tokens=%d (their reward is usually 0)",
            tr.step + 1,
            100 * tf,
            cfg.rollout.max_new_tokens,
        )
    return out
