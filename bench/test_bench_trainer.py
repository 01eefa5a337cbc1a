"""Time per step of the trainer on this machine, by phase: the RED embedded default, and a GRPO step against TRL.

test_trainer_red_step: the embedded default (red/configs/default.yaml) in RED mode.
test_trainer_grpo_step_vs_trl: stock trl.GRPOTrainer, REDKernelsGRPOTrainer and `python -m red.train
algorithm.mode=grpo` on the same tiny model, prompts per step, group size and completion length (GRPO_SHAPE), each
in a fresh process (bench/trl_step.py for TRL), with that process's peak RSS (os.wait4). TRL's phases come from
wrapping its own methods (see trl_step.py). Both skip the old-policy pass when the step is on-policy. Every
trainer gets bench/rewards.py's parity reward: the random model solves nothing, and with every advantage 0
red.train would skip the backward of every sequence (gradient-free), so the step would not be a real one.

Runs `python -m red.train` in a fresh process (the config sets its own thread count) for a few RED steps with the
warm-up SFT stage and the before-training evaluation off, then reads the per-phase times the trainer logs in
metrics.jsonl (time_rollout, time_reward, time_old_pass, time_update, time_step). The first step is excluded
from the medians (allocation and first-call costs). Without the warm-up the policy is the random tiny model, so
online samples run to rollout.max_new_tokens: an upper bound on rollout length.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 5
PHASES = ("time_rollout", "time_reward", "time_old_pass", "time_update", "time_step")
MEM_KEYS = ("mem_between", "mem_rollout", "mem_old_pass", "mem_update")
OVERRIDES = [
    f"train.steps={STEPS}",
    "warmup.enabled=false",
    "eval.before=false",
    "log.plot=false",
    "log.progress=false",
    "data.synthetic_eval_size=16",
    "checkpoint.resume=never",
]


GRPO_SHAPE = {"prompts": 4, "group": 8, "max_new": 32, "steps": 6}
GRPO_OVERRIDES = [
    "algorithm.mode=grpo",
    f"train.steps={GRPO_SHAPE['steps']}",
    f"train.prompts_per_step={GRPO_SHAPE['prompts']}",
    f"rollout.n={GRPO_SHAPE['group']}",
    f"rollout.max_new_tokens={GRPO_SHAPE['max_new']}",
    "algorithm.dynamic_sampling=false",
    "reward.fn=bench.rewards:red_reward",  # a learning signal for the random model (bench/rewards.py)
    *OVERRIDES[1:],
]


def phase_summary(metrics: list[dict], mode: str = "red") -> dict:
    """Median seconds per phase and tokens/s over the `mode` update steps after the first."""
    steps = [
        m for m in metrics if m.get("mode", mode) == mode and "time_step" in m and not m.get("skipped_update")
    ]
    if len(steps) < 2:
        raise AssertionError(f"expected at least 2 {mode} update steps in metrics.jsonl, got {len(steps)}")
    later = steps[1:]
    out = {p: statistics.median(m[p] for m in later) for p in PHASES}
    out["tokens_per_step"] = statistics.median(m["tokens"] for m in later)
    out["tokens_per_s"] = statistics.median(m["tokens_per_s"] for m in later)
    out["first_step_s"] = steps[0]["time_step"]
    out["steps"] = len(later)
    return out


def test_trainer_red_step(benchmark, bench_rows, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "red.train", f"output_dir={tmp_path / 'run'}", *OVERRIDES]

    def run():
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    benchmark.group = "trainer: RED step, embedded default"
    benchmark.name = "python -m red.train"
    benchmark.pedantic(run, rounds=1, iterations=1)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    phases = phase_summary([json.loads(ln) for ln in lines if ln.strip()])
    benchmark.extra_info.update(phases)
    bench_rows.append(
        {
            "id": "trainer-red-default",
            "op": "trainer",
            "mode": "red",
            "device": "cpu",
            "impl": "red.train",
            "command": "python -m red.train " + " ".join(OVERRIDES),
            "process_s": benchmark.stats.stats.median,
            "phases": phases,
            "error": None,
        }
    )


def run_measured(cmd, cwd, logs: Path) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS MiB) of one fresh process (its own rusage from os.wait4)."""
    t = time.perf_counter()
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (logs / "stderr").read_text()[-3000:]
    return (logs / "stdout").read_text(), time.perf_counter() - t, usage.ru_maxrss / 1024


@pytest.mark.parametrize("impl", ["trl", "trl+red_kernels", "red.train"])
def test_trainer_grpo_step_vs_trl(benchmark, bench_rows, tmp_path, impl):
    repo = Path(__file__).resolve().parent.parent
    if impl == "red.train":
        cmd = [sys.executable, "-m", "red.train", f"output_dir={tmp_path / 'run'}", *GRPO_OVERRIDES]
    else:
        cmd = [
            sys.executable,
            "-m",
            "bench.trl_step",
            "--trainer",
            "stock" if impl == "trl" else "red_kernels",
            "--out",
            str(tmp_path / "trl"),
            "--steps",
            str(GRPO_SHAPE["steps"]),
            "--prompts",
            str(GRPO_SHAPE["prompts"]),
            "--group",
            str(GRPO_SHAPE["group"]),
            "--max-new",
            str(GRPO_SHAPE["max_new"]),
            "--reward",
            "parity",
        ]
    result = {}

    def run():
        result["out"], result["wall"], result["rss"] = run_measured(cmd, repo, tmp_path)

    benchmark.group = (
        "trainer: GRPO step against TRL ({prompts} prompts x {group}, <= {max_new} new tokens)".format(
            **GRPO_SHAPE
        )
    )
    benchmark.name = impl
    benchmark.pedantic(run, rounds=1, iterations=1)
    if impl == "red.train":
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        phases = phase_summary([json.loads(ln) for ln in lines if ln.strip()], mode="grpo")
    else:
        steps = json.loads(result["out"].strip().splitlines()[-1])["steps"][1:]  # first step excluded
        phases = {p: statistics.median(s[p] for s in steps) for p in PHASES}
        phases["first_step_s"], phases["steps"] = None, len(steps)
    phases["peak_rss_mib"] = result["rss"]
    if impl == "red.train":  # it resets VmHWM between phases (mem_* metrics): the process peak is their max
        mems = [m.get(k) for m in map(json.loads, filter(str.strip, lines)) for k in MEM_KEYS]
        phases["peak_rss_mib"] = max([result["rss"], *(v for v in mems if v is not None)])
    benchmark.extra_info.update(phases)
    bench_rows.append(
        {
            "id": f"trainer-grpo-{impl}",
            "op": "trainer",
            "mode": "grpo",
            "device": "cpu",
            "impl": impl,
            "command": " ".join(cmd[1:]).replace(str(tmp_path), "$TMP"),
            "process_s": result["wall"],
            "phases": phases,
            "error": None,
        }
    )
