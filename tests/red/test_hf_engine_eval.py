"""HF rollout engine (sampled-token log-probs vs the trainer's red_kernels log-probs, stops, seeds) and evaluation
(unbiased pass@k, per-source summary, the `python -m red.eval` command)."""

import json
import math

import pytest
import torch
from conftest import tiny_model

from red import synthetic
from red.eval import main as eval_main
from red.eval import pass_at_k, summarise
from red.records import PromptItem, RolloutBatch
from red.rollout.base import SamplingConfig
from red.rollout.factory import make_engine
from red.rollout.hf_engine import HFEngine
from red.update import Policy, old_policy_pass


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=1)


def _prompts(tok, n=3):
    return [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": e["problem"]}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for e in synthetic.generate("chains", n, seed=0)
    ]


def test_engine_logprobs_equal_trainer_logprobs(tiny):
    model, tok = tiny
    eng = HFEngine(model, tok, batch_size=4)  # chunks of 4 < 3 prompts x 3 samples
    prompts = _prompts(tok)
    out = eng.generate(prompts, 3, SamplingConfig(max_new_tokens=12, temperature=0.8, seed=5))
    assert [len(r) for r in out] == [3, 3, 3]
    items = [PromptItem(p, "1", [], "t", i, i) for i, p in enumerate(prompts)]
    b = old_policy_pass(
        Policy(model, pad_id=tok.pad_token_id), RolloutBatch.from_rollouts(items, out, 0), 4096, 0.8
    )
    lp = [b.old_logprobs[i, :n] for i, n in enumerate(b.response_len.tolist())]
    assert torch.equal(b.engine_logprobs[0, : len(out[0][0].logprobs)], torch.tensor(out[0][0].logprobs))
    for ro, ref in zip([ro for g in out for ro in g], lp):
        assert ro.prompt_ids in prompts and 1 <= len(ro.token_ids) <= 12
        assert torch.allclose(torch.tensor(ro.logprobs), ref, atol=2e-4)
        stopped = ro.token_ids[-1] == tok.eos_token_id
        assert ro.finish_reason == ("stop" if stopped else "length")
        assert tok.eos_token_id not in ro.token_ids[:-1]


def test_engine_seeds_and_greedy_are_reproducible(tiny):
    model, tok = tiny
    eng = make_engine(
        type("C", (), {"rollout": type("R", (), {"engine": "hf", "batch_size": 64})})(), model, tok
    )
    prompts = _prompts(tok, 2)

    def ids(s):
        return [[ro.token_ids for ro in g] for g in eng.generate(prompts, 2, s)]

    a = ids(SamplingConfig(10, 1.0, seed=3))
    assert a == ids(SamplingConfig(10, 1.0, seed=3))
    assert a != ids(SamplingConfig(10, 1.0, seed=4))
    g = ids(SamplingConfig(10, 0.0))
    assert g[0][0] == g[0][1] and g == ids(SamplingConfig(10, 0.0))
    state = torch.get_rng_state()
    ids(SamplingConfig(10, 1.0, seed=9))
    assert torch.equal(state, torch.get_rng_state())  # sampling never disturbs the trainer's RNG


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefill_once_per_prompt_samples_what_generate_samples(tiny, temperature):
    """The engine runs each prompt's prefill once and repeats its cache for the n members: the same tokens as
    transformers' generate over the n copies (greedy, and sampled with the same seed), prompts of several
    lengths (left padding inside a chunk)."""
    from transformers import GenerationConfig

    model, tok = tiny
    prompts = _prompts(tok, 3)
    assert len({len(p) for p in prompts}) > 1
    eng = HFEngine(model, tok, batch_size=64, return_logprobs=False)
    got = eng.generate(prompts, 4, SamplingConfig(24, temperature, 1.0, seed=5))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eng.pad_id] * (width - len(p)) + p for p in prompts for _ in range(4)])
    mask = (
        torch.arange(width)[None]
        >= torch.tensor([width - len(p) for p in prompts for _ in range(4)])[:, None]
    )
    cfg = GenerationConfig(
        max_new_tokens=24,
        do_sample=temperature > 0,
        temperature=temperature or None,
        top_p=None,
        top_k=None,
        pad_token_id=eng.pad_id,
        eos_token_id=eng.stop_ids,
    )
    torch.manual_seed(5)
    model.eval()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask.long(), generation_config=cfg)[:, width:]
    flat = [ro.token_ids for group in got for ro in group]
    assert len(flat) == 12
    for row, ro in zip(ref.tolist(), flat):
        assert row[: len(ro)] == ro
    # no online member (rollout.num_offline = rollout.n): one empty group per prompt, nothing generated
    assert eng.generate(prompts, 0, SamplingConfig(24, temperature, 1.0, seed=5)) == [[], [], []]


