"""A config's real training step, before and after: the same command at two commits of this repository.

    python -m bench.config_step --before 154bdbc                 # smollm2 config, 4 steps each (~10 min, idle)
    python -m bench.config_step --before 154bdbc --record        # + bench/results/config-step-<config>.json/.md

For each commit (`--before`, and the working tree), in a fresh process with that commit's code (a detached git
worktree for the old one, run in that folder, with a link to this checkout's runs/; the script checks that `red`
imports from there) and that commit's own copy of `--config`:

    python -m red.train --config CONFIG output_dir=TMP train.steps=N eval.before=false data.eval_limit=1 ...

then reads the run's metrics.jsonl: time_step and its phases (rollout, reward, old-policy pass, update) per step,
the first step excluded (it pays for warm-up: allocator growth, first engine calls), medians over the rest; and
the process's peak RSS (os.wait4). The model, data and engine are the config's (smollm2: SmolLM2-135M-Instruct,
vLLM rollouts; run `python experiments/smollm2/prepare.py` first). Both commits run in this repository's venv,
one after the other, with the load average recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("time_step", "time_rollout", "time_reward", "time_old_pass", "time_update")


def commit_of(rev: str) -> str:
    out = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_at(code: Path, config: str, steps: int, out: Path, threads: int) -> dict:
    """One run of `config` with the code in `code`; its per-phase medians and peak RSS."""
    cmd = [sys.executable, "-m", "red.train", "--config", str(code / "red" / "configs" / config)]
    cmd += [
        f"output_dir={out / 'run'}",
        f"train.steps={steps}",
        f"threads={threads}",
        "eval.before=false",
        "data.eval_limit=1",
        "log.plot=false",
        "log.progress=false",
        "checkpoint.resume=never",
    ]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads)}
    if code != REPO and not (code / "runs").exists():  # the config's relative paths (runs/...) resolve there
        (code / "runs").symlink_to(REPO / "runs")
    # `python -m` puts the working directory first on sys.path: run in `code`, and check which code imports
    where = subprocess.run(
        [sys.executable, "-c", "import red; print(red.__file__)"],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(code.resolve()):
        raise RuntimeError(f"the run in {code} would import red from {where}")
    with open(out / "stdout", "w") as so, open(out / "stderr", "w") as se:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(out / 'stderr').read_text()[-3000:]}")
    rows = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps_ = [r for r in rows if "time_step" in r][1:]
    res = {p: statistics.median(r.get(p) or 0.0 for r in steps_) for p in PHASES}
    res["time_step_each"] = [round(r["time_step"], 2) for r in steps_]
    res["tokens"] = statistics.median(r.get("tokens") or 0 for r in steps_)
    res["peak_rss_mib"] = usage.ru_maxrss / 1024
    summary = out / "run" / "summary.json"
    res["attention"] = json.loads(summary.read_text()).get("attention") if summary.is_file() else None
    res["command"] = " ".join(cmd[1:])
    return res


def markdown(res: dict) -> str:
    b, a = res["before"], res["after"]
    lines = [
        f"# `{res['config']}`: one training step before and after ({res['date_utc']} UTC)",
        "",
        f"{res['cpu']}, {res['cores']} cores, {res['threads']} threads; load average before "
        f"{res['load_before']}, after {res['load_after']}. Steps per run: {res['steps']} (first excluded, "
        "medians of the rest).",
        f"Command: `{res['command']}`",
        "",
        "| commit | step s | rollout s | reward s | old pass s | update s | tokens/step | peak RSS MiB | layout |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("before " + res["before_commit"][:10], b), ("after " + res["after_commit"][:10], a)):
        lines.append(
            f"| {name} | {r['time_step']:.1f} | {r['time_rollout']:.1f} | {r['time_reward']:.1f} | "
            f"{r['time_old_pass']:.1f} | {r['time_update']:.1f} | {r['tokens']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{(r.get('attention') or {}).get('packing', 'n/a')} |"
        )
    lines += [
        "",
        f"**Step: {b['time_step'] / a['time_step']:.2f}x faster** (before / after: {b['time_step']:.1f} s / "
        f"{a['time_step']:.1f} s; per step before {b['time_step_each']}, after {a['time_step_each']}).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the old commit (any git revision)")
    p.add_argument("--config", default="smollm2-135m.yaml", help="a file name under red/configs/")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--record", action="store_true", help="write bench/results/config-step-<config>.json/.md")
    a = p.parse_args(argv)
    import platform

    res = {
        "command": "python -m bench.config_step " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": a.config,
        "steps": a.steps,
        "threads": a.threads,
        "cpu": next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
            platform.processor(),
        ),
        "cores": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "before_commit": commit_of(a.before),
        "after_commit": commit_of("HEAD"),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="config-step-") as d:
        tmp = Path(d)
        old = tmp / "before-code"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old), res["before_commit"]],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            for name, code in (("before", old), ("after", REPO)):
                out = tmp / name
                out.mkdir()
                res[name] = run_at(code, a.config, a.steps, out, a.threads)
                print(name, json.dumps(res[name]), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, capture_output=True)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    md = markdown(res)
    print(md)
    if a.record:
        stem = "config-step-" + a.config.removesuffix(".yaml")
        (REPO / "bench" / "results" / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        (REPO / "bench" / "results" / f"{stem}.md").write_text(md + "\n")
        print(f"recorded bench/results/{stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
