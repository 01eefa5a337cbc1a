"""The RolloutEngine contract as the trainer drives it (red/rollout/session.py): two RED steps of `python -m
red.train` with a toy engine defined here alone (no HF generate). The toy engine is a separate engine (not
colocated) that drops its weights when it sleeps (vLLM's level-2 sleep); it answers the first online sample of
each group with the problem's teacher trace (correct) and the others with a cut-off trace (no answer)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import red.rollout.factory as factory
import red.train
from red.rollout.base import Rollout
from red.rollout.session import RolloutSession

N, K, PROMPTS, STEPS = 4, 1, 2, 2
TINY = [
    "warmup.enabled=false",
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
    "num_attention_heads: 2, num_key_value_heads: 1}",
    f"train.prompts_per_step={PROMPTS}",
    f"rollout.n={N}",
    f"rollout.num_offline={K}",
    "rollout.max_new_tokens=32",
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=2",
    "eval.every=0",
    "log.progress=false",
    "log.plot=false",
    "reward.workers=1",
    "checkpoint.every=0",
    "algorithm.max_refill=0",
    "algorithm.mode=red",
    f"train.steps={STEPS}",
]


class ToyEngine:
    """A RolloutEngine: a copy of the weights it was given (not colocated), dropped by sleep()."""

    colocated = False

    def __init__(self, model, traces: dict, eos_id: int, events: list):
        self.traces, self.eos_id, self.events = traces, eos_id, events
        self.loaded = [{k: v.detach().clone() for k, v in model.named_parameters()}]  # as vLLM: a start copy
        self.weights_valid = True
        self.awake = True

    def generate(self, prompt_ids, n, sampling):
        assert self.weights_valid and self.awake, "generate from dropped weights or while asleep"
        self.events.append("generate")
        out = []
        for p in prompt_ids:
            trace = self.traces.get(tuple(p))
            good = list(trace) if trace else [self.eos_id]
            bad = good[:2] + [self.eos_id]  # cut off before the answer: "no_answer"
            out.append([Rollout(list(p), ids, [-1.0] * len(ids), "stop") for ids in [good] + [bad] * (n - 1)])
        return out

    def load_weights(self, named_tensors):
        self.events.append("load")
        self.loaded.append({k: v.detach().clone() for k, v in named_tensors})
        self.weights_valid = True

    def sleep(self):
        self.events.append("sleep")
        self.awake, self.weights_valid = False, False

    def wake(self):
        self.events.append("wake")
        self.awake = True

    def prompt_logprobs(self, token_ids):
        raise NotImplementedError  # the trainer never calls it (a weight-sync check would)

    def close(self):
        self.events.append("close")


@pytest.fixture
def toy_run(tmp_path, monkeypatch):
    events, traces, engines = [], {}, []
    real_load_items = red.train.load_items

    def load_items(
        *args, **kw
    ):  # the teacher trace of every train problem, for the toy engine to answer with
        items, skipped, rep = real_load_items(*args, **kw)
        traces.update({tuple(it.prompt_ids): it.trace_ids[0] for it in items if it.trace_ids})
        return items, skipped, rep

    def make_engine(cfg, model, tokenizer, stop_token_ids=None):
        engines.append(ToyEngine(model, traces, tokenizer.eos_token_id, events))
        return engines[0]

    monkeypatch.setattr(red.train, "load_items", load_items)
    monkeypatch.setattr(factory, "make_engine", make_engine)
    out = tmp_path / "run"
    assert red.train.main([f"output_dir={out}", *TINY]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return rows, events, engines[0], out


def test_two_steps_with_a_toy_engine(toy_run):
    rows, events, engine, out = toy_run
    # eval before (weights as given), per step: rollouts, sleep (weights dropped), update; the second step's
    # rollouts and the final eval each after a load; closed once at the end
    assert events == [
        *("wake", "generate"),
        *("wake", "generate", "sleep"),
        *("load", "wake", "generate", "sleep"),
        *("load", "wake", "generate"),
        "close",
    ]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["mode"] == "red" and r["groups_kept"] == PROMPTS and "skipped_update" not in r
        # per group: 1 correct online sample of N - K, the teacher trace correct, reward 1 each, else 0
        assert r["acc_online"] == pytest.approx(1 / (N - K))
        assert r["reward_mean"] == pytest.approx(2 / N)
        assert r["len_online_mean"] > 3  # the traces are longer than the cut-off answers (3 tokens)
        assert r["grad_norm"] > 0
    # the weights the engine got: changed by each update, and the last ones exactly the trained model's
    first, after1, after2 = engine.loaded
    assert first.keys() == after1.keys() == after2.keys()
    assert any(not torch.equal(first[k], after1[k]) for k in first)
    assert any(not torch.equal(after1[k], after2[k]) for k in first)
    saved = load_file(str(out / f"step_{STEPS}" / "model.safetensors"))
    shared = [k for k in after2 if k in saved]
    assert shared and all(torch.equal(after2[k], saved[k]) for k in shared)


class _Colocated:
    colocated, weights_valid = True, True

    def generate(self, prompt_ids, n, sampling):
        return [[] for _ in prompt_ids]

    def load_weights(self, named_tensors):
        raise AssertionError("a colocated engine is never sent weights")

    def sleep(self):
        pass

    def wake(self):
        pass

    def prompt_logprobs(self, token_ids):
        return torch.zeros(len(token_ids) - 1)

    def close(self):
        self.closed = getattr(self, "closed", 0) + 1


def test_session_checks_the_contract_and_guards_the_weights():
    model = torch.nn.Linear(2, 2)

    class Partial:  # an engine written against the old, shorter protocol
        colocated, weights_valid = True, True
        generate = load_weights = sleep = wake = _Colocated.sleep

    with pytest.raises(TypeError, match="lacks close, prompt_logprobs of the RolloutEngine contract"):
        RolloutSession(Partial(), model)

    engine = _Colocated()
    s = RolloutSession(engine, model)
    s.weights_changed()
    assert s.generate([[1]], 2, None) == [[]] and not s.stale  # colocated: nothing sent
    engine.weights_valid = False  # a colocated engine cannot drop its weights: the session says so
    with pytest.raises(RuntimeError, match="colocated engine's weights must always be valid"):
        s.generate([[1]], 1, None)
    with s:
        pass
    s.close()
    assert engine.closed == 1
    with pytest.raises(RuntimeError, match="after close"):
        s.generate([[1]], 1, None)


def test_both_engines_state_the_whole_contract():
    from red.rollout.base import contract
    from red.rollout.hf_engine import HFEngine
    from red.rollout.vllm_engine import VLLMEngine  # vllm itself is imported only when an engine is built

    for cls in (HFEngine, VLLMEngine):
        assert [m for m in contract() if not hasattr(cls, m)] == [], cls.__name__
    assert HFEngine.colocated and HFEngine.weights_valid and not VLLMEngine.colocated


def test_hf_engine_prompt_logprobs_match_the_trainer_s():
    from red import synthetic
    from red.rollout.hf_engine import HFEngine
    from red.rollout.weight_sync import trainer_logprobs

    tok = synthetic.build_tokenizer()
    model = synthetic.build_model(tok, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1})
    ids = torch.randint(
        0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    got = HFEngine(model, tok).prompt_logprobs(ids)
    assert got.shape == (11,) and got.dtype == torch.float32
    torch.testing.assert_close(got, trainer_logprobs(model, ids), atol=1e-5, rtol=0)  # two implementations
    assert bool((got < 0).all())
