"""`python -m red.compare`: every mode at the same budget, several seeds, one table.

    python -m red.compare [--config FILE] [--modes sft,sft_then_grpo,grpo,luffy,red] [--seeds 3]
                          [--baseline grpo] [--jobs 1] [key.sub=value ...]

Each (mode, seed) is one `python -m red.train [--config FILE] key=value ... algorithm.mode=M seed=S
output_dir=OUT/M/seed_S` subprocess, with the same overrides for every mode: the budget (train.steps ×
train.prompts_per_step × rollout.n) is the same, and SFT steps count against it (sft_then_grpo spends part of
train.steps on SFT). OUT is the `output_dir` override (default runs/compare). A run whose summary.json holds a
final evaluation is finished and skipped on a re-run (resume); an unfinished one resumes from its checkpoint.

Writes OUT/compare.json (schema below), OUT/compare.md (the table) and OUT/compare.png (held-out accuracy over
steps per mode, mean with a min-max band over seeds; response length; H_on / H_off). compare.json:
{"budget", "versions", "modes": {M: {"runs": [{seed, heldout_acc, len_mean, len_correct_mean, len_wrong_mean,
wall_s, output_dir, heldout_acc_per_source}], "heldout_acc": {mean, ci95, n}, "len_mean": {mean, ci95, n}}},
"paired_vs_baseline": {M: {diff_mean, ci95, n}}} — Student-t 95% intervals over seeds, differences paired by seed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

from .config import ConfigError, load_config
from .run_dir import json_ready, write_text
from .stats import mean_ci95, paired_diff

MODES = ("sft", "sft_then_grpo", "grpo", "luffy", "red")
RESERVED = ("algorithm.mode", "seed")  # set per run by the harness


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


def run_record(seed: int, out: str, summary: dict) -> dict:
    ev = summary["eval_after"]
    allp = ev["per_source"]["all"]
    n = ev.get("n", 1)
    return {
        "seed": seed,
        "heldout_acc": ev["accuracy"],
        "len_mean": allp.get("mean_length"),
        "len_correct_mean": allp.get("mean_length_correct"),
        "len_wrong_mean": allp.get("mean_length_wrong"),
        "wall_s": summary.get("wall_time_s"),
        "output_dir": out,
        "heldout_acc_per_source": {k: v.get(f"avg@{n}") for k, v in ev["per_source"].items() if k != "all"},
    }


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


def check_configs(config: str | None, overrides: list[str], modes: list[str]) -> None:
    """Every mode's run configuration, loaded and checked by the training schema now (ConfigError naming the
    key), not in each of the runs after the first ones have spent their budget."""
    for m in modes:
        load_config(config, overrides + [f"algorithm.mode={m}"])


def budget_of(config: str | None, overrides: list[str], sft_steps: dict) -> dict:
    """The shared budget, from the training schema's values of the config + overrides (what every run reads;
    the same for every mode of `sft_steps`, the mode -> SFT steps taken)."""
    c = load_config(config, overrides + [f"algorithm.mode={next(iter(sft_steps))}"])
    steps, prompts, n = c.train.steps, c.train.prompts_per_step, c.rollout.n
    return {
        "train_steps": steps,
        "prompts_per_step": prompts,
        "group_size": n,
        "samples": steps * prompts * n,
        "max_new_tokens": c.rollout.max_new_tokens,
        "config": str(config or "default.yaml"),
        "overrides": overrides,
        "sft_steps": sft_steps,
    }


def compare(
    config, modes, seeds, baseline, jobs, overrides, out_root, runner=subprocess_runner, command: str = ""
) -> dict:
    """Run what is missing, then aggregate. `runner(argv, out) -> exit code` (injectable for tests). Raises
    ConfigError, before any run, when a mode's configuration is invalid."""
    check_configs(config, overrides, modes)
    todo = [(m, s) for m in modes for s in range(seeds)]
    dirs = {(m, s): os.path.join(out_root, m, f"seed_{s}") for m, s in todo}
    for m, s in todo:
        check_same_run(dirs[(m, s)], train_argv(config, overrides, m, s, dirs[(m, s)])[1:])
    pending = [k for k in todo if read_summary(dirs[k]) is None]
    skipped = len(todo) - len(pending)
    print(
        f"[compare] {len(todo)} runs ({len(modes)} modes x {seeds} seeds) under {out_root}: "
        f"{skipped} finished, {len(pending)} to run",
        flush=True,
    )

    def one(key):
        m, s = key
        t = time.perf_counter()
        rc = runner(train_argv(config, overrides, m, s, dirs[key]), dirs[key])
        print(
            f"[compare] {m} seed {s}: exit {rc} in {time.perf_counter() - t:.0f}s ({dirs[key]})", flush=True
        )
        return rc

    with cf.ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        codes = dict(zip(pending, pool.map(one, pending)))
    failed = [k for k, rc in codes.items() if rc != 0 or read_summary(dirs[k]) is None]
    result = {
        "budget": None,
        "versions": versions(),
        "modes": {},
        "paired_vs_baseline": {},
        "failed": [{"mode": m, "seed": s, "output_dir": dirs[(m, s)]} for m, s in failed],
    }
    sft_steps = {}
    for m in modes:
        runs = [run_record(s, dirs[(m, s)], sm) for s in range(seeds) if (sm := read_summary(dirs[(m, s)]))]
        sft_steps[m] = sorted(
            {
                sum(1 for r in read_metrics(dirs[(m, s)]) if r.get("mode") == "sft")
                for s in range(seeds)
                if read_summary(dirs[(m, s)])
            }
        )
        result["modes"][m] = {
            "runs": runs,
            "heldout_acc": mean_ci95([r["heldout_acc"] for r in runs]),
            "len_mean": mean_ci95([r["len_mean"] for r in runs]),
        }
    result["budget"] = budget_of(config, overrides, sft_steps)
    base = {r["seed"]: r["heldout_acc"] for r in result["modes"].get(baseline, {}).get("runs", [])}
    for m in modes:
        if m != baseline:
            mine = {r["seed"]: r["heldout_acc"] for r in result["modes"][m]["runs"]}
            result["paired_vs_baseline"][m] = paired_diff(mine, base)
    result["baseline"] = baseline
    os.makedirs(out_root, exist_ok=True)
    write_text(
        os.path.join(out_root, "compare.json"), json.dumps(json_ready(result), indent=2, allow_nan=False)
    )
    from .compare_report import write_markdown, write_plot

    write_markdown(result, os.path.join(out_root, "compare.md"), command)
    write_plot(
        {m: [read_metrics(dirs[(m, s)]) for s in range(seeds)] for m in modes},
        os.path.join(out_root, "compare.png"),
    )
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m red.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config", default=None, help="YAML file or packaged config name (default: default.yaml)"
    )
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per mode")
    ap.add_argument("--baseline", default="grpo", help="mode the paired differences are taken against")
    ap.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    ap.add_argument(
        "overrides", nargs="*", help="key.sub=value, passed to every run (output_dir = compare root)"
    )
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown mode(s) {bad} (known: {', '.join(MODES)})")
    if a.baseline not in modes:
        ap.error(f"--baseline {a.baseline!r} must be one of --modes ({', '.join(modes)})")
    if a.seeds < 1 or a.jobs < 1:
        ap.error("--seeds and --jobs must be >= 1")
    out_root, overrides = parse_overrides(a.overrides)
    try:
        res = compare(
            a.config,
            modes,
            a.seeds,
            a.baseline,
            a.jobs,
            overrides,
            out_root,
            command="python -m red.compare " + " ".join(sys.argv[1:] if argv is None else argv),
        )
    except ConfigError as e:  # a bad --config or key: before any run
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(open(os.path.join(out_root, "compare.md")).read())
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
