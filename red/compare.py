"""`python -m red.compare`: named arms (a mode plus overrides) at the same budget, several seeds, one table.

    python -m red.compare [--config FILE] [--arms ARMS | --modes M1,M2] [--seeds 3 | --seeds 11,12,13]
                          [--baseline grpo] [--jobs 1] [key.sub=value ...]
    python -m red.sweep run SPEC.yaml [--jobs 2] [output_dir=...]        # tuning on validation, red/sweep.py

ARMS: comma-separated arms, each `NAME=MODE:key=value:key=value` or just `MODE` (the arm is named after its
mode), e.g. `--arms grpo,red,red_phi_p=red:loss.offline_shaping=none,luffy_zero=luffy:algorithm.teacher_only_groups=zero_online`.
A `:` inside a value is kept when the next piece holds no `=` (`data.train=synthetic:chains` works), a `,` when
the next piece does not look like an arm head (`optim.betas=[0.9,0.99]` works); `--arm SPEC` (repeatable) takes
one arm, any commas included. Modes are the ones of
red/modes.py. --seeds N means seeds 0..N-1; a list (`11,12,13`, or `7,` for the single seed 7) is taken as is.

Each (arm, seed) is one `python -m red.train [--config FILE] key=value ... ARM-OVERRIDES algorithm.mode=M
seed=S output_dir=OUT/ARM/seed_S` subprocess: the common overrides (the budget: train.steps x
train.prompts_per_step x rollout.n; SFT steps count against it) for every arm, then the arm's own. When the
config has a warm-up (warmup.enabled), it is computed ONCE per seed (`red.train --warmup-only`, OUT/warmup/seed_S,
which also evaluates that base model once) and every arm of that seed starts from it (`warmup.path`, and
`eval.before=false`); an arm overriding warmup.* / model.* / data.* / threads / device gets its own warm-up. OUT is
the `output_dir` override (default runs/compare). A finished run (summary.json with a final evaluation) is
skipped on a re-run; an unfinished one resumes from its checkpoint.

Writes OUT/compare.json, OUT/compare.md (the tables) and OUT/compare.png (eval accuracy over steps per arm, mean
with a min-max band over seeds; response length; H_on / H_off). compare.json:
{"budget", "versions", "seeds", "split", "baseline", "base": {seed: {accuracy, per_source}},
 "arms": {A: {"mode", "overrides", "runs": [{seed, heldout_acc, heldout_acc_per_source, len_mean,
  len_correct_mean, len_wrong_mean, wall_s, output_dir, final_entropy_online, entropy_limit,
  teacher_only_share}], "heldout_acc": {mean, ci95, n}, "len_mean": {..}, "final_entropy_online": {..}}},
 "paired_vs_baseline": {A: {diff_mean, ci95, n}}, "paired": {A: {B: {diff_mean, ci95, n}}}, "failed": [...]}
Student-t 95% intervals over seeds; differences paired by seed. `heldout_acc` is the accuracy on the evaluated
split (eval.split: held-out unless a sweep evaluates on validation). final_entropy_online: mean H_on (nats) over
the last FINAL_STEPS RL steps that logged it; entropy_limit = 0.8 ln V (V: the model's vocabulary), the level
above which a run counts as collapsed towards uniform; teacher_only_share: mean share of kept groups that were
teacher-only over the RL steps.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .algorithm import group_share_key
from .config import ConfigError, load_config
from .modes import MODES
from .run_dir import json_ready, write_text
from .stats import mean_ci95, paired_diff

RESERVED = ("algorithm.mode", "seed")  # set per run by the harness
WARMUP_KEYS = ("warmup.", "model.", "data.", "threads", "device")  # overrides that change the warm-up
FINAL_STEPS = 5  # final_entropy_online averages H_on over the last FINAL_STEPS RL steps


@dataclass(frozen=True)
class Arm:
    """A named comparison arm: a mode of red/modes.py plus overrides applied after the common ones."""

    name: str
    mode: str
    overrides: tuple = field(default_factory=tuple)

    def spec(self) -> str:
        return ":".join(
            [self.name if self.name == self.mode else f"{self.name}={self.mode}", *self.overrides]
        )


_ARM_HEAD = re.compile(r"^([A-Za-z_][\w.-]*)(?:=([A-Za-z_]\w*))?$")


def _join_pieces(pieces: list[str]) -> list[str]:
    """Pieces split on a separator, a piece without '=' glued back to the previous one (it was a value)."""
    out: list[str] = []
    for p in pieces:
        if out and "=" not in p:
            out[-1] += p
        else:
            out.append(p)
    return out


def parse_arm(text: str) -> Arm:
    """`NAME=MODE:key=value:...` or `MODE[:key=value...]` -> Arm (SystemExit naming the problem)."""
    head, *rest = text.strip().split(":")
    m = _ARM_HEAD.match(head.strip())
    if not m:
        raise SystemExit(f"error: arm {text!r}: expected NAME=MODE[:key=value...] or MODE[:key=value...]")
    name, mode = m.group(1), m.group(2) or m.group(1)
    if mode not in MODES:
        raise SystemExit(f"error: arm {name!r}: unknown mode {mode!r} (known: {', '.join(MODES)})")
    overrides = []
    for piece in _join_pieces([":" + p for p in rest]):
        piece = piece[1:]
        if "=" not in piece:
            raise SystemExit(f"error: arm {name!r}: override {piece!r} is not key=value")
        key = piece.split("=", 1)[0].strip()
        if key in RESERVED or key == "output_dir":
            raise SystemExit(f"error: arm {name!r}: {key!r} is set by the harness per run")
        overrides.append(piece)
    return Arm(name, mode, tuple(overrides))


def parse_arms(text: str) -> list[Arm]:
    """Comma-separated arms; a comma piece that does not start like an arm (`NAME=MODE` or `MODE` before its
    first `:`) continues the previous arm's last value (`optim.betas=[0.9,0.99]`). Arm names must be unique."""
    pieces: list[str] = []
    for p in text.split(","):
        head = p.split(":", 1)[0].strip()
        m = _ARM_HEAD.match(head)
        starts = bool(m)
        if pieces and not starts:
            pieces[-1] += "," + p
        elif p.strip():
            pieces.append(p)
    arms = [parse_arm(p) for p in pieces]
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"error: --arms: arm name(s) {dup} used twice (name them: NAME=MODE:...)")
    return arms


