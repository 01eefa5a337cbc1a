"""Tuning on the validation split with the same number of trials for every method (`python -m red.sweep run
SPEC.yaml [--jobs 2] [key=value ...]`). Held-out problems are never evaluated here.

SPEC (YAML):

    seeds: [101, 102]                  # tuning seeds (the decisive comparison uses others)
    overrides: [train.steps=40]        # common to every trial (eval.split=validation is added)
    methods:                           # each: a mode of red/modes.py, fixed overrides, a grid
      grpo: {mode: grpo, grid: {optim.lr: [2.0e-4, 5.0e-4, 1.0e-3, 2.0e-3]}}
      red:  {mode: red, overrides: [], grid: {optim.lr: [5.0e-4, 1.0e-3], algorithm.teacher_only_groups: [keep, zero_online]}}

Every method's grid (the product of its value lists) must hold the same number of trials, else a ConfigError
names the counts. Each trial is one red.compare arm `METHOD__i` (all trials of a seed share one warm-up); the
trial with the best mean validation accuracy over the seeds is chosen (ties: the earlier trial). Writes
OUT/sweep.json, OUT/sweep.md and the trials' compare.{json,md,png}; sweep.json["arms"] is the chosen settings
as one `--arms` string for the decisive comparison (arm names = method names).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

from .compare import Arm, compare, parse_arm, parse_overrides
from .config import ConfigError, load_yaml, resolve_config_path
from .run_dir import json_ready, write_text


def trials(spec: dict) -> dict[str, list[Arm]]:
    """method -> its trial arms (grid order: the last key varies fastest)."""
    methods = spec.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError("sweep spec: 'methods' must map method names to {mode, grid}")
    out = {}
    for name, m in methods.items():
        if not isinstance(m, dict) or "mode" not in m:
            raise ConfigError(f"sweep spec: method {name!r} needs a 'mode'")
        grid = m.get("grid") or {}
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        fixed = [str(o) for o in m.get("overrides") or []]
        out[name] = [
            Arm(
                f"{name}__{i}",
                parse_arm(m["mode"]).mode,
                tuple(fixed + [f"{k}={_yaml(v)}" for k, v in zip(keys, point)]),
            )
            for i, point in enumerate(itertools.product(*values))
        ]
    counts = {n: len(a) for n, a in out.items()}
    if len(set(counts.values())) != 1:
        raise ConfigError(f"sweep spec: every method needs the same number of trials, got {counts}")
    return out


def _yaml(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def choose(res: dict, by_method: dict[str, list[Arm]]) -> dict:
    """Per method: every trial's mean validation accuracy and the chosen (best) trial."""
    out = {}
    for name, arms in by_method.items():
        rows = []
        for a in arms:
            d = res["arms"][a.name]
            rows.append(
                {
                    "arm": a.name,
                    "overrides": list(a.overrides),
                    "val_acc": d["heldout_acc"]["mean"],
                    "val_acc_per_seed": {str(r["seed"]): r["heldout_acc"] for r in d["runs"]},
                    "final_entropy_online": d["final_entropy_online"]["mean"],
                }
            )
        ok = [r for r in rows if isinstance(r["val_acc"], float) and not math.isnan(r["val_acc"])]
        best = max(ok, key=lambda r: r["val_acc"]) if ok else None  # max keeps the first of equal values
        spec = None
        if best:
            mode = arms[0].mode
            spec = ":".join([name if name == mode else f"{name}={mode}", *best["overrides"]])
        out[name] = {"mode": arms[0].mode, "trials": rows, "chosen": best, "arm": spec}
    return out


