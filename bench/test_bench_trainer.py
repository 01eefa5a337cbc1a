"""Time per RED step of the trainer's embedded default (red/configs/default.yaml) on this machine, by phase.

Runs `python -m red.train` in a fresh process (the config sets its own thread count) for a few RED steps with the
warm-up SFT stage and the before-training evaluation off, then reads the per-phase times the trainer logs in
metrics.jsonl (time_rollout, time_reward, time_old_pass, time_update, time_step). The first step is excluded
from the medians (allocation and first-call costs). Without the warm-up the policy is the random tiny model, so
online samples run to rollout.max_new_tokens: an upper bound on rollout length.
"""
import json
import statistics
import subprocess
import sys
from pathlib import Path

STEPS = 5
PHASES = ("time_rollout", "time_reward", "time_old_pass", "time_update", "time_step")
OVERRIDES = [f"train.steps={STEPS}", "warmup.enabled=false", "eval.before=false", "log.plot=false",
             "log.progress=false", "data.synthetic_eval_size=16", "checkpoint.resume=never"]


def phase_summary(metrics: list[dict]) -> dict:
    """Median seconds per phase and tokens/s over the RED steps after the first."""
    steps = [m for m in metrics if m.get("mode") == "red" and not m.get("skipped_update")]
    if len(steps) < 2:
        raise AssertionError(f"expected at least 2 RED update steps in metrics.jsonl, got {len(steps)}")
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
    bench_rows.append({"id": "trainer-red-default", "op": "trainer", "mode": "red", "device": "cpu",
                       "impl": "red.train", "command": "python -m red.train " + " ".join(OVERRIDES),
                       "process_s": benchmark.stats.stats.median, "phases": phases, "error": None})