def parse_seeds(text: str) -> list[int]:
    """`3` -> [0, 1, 2]; `11,12,13` -> [11, 12, 13]; `7,` -> [7]."""
    try:
        if "," in text:
            seeds = [int(x) for x in text.split(",") if x.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise SystemExit(
            f"error: --seeds {text!r}: a count (3) or a comma-separated list (11,12,13)"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"error: --seeds {text!r}: needs >= 1 distinct non-negative seed(s)")
    return seeds


def as_arms(arms) -> list[Arm]:
    return [a if isinstance(a, Arm) else parse_arm(a) for a in arms]


def parse_overrides(items: list[str]) -> tuple[str, list[str]]:
    """(compare output root, overrides passed to every run). Rejects keys the harness sets itself."""
    out, rest = "runs/compare", []
    for it in items:
        if "=" not in it:
            raise SystemExit(f"error: override {it!r}: expected key=value (e.g. train.steps=10)")
        key, val = it.split("=", 1)
        key = key.strip().lstrip("-")
        if key == "output_dir":
            out = val
        elif key in RESERVED:
            raise SystemExit(f"error: override {key!r} is set per run; use --modes / --seeds instead")
        else:
            rest.append(f"{key}={val}")
    return out, rest


def train_argv(config: str | None, overrides: list[str], mode: str, seed: int, out: str) -> list[str]:
    return (
        [sys.executable, "-m", "red.train"]
        + (["--config", config] if config else [])
        + overrides
        + [f"algorithm.mode={mode}", f"seed={seed}", f"output_dir={out}"]
    )


def subprocess_runner(argv: list[str], out: str) -> int:
    """Run one training subprocess, its stdout/stderr appended to OUT/train.log; returns the exit code."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.log"), "a") as log:
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode


def check_same_run(out: str, argv: list[str]) -> None:
    """A run directory belongs to one command line (recorded in OUT/compare_run.json): resuming or skipping it
    with other settings would mix budgets, so that is an error naming the directory."""
    path = os.path.join(out, "compare_run.json")
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)["argv"]
        if old != argv:
            raise SystemExit(
                f"error: {out} was run with other settings ({' '.join(old[2:])}); use another "
                f"output_dir or delete that directory"
            )
        return
    os.makedirs(out, exist_ok=True)
    write_text(path, json.dumps({"argv": argv}))


def read_summary(out: str) -> dict | None:
    """summary.json of a finished run (one with a final evaluation), else None."""
    try:
        with open(os.path.join(out, "summary.json")) as fh:
            s = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return s if s.get("eval_after") else None


def read_metrics(out: str) -> list[dict]:
    rows = []
    try:
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill
    except OSError:
        pass
    return rows


def versions() -> dict:
    """Package versions (as red.train records them) plus the git commit of this checkout and whether it is dirty."""
    from .eval import package_versions

    out = package_versions()
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out["git_commit"] = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        out["git_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def check_configs(config: str | None, overrides: list[str], arms: list[Arm]) -> None:
    """Every arm's run configuration, loaded and checked by the training schema now (ConfigError naming the
    key), not in each of the runs after the first ones have spent their budget."""
    for a in arms:
        try:
            load_config(config, overrides + list(a.overrides) + [f"algorithm.mode={a.mode}"])
        except ConfigError as e:
            raise ConfigError(f"arm {a.name!r}: {e}") from None


def budget_of(config: str | None, overrides: list[str], arms: list[Arm], sft_steps: dict) -> dict:
    """The shared budget, from the training schema's values of the config + common overrides (what every run
    reads unless its arm overrides it; arms' own overrides are listed per arm)."""
    c = load_config(config, overrides + [f"algorithm.mode={arms[0].mode}"])
    steps, prompts, n = c.train.steps, c.train.prompts_per_step, c.rollout.n
    return {
        "train_steps": steps,
        "prompts_per_step": prompts,
        "group_size": n,
        "samples": steps * prompts * n,
        "max_new_tokens": c.rollout.max_new_tokens,
        "eval_split": c.eval.split,
        "config": str(config or "default.yaml"),
        "overrides": overrides,
        "sft_steps": sft_steps,
    }