def run_sweep(
    spec_path: str, jobs: int, overrides: list[str], out_root: str | None, command: str, runner=None
) -> dict:
    spec = load_yaml(resolve_config_path(spec_path) if not os.path.isfile(spec_path) else spec_path)
    by_method = trials(spec)
    seeds = [int(s) for s in spec.get("seeds") or [0]]
    common = [str(o) for o in spec.get("overrides") or []] + overrides + ["eval.split=validation"]
    out_root = out_root or spec.get("output_dir") or "runs/sweep"
    arms = [a for group in by_method.values() for a in group]
    kw = {"runner": runner} if runner else {}
    res = compare(
        spec.get("config"), arms, seeds, arms[0].name, jobs, common, out_root, command=command, **kw
    )
    chosen = choose(res, by_method)
    result = {
        "spec": spec,
        "seeds": seeds,
        "trials_per_method": len(next(iter(by_method.values()))),
        "split": "validation",
        "common_overrides": common,
        "methods": chosen,
        "arms": ",".join(m["arm"] for m in chosen.values() if m["arm"]),
        "failed": res["failed"],
        "versions": res["versions"],
        "command": command,
    }
    write_text(
        os.path.join(out_root, "sweep.json"), json.dumps(json_ready(result), indent=2, allow_nan=False)
    )
    write_text(os.path.join(out_root, "sweep.md"), markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    def pct(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    lines = [
        "# red.sweep: tuning on the validation split",
        "",
        f"{r['trials_per_method']} trials per method, seeds {r['seeds']}; common overrides: "
        f"`{' '.join(r['common_overrides'])}`. Held-out problems are not evaluated.",
        "",
        "| method | trial | overrides | validation acc % (mean) | per seed | H_on end | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in r["methods"].items():
        for t in m["trials"]:
            per = ", ".join(pct(v) for v in t["val_acc_per_seed"].values())
            ent = t["final_entropy_online"]
            lines.append(
                f"| {name} | {t['arm']} | `{' '.join(t['overrides'])}` | {pct(t['val_acc'])} | {per} | "
                f"{'n/a' if ent is None or ent != ent else f'{ent:.2f}'} | "
                f"{'**yes**' if m['chosen'] and m['chosen']['arm'] == t['arm'] else ''} |"
            )
    lines += ["", f"Chosen arms (`--arms`): `{r['arms']}`", "", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


TOG = "algorithm.teacher_only_groups"


def decisive_arms(sweep: dict, ablate: tuple = ("luffy", "red")) -> str:
    """The decisive comparison's `--arms` from a sweep result: every method at its chosen (validation)
    settings, plus, for each method in `ablate`, the teacher_only_groups ablation — the same settings with the
    faithful `keep` (or `zero_online` when `keep` was chosen), named METHOD_ALT."""
    arms = [m["arm"] for m in sweep["methods"].values() if m["arm"]]
    for name in ablate:
        m = sweep["methods"].get(name)
        if not m or not m["chosen"]:
            continue
        over = m["chosen"]["overrides"]
        chosen = next((o.split("=", 1)[1] for o in over if o.startswith(TOG + "=")), "keep")
        alt = "zero_online" if chosen == "keep" else "keep"
        rest = [o for o in over if not o.startswith(TOG + "=")] + [f"{TOG}={alt}"]
        arms.append(":".join([f"{name}_{alt}={m['mode']}", *rest]))
    return ",".join(arms)


def main(argv=None) -> int:
    """`run SPEC.yaml [--jobs N] [key=value ...]`: the sweep; `arms SWEEP.json`: print its decisive --arms."""
    ap = argparse.ArgumentParser(prog="python -m red.sweep", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="tune every method on the validation split (writes OUT/sweep.{json,md})")
    run.add_argument("spec", help="a sweep spec (YAML), e.g. experiments/embedded/sweep.yaml")
    run.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    run.add_argument("overrides", nargs="*", help="key.sub=value for every trial (output_dir = sweep root)")
    arms = sub.add_parser("arms", help="print the decisive comparison's --arms from a sweep.json")
    arms.add_argument("sweep_json")
    a = ap.parse_args(argv)
    if a.cmd == "arms":
        with open(a.sweep_json, encoding="utf-8") as f:
            print(decisive_arms(json.load(f)))
        return 0
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    out_root, overrides = parse_overrides(a.overrides)
    cmd = "python -m red.sweep " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        run_sweep(a.spec, a.jobs, overrides, out_root if out_root != "runs/compare" else None, cmd)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
