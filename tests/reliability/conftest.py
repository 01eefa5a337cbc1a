"""Shared by the reliability tests: the smallest `red.train` run (a few seconds on one CPU thread)."""

import json
import os

import pytest

TINY = [
    "warmup.enabled=false",
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1}",
    "train.prompts_per_step=2",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=2",
    "eval.every=0",
    "eval.before=false",
    "log.progress=false",
    "log.plot=false",
    "log.samples_every=0",
    "optim.lr=1e-3",
    "algorithm.max_refill=0",
    "threads=1",
]


def tiny_args(out, steps, *extra):
    """Arguments of red.train for a tiny run of `steps` steps into `out`, checkpointing every 2 steps."""
    return [
        f"output_dir={out}",
        f"train.steps={steps}",
        "checkpoint.every=2",
        "checkpoint.keep=3",
        *TINY,
        *extra,
    ]


def metric_steps(out) -> list[int]:
    return [json.loads(ln)["step"] for ln in open(os.path.join(out, "metrics.jsonl")) if ln.strip()]


@pytest.fixture
def tiny():
    return tiny_args
