"""End-to-end runs of `red.train` at small size: every mode runs in one pipeline, and a run killed with SIGKILL
after a checkpoint resumes to exactly the same metrics and weights as an uninterrupted run."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from red.train import main

TINY = [
    "warmup.enabled=false",
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1}",
    "train.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "data.synthetic_train_size=64",
    "data.synthetic_eval_size=6",
    "eval.every=0",
    "log.progress=false",
    "log.plot=false",
    "optim.lr=1e-3",
    "algorithm.max_refill=1",
    "log.samples_every=1",
]


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _stable(row):
    """Metrics that must be reproduced exactly (timings and memory readings are not)."""
    return {k: v for k, v in row.items() if not k.startswith(("time", "mem_", "tokens_per_s"))}


@pytest.mark.parametrize("mode", ["red", "luffy", "grpo", "sft", "sft_then_grpo"])
def test_every_mode_runs_in_the_same_pipeline(tmp_path, mode):
    out = str(tmp_path / mode)
    assert (
        main(
            [
                f"output_dir={out}",
                f"algorithm.mode={mode}",
                "train.steps=2",
                "algorithm.sft_steps=1",
                "checkpoint.every=1",
                "sft.lr=5e-3",
                *TINY,
            ]
        )
        == 0
    )
    rows = _rows(out)
    # lr after each step: the SFT phase decays its own 5e-3 to 0.1x in its one step; GRPO restarts at optim.lr
    want = {"sft_then_grpo": [5e-4, 1e-4], "sft": [None, 5e-4]}.get(mode, [None, 1e-4])
    assert all(w is None or abs(r["lr"] - w) < 1e-12 for w, r in zip(want, rows[1:]))
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/acc" in rows[0] and "eval/acc" in rows[2]
    steps = rows[1:]
    if mode == "sft":
        assert all(r["mode"] == "sft" and r["nll"] > 0 for r in steps)
    elif mode == "sft_then_grpo":
        assert [r["mode"] for r in steps] == ["sft", "grpo"] and steps[1]["acc_offline"] is None
    elif mode == "grpo":
        # a random model solves nothing: every group is all-wrong and dropped, nothing to learn from
        assert all(
            r["acc_offline"] is None and r["drop_frac_all_wrong"] == 1.0 and r["skipped_update"] == 1
            for r in steps
        )
    else:
        assert all(r["acc_offline"] == 1.0 and r["H_on"] > 0 and r["H_off"] > 0 for r in steps)
        if mode == "luffy":
            assert all(r["w"] == 1.0 for r in steps)
        assert all(r["groups_kept"] >= 1 and r["grad_norm"] > 0 for r in steps)
    assert os.path.isfile(os.path.join(out, "step_2", "model.safetensors"))
    assert open(os.path.join(out, "latest")).read().strip() == "step_2"
    summary = open(os.path.join(out, "summary.json")).read()  # strict JSON: no NaN for an empty mean
    assert (
        "NaN" not in summary
        and "Infinity" not in summary
        and json.loads(summary)["eval_after"]["accuracy"] >= 0
    )
    assert not os.path.exists(os.path.join(out, "step_0"))
    # keep: 2 -> step_1 and step_2 remain
    assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_1", "step_2"]


def _cmd(out, steps):
    return [
        sys.executable,
        "-m",
        "red.train",
        f"output_dir={out}",
        f"train.steps={steps}",
        "checkpoint.every=2",
        "checkpoint.keep=3",
        *TINY,
    ]


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    steps = 10
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    subprocess.run(_cmd(ref, steps), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_cmd(cut, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(cut, "latest")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int(open(os.path.join(cut, "latest")).read().strip().split("_")[1])
    assert 2 <= killed_at < steps and not os.path.exists(os.path.join(cut, "summary.json"))

    res = subprocess.run(_cmd(cut, steps), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "held-out accuracy:" in res.stdout

    a, b = _rows(ref), _rows(cut)
    assert [r["step"] for r in b] == list(range(steps + 1))
    assert [_stable(r) for r in a] == [_stable(r) for r in b]
    wa = load_file(os.path.join(ref, f"step_{steps}", "model.safetensors"))
    wb = load_file(os.path.join(cut, f"step_{steps}", "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (ref, cut))
    assert sa["eval_before"] == sb["eval_before"] and sa["eval_after"] == sb["eval_after"]

    again = subprocess.run(_cmd(cut, steps), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "would run zero steps" in again.stderr


@pytest.mark.parametrize(
    "stats,choice,adv_off",
    [("online", "keep", 1 / (0.5 + 1e-6)), ("group", "zero_online", 0.75 / (0.5 + 1e-6))],
)
def test_teacher_only_groups_in_the_trainer(tmp_path, stats, choice, adv_off):
    """A random model solves nothing and the teacher everything: every group is teacher-only (online rewards
    0,0,0, teacher 1, n = 4). adv_stats=online has no online spread there and falls back to the group std 1/2:
    the teacher's advantage is 1/(1/2) = 2 (it was 1e6); with the whole group's statistics it is 0.75/(1/2).
    The per-step shares of kept groups that are teacher-only / all-correct / all-wrong are logged."""
    out = str(tmp_path / "run")
    argv = [f"output_dir={out}", "algorithm.mode=luffy", "train.steps=1", *TINY]
    assert main(argv + [f"algorithm.adv_stats={stats}", f"algorithm.teacher_only_groups={choice}"]) == 0
    row = _rows(out)[1]
    assert row["kept_frac_teacher_only"] == 1.0
    assert row["kept_frac_all_correct"] == 0.0 and row["kept_frac_all_wrong"] == 0.0
    assert abs(row["adv_offline_mean"] - adv_off) < 1e-4 and math.isfinite(row["loss"])


def test_warmup_only_then_a_run_from_the_shared_warmup_on_validation(tmp_path):
    """`--warmup-only` trains the warm-up into warmup.path, evaluates that base model and stops; a run given
    the same warmup.path loads it instead of training one (red.compare's one warm-up per seed), and with
    eval.split=validation evaluates the validation problems (disjoint from held-out)."""
    shared = str(tmp_path / "w" / "warmup")
    tiny = [a for a in TINY if not a.startswith("warmup.")] + ["warmup.enabled=true", "warmup.steps=2"]
    warm = [f"warmup.path={shared}", *tiny, "data.synthetic_eval_size=6"]
    assert main(["--warmup-only", f"output_dir={tmp_path / 'w'}", *warm]) == 0
    s = json.load(open(tmp_path / "w" / "summary.json"))
    assert s["warmup_only"] and s["eval_before"]["accuracy"] >= 0 and "eval_after" not in s
    assert os.path.isfile(os.path.join(shared, "config.json"))
    out = tmp_path / "run"
    assert main([f"output_dir={out}", "train.steps=1", "eval.split=validation", *warm]) == 0
    assert not (out / "warmup_metrics.jsonl").exists() and not (out / "warmup").exists()
    s = json.load(open(out / "summary.json"))
    assert s["eval_before"]["per_source"]["all"]["problems"] == 6
