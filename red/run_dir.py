"""Every output path of a run (`output_dir/...`) and the one atomic-write helper.

metrics.jsonl  samples.jsonl  warmup_metrics.jsonl  summary.json  dynamics.png  tb/
warmup/        (HF model after the warm-up stage)
step_N/        (checkpoint: HF model + tokenizer, trainer_state.pt, rng_rank{r}.pt)
latest         (name of the newest complete step_N, written last)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil

_STEP = re.compile(r"^step_(\d+)$")


def json_ready(x):
    """NaN -> null and ±inf -> "inf"/"-inf", recursively, so every JSON file a run or a comparison writes is
    strict JSON (jq, JavaScript), e.g. the mean length of correct answers when there are none."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def temporary(path: str) -> str:
    """The temporary sibling `path` is written through: `.tmp_<name>` (RunDir.clear removes leftovers)."""
    return os.path.join(os.path.dirname(path) or ".", f".tmp_{os.path.basename(path)}")


def commit(tmp: str, path: str) -> None:
    """Rename a finished temporary into place, replacing a previous file or directory `path`."""
    if os.path.isdir(tmp) and os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic(path: str):
    """Write `path` (a file or a directory) through its temporary sibling, committed on success. Yields the
    temporary path; a failure leaves any previous `path` untouched."""
    tmp = temporary(path)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    yield tmp
    commit(tmp, path)


def write_text(path: str, text: str) -> None:
    with atomic(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


class RunDir:
    NAMES = (
        "metrics.jsonl",
        "samples.jsonl",
        "warmup_metrics.jsonl",
        "summary.json",
        "dynamics.png",
        "latest",
        "warmup",
    )

    def __init__(self, root: str):
        self.root = root
        self.metrics = os.path.join(root, "metrics.jsonl")
        self.samples = os.path.join(root, "samples.jsonl")
        self.warmup_metrics = os.path.join(root, "warmup_metrics.jsonl")
        self.summary = os.path.join(root, "summary.json")
        self.plot = os.path.join(root, "dynamics.png")
        self.tensorboard = os.path.join(root, "tb")
        self.warmup = os.path.join(root, "warmup")
        self.latest_file = os.path.join(root, "latest")

    def step(self, n: int) -> str:
        return os.path.join(self.root, f"step_{n}")

    def steps(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.root):
            return []
        return sorted(
            (int(m.group(1)), os.path.join(self.root, d))
            for d in os.listdir(self.root)
            if (m := _STEP.match(d)) and os.path.isdir(os.path.join(self.root, d))
        )

    def latest_name(self) -> str | None:
        """The name the `latest` pointer holds (e.g. "step_20"; it may dangle), None without a pointer."""
        if not os.path.exists(self.latest_file):
            return None
        with open(self.latest_file) as fh:
            return fh.read().strip() or None

    def latest(self) -> str | None:
        """The checkpoint the `latest` pointer names (None if there is none or it is dangling)."""
        name = self.latest_name()
        d = os.path.join(self.root, name) if name else None
        return d if d and os.path.isfile(os.path.join(d, "trainer_state.pt")) else None

    @staticmethod
    def step_of(ckpt_dir: str) -> int:
        return int(_STEP.match(os.path.basename(ckpt_dir)).group(1))

    def clear(self) -> None:
        """Remove a previous run's checkpoints and logs (checkpoint.resume=never)."""
        if not os.path.isdir(self.root):
            return
        for name in os.listdir(self.root):
            p = os.path.join(self.root, name)
            if name in self.NAMES or _STEP.match(name) or name.startswith(".tmp_"):
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