def warmup_group(config, overrides: list[str], arm: Arm) -> str | None:
    """Name of the shared warm-up an arm starts from (None: the config has no warm-up): 'shared', or a hash of
    the arm's warm-up-changing overrides."""
    if not load_config(
        config, overrides + list(arm.overrides) + [f"algorithm.mode={arm.mode}"]
    ).warmup.enabled:
        return None
    own = sorted(o for o in arm.overrides if o.split("=", 1)[0].strip().startswith(WARMUP_KEYS))
    return "shared" if not own else "own-" + hashlib.sha1("\n".join(own).encode()).hexdigest()[:8]


def final_entropy(rows: list[dict]) -> float | None:
    """Mean H_on over the last FINAL_STEPS RL steps that logged a finite H_on (None: none did)."""
    vals = [r["H_on"] for r in rows if isinstance(r.get("H_on"), (int, float)) and math.isfinite(r["H_on"])]
    return sum(vals[-FINAL_STEPS:]) / len(vals[-FINAL_STEPS:]) if vals else None


def vocab_size(out: str) -> int | None:
    """The vocabulary of a run's newest checkpoint (its config.json), None when there is none."""
    try:
        latest = open(os.path.join(out, "latest")).read().strip()
        with open(os.path.join(out, latest, "config.json")) as fh:
            return int(json.load(fh)["vocab_size"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def run_record(seed: int, out: str, summary: dict) -> dict:
    ev = summary["eval_after"]
    allp = ev["per_source"]["all"]
    n = ev.get("n", 1)
    rows = read_metrics(out)
    shares = [r[k] for r in rows if isinstance(r.get(k := group_share_key("teacher_only")), (int, float))]
    v = vocab_size(out)
    return {
        "seed": seed,
        "heldout_acc": ev["accuracy"],
        "len_mean": allp.get("mean_length"),
        "len_correct_mean": allp.get("mean_length_correct"),
        "len_wrong_mean": allp.get("mean_length_wrong"),
        "wall_s": summary.get("wall_time_s"),
        "output_dir": out,
        "heldout_acc_per_source": {k: v.get(f"avg@{n}") for k, v in ev["per_source"].items() if k != "all"},
        "final_entropy_online": final_entropy(rows),
        "entropy_limit": 0.8 * math.log(v) if v else None,
        "teacher_only_share": sum(shares) / len(shares) if shares else None,
    }


def compare(
    config,
    arms,
    seeds,
    baseline,
    jobs,
    overrides,
    out_root,
    runner=subprocess_runner,
    command: str = "",
) -> dict:
    """Run what is missing, then aggregate. `arms`: Arm objects or specs (a mode name is an arm); `seeds`: a
    list, or a count N (0..N-1). `runner(argv, out) -> exit code` (injectable for tests). Raises ConfigError,
    before any run, when an arm's configuration is invalid."""
    arms = as_arms(arms)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    check_configs(config, overrides, arms)
    groups = {a.name: warmup_group(config, overrides, a) for a in arms}
    warm = {}  # (group, seed) -> (argv, out, arm used to build it)
    for a in arms:
        for s in seeds:
            g = groups[a.name]
            if g is not None and (g, s) not in warm:
                out = os.path.join(out_root, "warmup", g, f"seed_{s}")
                own = [o for o in a.overrides if o.split("=", 1)[0].strip().startswith(WARMUP_KEYS)]
                argv = train_argv(config, overrides + own, "sft", s, out)  # sft: no mode-specific checks
                warm[(g, s)] = (argv[:3] + ["--warmup-only"] + argv[3:] + [f"warmup.path={out}/warmup"], out)
    todo = [(a, s) for a in arms for s in seeds]
    dirs = {(a.name, s): os.path.join(out_root, a.name, f"seed_{s}") for a, s in todo}

    def argv_of(a, s):
        extra = []
        if groups[a.name] is not None:
            extra = [f"warmup.path={warm[(groups[a.name], s)][1]}/warmup", "eval.before=false"]
        return train_argv(config, overrides + list(a.overrides) + extra, a.mode, s, dirs[(a.name, s)])

    for a, s in todo:
        check_same_run(dirs[(a.name, s)], argv_of(a, s)[1:])
    for argv, out in warm.values():
        check_same_run(out, argv[1:])
    pending = [k for k in todo if read_summary(dirs[(k[0].name, k[1])]) is None]
    warm_pending = [k for k, (_, out) in warm.items() if not _warm_done(out)]
    print(
        f"[compare] {len(todo)} runs ({len(arms)} arms x {len(seeds)} seeds) under {out_root}: "
        f"{len(todo) - len(pending)} finished, {len(pending)} to run; {len(warm)} warm-ups "
        f"({len(warm_pending)} to run)",
        flush=True,
    )

    def timed(label, argv, out):
        t = time.perf_counter()
        rc = runner(argv, out)
        print(f"[compare] {label}: exit {rc} in {time.perf_counter() - t:.0f}s ({out})", flush=True)
        return rc

    with cf.ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        wcodes = dict(
            zip(
                warm_pending,
                pool.map(lambda k: timed(f"warm-up {k[0]} seed {k[1]}", *warm[k]), warm_pending),
            )
        )
        bad_warm = {k for k, rc in wcodes.items() if rc != 0 or not _warm_done(warm[k][1])}
        runnable = [(a, s) for a, s in pending if (groups[a.name], s) not in bad_warm]
        list(
            pool.map(
                lambda k: timed(f"{k[0].name} seed {k[1]}", argv_of(*k), dirs[(k[0].name, k[1])]), runnable
            )
        )
    failed = [(a, s) for a, s in todo if read_summary(dirs[(a.name, s)]) is None]
    result = {
        "budget": None,
        "versions": versions(),
        "seeds": seeds,
        "base": {},
        "arms": {},
        "paired_vs_baseline": {},
        "paired": {},
        "failed": [
            {"arm": a.name, "mode": a.mode, "seed": s, "output_dir": dirs[(a.name, s)]} for a, s in failed
        ],
    }
    for (g, s), (_, out) in warm.items():
        sm = _read_json(os.path.join(out, "summary.json")) or {}
        ev = sm.get("eval_before")
        if ev and g == "shared":
            result["base"][str(s)] = {
                "accuracy": ev["accuracy"],
                "per_source": {k: v.get(f"avg@{ev.get('n', 1)}") for k, v in ev["per_source"].items()},
            }
    sft_steps = {}
    for a in arms:
        done = [(s, sm) for s in seeds if (sm := read_summary(dirs[(a.name, s)]))]
        runs = [run_record(s, dirs[(a.name, s)], sm) for s, sm in done]
        sft_steps[a.name] = sorted(
            {sum(1 for r in read_metrics(dirs[(a.name, s)]) if r.get("mode") == "sft") for s, _ in done}
        )
        result["arms"][a.name] = {
            "mode": a.mode,
            "overrides": list(a.overrides),
            "runs": runs,
            "heldout_acc": mean_ci95([r["heldout_acc"] for r in runs]),
            "len_mean": mean_ci95([r["len_mean"] for r in runs]),
            "final_entropy_online": mean_ci95([r["final_entropy_online"] for r in runs]),
        }
    result["budget"] = budget_of(config, overrides, arms, sft_steps)
    result["split"] = result["budget"]["eval_split"]
    acc = {n: {r["seed"]: r["heldout_acc"] for r in d["runs"]} for n, d in result["arms"].items()}
    for a in arms:
        if a.name != baseline:
            result["paired_vs_baseline"][a.name] = paired_diff(acc[a.name], acc.get(baseline, {}))
        result["paired"][a.name] = {b.name: paired_diff(acc[a.name], acc[b.name]) for b in arms if b != a}
    result["baseline"] = baseline
    os.makedirs(out_root, exist_ok=True)
    write_text(
        os.path.join(out_root, "compare.json"), json.dumps(json_ready(result), indent=2, allow_nan=False)
    )
    from .compare_report import write_markdown, write_plot

    write_markdown(result, os.path.join(out_root, "compare.md"), command)
    write_plot(
        {a.name: [read_metrics(dirs[(a.name, s)]) for s in seeds] for a in arms},
        os.path.join(out_root, "compare.png"),
    )
    return result


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def _warm_done(out: str) -> bool:
    """A finished shared warm-up: its model saved and its base evaluation written."""
    return os.path.isfile(os.path.join(out, "warmup", "config.json")) and bool(
        (_read_json(os.path.join(out, "summary.json")) or {}).get("warmup_only")
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m red.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2].split("\n\nWrites")[0],
    )
    ap.add_argument(
        "--config", default=None, help="YAML file or packaged config name (default: default.yaml)"
    )
    ap.add_argument("--arms", default=None, help="comma-separated arms NAME=MODE:key=value:... or MODE")
    ap.add_argument("--arm", action="append", default=[], help="one arm (repeatable), as in --arms")
    ap.add_argument("--modes", default=None, help="comma-separated modes, one arm each (default: every mode)")
    ap.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a list 11,12,13 (default 3)")
    ap.add_argument("--baseline", default="grpo", help="arm the paired differences are taken against")
    ap.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    ap.add_argument(
        "overrides", nargs="*", help="key.sub=value, passed to every run (output_dir = compare root)"
    )
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    out_root, overrides = parse_overrides(a.overrides)
    cmd = "python -m red.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if a.modes and (a.arms or a.arm):
            ap.error("--modes and --arms/--arm: give one of them")
        if a.modes:
            bad = [m for m in a.modes.split(",") if m.strip() and m.strip() not in MODES]
            if bad:
                ap.error(f"--modes: unknown mode(s) {bad} (known: {', '.join(MODES)})")
        arms = (
            parse_arms(a.modes or ",".join(MODES))
            if not (a.arms or a.arm)
            else parse_arms(a.arms or "") + [parse_arm(x) for x in a.arm]
        )
        seeds = parse_seeds(a.seeds)
    except SystemExit as e:
        if isinstance(e.code, str):
            ap.error(e.code.removeprefix("error: "))
        raise
    if not arms:
        ap.error("--arms: no arm given")
    if a.baseline not in [x.name for x in arms]:
        ap.error(f"--baseline {a.baseline!r} must be one of the arms ({', '.join(x.name for x in arms)})")
    try:
        res = compare(a.config, arms, seeds, a.baseline, a.jobs, overrides, out_root, command=cmd)
    except ConfigError as e:  # a bad --config or key: before any run
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(open(os.path.join(out_root, "compare.md")).read())
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
