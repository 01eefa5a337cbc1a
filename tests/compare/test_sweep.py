"""red.sweep run (red/sweep.py) with an injected runner: equal trial counts enforced, every trial
evaluated on the validation split, the best mean validation accuracy chosen per method."""

import json
import os

import pytest

from red.config import ConfigError
from red.sweep import run_sweep, trials


def fake(calls):
    def run(argv, out):
        os.makedirs(out, exist_ok=True)
        kv = dict(a.split("=", 1) for a in argv if "=" in a)
        if "--warmup-only" in argv:
            os.makedirs(os.path.join(out, "warmup"), exist_ok=True)
            open(os.path.join(out, "warmup", "config.json"), "w").write("{}")
            json.dump({"warmup_only": True}, open(os.path.join(out, "summary.json"), "w"))
            return 0
        calls.append(kv)
        # validation accuracy: lr 1e-3 is best for grpo; zero_online beats keep for red; seeds differ a little
        acc = (
            0.4
            + (kv.get("optim.lr") == "0.001") * 0.1
            + (kv.get("algorithm.teacher_only_groups") == "zero_online") * 0.2
        )
        acc += 0.01 * (int(kv["seed"]) - 101)
        ev = {"accuracy": acc, "n": 1, "per_source": {"all": {"avg@1": acc, "mean_length": 20.0}}}
        open(os.path.join(out, "metrics.jsonl"), "w").write(json.dumps({"step": 1, "H_on": 0.5}) + "\n")
        json.dump({"eval_after": ev, "wall_time_s": 1.0}, open(os.path.join(out, "summary.json"), "w"))
        return 0

    return run


SPEC = """
seeds: [101, 102]
overrides: [train.steps=2]
methods:
  grpo: {mode: grpo, grid: {optim.lr: [5.0e-4, 1.0e-3]}}
  red: {mode: red, overrides: [optim.lr=5.0e-4], grid: {algorithm.teacher_only_groups: [keep, zero_online]}}
"""


def test_sweep_tunes_on_validation_with_equal_trials(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    calls = []
    r = run_sweep(str(spec), 2, [], str(tmp_path / "sw"), "cmd", runner=fake(calls))
    assert len(calls) == 8 and all(c["eval.split"] == "validation" for c in calls)
    assert r["trials_per_method"] == 2 and r["methods"]["grpo"]["chosen"]["overrides"] == ["optim.lr=0.001"]
    red = r["methods"]["red"]["chosen"]
    assert red["overrides"] == ["optim.lr=5.0e-4", "algorithm.teacher_only_groups=zero_online"]
    assert red["val_acc"] == pytest.approx(0.6 + 0.005)
    assert r["arms"] == "grpo:optim.lr=0.001,red:optim.lr=5.0e-4:algorithm.teacher_only_groups=zero_online"
    on_disk = json.load(open(tmp_path / "sw" / "sweep.json"))
    assert on_disk["methods"]["red"]["arm"] == r["methods"]["red"]["arm"]
    assert "**yes**" in open(tmp_path / "sw" / "sweep.md").read()


def test_unequal_trial_counts_are_refused():
    spec = {
        "methods": {"a": {"mode": "grpo", "grid": {"optim.lr": [1, 2]}}, "b": {"mode": "red", "grid": {}}}
    }
    with pytest.raises(ConfigError, match="same number of trials"):
        trials(spec)


def test_decisive_arms_add_the_teacher_only_ablation():
    from red.sweep import decisive_arms

    sweep = {
        "methods": {
            "grpo": {
                "mode": "grpo",
                "arm": "grpo:optim.lr=0.001",
                "chosen": {"overrides": ["optim.lr=0.001"]},
            },
            "red": {
                "mode": "red",
                "arm": "red:optim.lr=5e-4:algorithm.teacher_only_groups=drop",
                "chosen": {"overrides": ["optim.lr=5e-4", "algorithm.teacher_only_groups=drop"]},
            },
            "luffy": {
                "mode": "luffy",
                "arm": "luffy:optim.lr=2e-4",
                "chosen": {"overrides": ["optim.lr=2e-4"]},
            },
        }
    }
    assert decisive_arms(sweep).split(",") == [
        "grpo:optim.lr=0.001",
        "red:optim.lr=5e-4:algorithm.teacher_only_groups=drop",
        "luffy:optim.lr=2e-4",
        "luffy_zero_online=luffy:optim.lr=2e-4:algorithm.teacher_only_groups=zero_online",
        "red_keep=red:optim.lr=5e-4:algorithm.teacher_only_groups=keep",
    ]