@pytest.mark.parametrize("n, c, k", [(4, 1, 2), (5, 2, 1), (8, 3, 4), (10, 0, 3), (6, 6, 2), (16, 1, 16)])
def test_pass_at_k_is_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_summarise_per_source_lengths_and_truncation():
    def rec(src, uid, ok, length, trunc=False):
        return dict(
            source=src,
            uid=uid,
            correct=ok,
            length=length,
            truncated=trunc,
            status="correct" if ok else "wrong",
        )

    records = [
        rec("a", 0, True, 10),
        rec("a", 0, False, 30, True),
        rec("a", 1, False, 20),
        rec("a", 1, False, 40),
        rec("b", 2, True, 5),
        rec("b", 2, True, 7),
    ]
    s = summarise(records, 2)
    assert s["a"]["avg@2"] == 0.25 and s["a"]["pass@1"] == 0.25 and s["a"]["pass@2"] == 0.5
    assert s["a"]["mean_length_correct"] == 10 and s["a"]["mean_length_wrong"] == 30
    assert s["a"]["truncation_rate"] == 0.25 and s["b"]["pass@2"] == 1.0
    assert s["all"]["problems"] == 3 and s["all"]["avg@2"] == pytest.approx(3 / 6)


def test_eval_command_reads_jsonl_layouts(tiny, tmp_path, capsys):
    model, tok = tiny
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    data = tmp_path / "gsm.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"})
            for i in range(3)
        )
        + "\n"
    )
    out = tmp_path / "res.json"
    assert (
        eval_main(
            [
                "--model",
                str(d),
                "--data",
                str(data),
                "--data",
                "synthetic:chains",
                "--limit",
                "4",
                "--n",
                "2",
                "--temperature",
                "1.0",
                "--max-new-tokens",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert "torch" in res["versions"] and "transformers" in res["versions"]
    g = res["datasets"][str(data)]
    assert g["per_source"]["gsm"]["problems"] == 3 and g["per_source"]["gsm"]["samples"] == 6
    assert set(g["per_source"]["gsm"]) >= {"avg@2", "pass@1", "pass@2", "mean_length", "truncation_rate"}
    assert res["datasets"]["synthetic:chains"]["per_source"]["all"]["problems"] == 4
    assert "gsm" in capsys.readouterr().out


def test_eval_command_takes_the_training_schema(tiny, tmp_path, capsys):
    """`red.eval --config ... key=value` reads its defaults from the one config schema (data.eval, eval.n,
    eval.temperature, rollout.max_new_tokens, rollout.engine); explicit flags still win; bad keys are named."""
    model, tok = tiny
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "res.json"
    common = [
        "--model",
        str(d),
        "--config",
        "default.yaml",
        "data.eval=[synthetic:chains]",
        "eval.n=2",
        "eval.temperature=1.0",
        "rollout.max_new_tokens=8",
        "--limit",
        "3",
        "--out",
        str(out),
    ]
    assert eval_main(common) == 0
    res = json.loads(out.read_text())["datasets"]["synthetic:chains"]
    assert (res["n"], res["temperature"], res["max_new_tokens"]) == (2, 1.0, 8)
    assert res["per_source"]["all"]["samples"] == 6
    assert eval_main(common + ["--n", "3"]) == 0  # a flag overrides the config
    assert json.loads(out.read_text())["datasets"]["synthetic:chains"]["n"] == 3
    assert eval_main(["--model", str(d), "eval.nn=2"]) == 2
    assert "eval.nn" in capsys.readouterr().err
