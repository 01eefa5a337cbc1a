"""The embedded default (red/configs/default.yaml: warm-up SFT stage, then RED) trains with packing and prompt
sharing on (the defaults), and its metrics equal those of the same run with padded micro-batches."""

import json
import math
import os

import pytest

from red.train import main

SHORT = [
    "train.steps=2",
    "warmup.steps=2",
    "warmup.batch_size=16",
    "train.prompts_per_step=4",
    "eval.every=0",
    "eval.before=false",
    "data.synthetic_eval_size=8",
    "log.progress=false",
    "log.plot=false",
    "checkpoint.resume=never",
]


def _rows(path):
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time") and k != "tokens_per_s"}
        for line in open(path)
    ]


def _close(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    return a == b


@pytest.mark.slow
def test_default_config_trains_packed_with_the_metrics_of_padded(tmp_path):
    runs = {}
    for packing in ("true", "false"):
        out = str(tmp_path / packing)
        assert main([f"output_dir={out}", f"train.packing={packing}", *SHORT]) == 0
        summary = json.load(open(os.path.join(out, "summary.json")))
        runs[packing] = (
            _rows(os.path.join(out, "warmup_metrics.jsonl")) + _rows(os.path.join(out, "metrics.jsonl")),
            summary["attention"],
        )
    (packed, attn_on), (padded, attn_off) = runs["true"], runs["false"]
    assert attn_on == {"implementation": "sdpa", "packing": "shared"} and attn_off["packing"] == "off"
    assert len(packed) == len(padded) == 2 + 3
    assert [r["mode"] for r in packed[3:]] == ["red", "red"] and not any(
        r.get("skipped_update") for r in packed
    )
    for a, b in zip(packed, padded):
        assert a.keys() == b.keys()
        # mem_*: the process's resident memory, not a training quantity
        bad = {k: (a[k], b[k]) for k in a if not k.startswith("mem_") and not _close(a[k], b[k])}
        assert not bad, bad


@pytest.mark.slow
def test_smollm2_packed_passes_equal_padded():
    """The real SmolLM2-135M-Instruct (a Llama; the smollm2 config's model), packed rows and shared prompts vs
    padded, fp32."""
    import torch
    from test_packing import mixed_batch
    from transformers import AutoModelForCausalLM

    from red.models import smollm2_dir
    from red.update import Policy, old_policy_pass

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir(), dtype=torch.float32, attn_implementation="sdpa"
    )
    from red.packing import micro_batches

    b = mixed_batch(8, seed=7)
    assert any(
        len(mb.rows) > mb.input_ids.shape[0] for mb in micro_batches(b, 64, 0, "rows")
    )  # really packed
    from test_prompt_sharing import grouped_batch

    g = grouped_batch(3, 4, 1, seed=7)
    for layout, batch in (("rows", b), ("shared", g)):  # shared: groups of 4 sharing a prompt
        runs = {}
        for lay in ("off", layout):
            p = Policy(model, pad_id=0)
            p.packing = lay
            runs[lay] = old_policy_pass(p, batch, 64, 1.0)
        assert torch.allclose(runs[layout].old_logprobs, runs["off"].old_logprobs, rtol=1e-5, atol=1e-5)
        assert torch.allclose(runs[layout].entropy, runs["off"].entropy, rtol=1e-5, atol=1e-5)
