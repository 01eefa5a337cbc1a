"""Engine-independent parts of the vLLM integration: the mismatch / truncated-IS function against float64 values
computed by hand, the checkpoint-format weight stream, and the sleep/wake/load call order (a recording stand-in
for vllm.LLM, checked against vLLM's documented rule: with sleep level 1, wake the weights before writing them,
since wake-up restores the pre-sleep backup; reset the prefix cache after the write)."""
import math
from types import SimpleNamespace

import pytest
import torch

from red.rollout.base import SamplingConfig
from red.rollout.mismatch import logprob_mismatch
from red.rollout.vllm_engine import VLLMEngine, checkpoint_weights


def test_mismatch_matches_hand_computed_float64():
    engine = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -4.0, float("-inf"), 0.0]])
    trainer = torch.tensor([[-1.1, -1.0, -0.5, -2.5], [-0.3, -4.5, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = logprob_mismatch(engine, trainer, mask, cap=2.0)
    # masked deltas trainer - engine: -0.1, +1.0, 0.0, -0.1, -0.5 (float64 by hand)
    deltas = [-0.1, 1.0, 0.0, -0.1, -0.5]
    w = [min(math.exp(d), 2.0) for d in deltas]
    expected_w = torch.tensor([[w[0], w[1], w[2], 1.0], [w[3], w[4], 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(out.is_weights.double(), expected_w, atol=1e-6, rtol=0)
    assert float(out.mean_abs_diff) == pytest.approx(sum(abs(d) for d in deltas) / 5, abs=1e-6)
    assert float(out.max_abs_diff) == pytest.approx(1.0, abs=1e-6)
    assert float(out.mean_is_weight) == pytest.approx(sum(w) / 5, abs=1e-6)
    assert float(out.capped_frac) == pytest.approx(1 / 5)  # exp(1.0) > 2 is truncated
    assert not out.is_weights.requires_grad and out.is_weights.dtype == torch.float32


def test_mismatch_caps_large_ratios_without_overflow():
    engine = torch.tensor([[-200.0, -1.0]])
    trainer = torch.tensor([[-0.1, -1.0 + math.log(3.0)]])
    out = logprob_mismatch(engine, trainer, torch.ones(1, 2, dtype=torch.bool), cap=2.5)
    torch.testing.assert_close(out.is_weights, torch.tensor([[2.5, 2.5]]))
    assert float(out.capped_frac) == 1.0
    assert torch.isfinite(out.is_weights).all()


def test_mismatch_empty_mask_gives_zeros_not_nan():
    x = torch.randn(2, 3)
    out = logprob_mismatch(x, x + 1, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out.is_weights, torch.ones(2, 3))
    for v in out.metrics().values():
        assert v == 0.0


def test_mismatch_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shapes"):
        logprob_mismatch(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="cap"):
        logprob_mismatch(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), cap=0.5)


def test_checkpoint_weights_adds_tied_head_and_strips_wrappers():
    emb = torch.randn(5, 3, requires_grad=True)
    norm = torch.randn(3, requires_grad=True)
    named = [("module.model.embed_tokens.weight", emb), ("module.model.norm.weight", norm)]
    out = list(checkpoint_weights(iter(named), tied=True))
    assert [n for n, _ in out] == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert out[2][1].data_ptr() == emb.data_ptr() and not out[2][1].requires_grad
    untied = list(checkpoint_weights(iter(named), tied=False))
    assert [n for n, _ in untied] == ["model.embed_tokens.weight", "model.norm.weight"]
    explicit = named + [("lm_head.weight", torch.zeros(5, 3))]
    assert [n for n, _ in checkpoint_weights(iter(explicit), tied=True)].count("lm_head.weight") == 1
    with pytest.raises(ValueError, match="embed_tokens"):
        list(checkpoint_weights(iter([("model.norm.weight", norm)]), tied=True))


class RecordingLLM:
    """Stand-in for vllm.LLM that records the calls the engine makes and consumes the weight stream."""

    def __init__(self, tied=False):
        self.calls = []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(
            hf_text_config=SimpleNamespace(tie_word_embeddings=tied)))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def collective_rpc(self, method, kwargs=None):
        names = [n for n, _ in kwargs["weights_iterator"]]
        self.calls.append((method, tuple(names)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True


def engine_on(llm, sleep_mode=True):
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm, engine.sleep_level, engine.seed, engine.rank = llm, 1, 0, 0
    engine._init_state(sleep_mode)
    return engine


def test_sleep_load_wake_order_writes_weights_after_their_wake_up():
    llm = RecordingLLM(tied=True)
    engine = engine_on(llm)
    weights = [("model.embed_tokens.weight", torch.zeros(4, 2))]
    engine.sleep()
    engine.load_weights(weights)
    engine.wake()
    assert llm.calls == [
        ("sleep", 1),
        ("wake_up", ("weights",)),
        ("reload_weights", ("model.embed_tokens.weight", "lm_head.weight")),
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache",),
    ]
    engine.wake()  # idempotent
    assert len(llm.calls) == 5


def test_wake_before_load_also_resets_prefix_cache():
    llm = RecordingLLM()
    engine = engine_on(llm)
    engine.sleep()
    engine.sleep()  # second sleep is a no-op
    engine.wake()
    engine.load_weights([("model.norm.weight", torch.zeros(2))])
    assert llm.calls == [("sleep", 1), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",)),
                         ("reload_weights", ("model.norm.weight",)), ("reset_prefix_cache",)]


def test_sleep_is_a_no_op_without_sleep_mode():
    llm = RecordingLLM()
    engine = engine_on(llm, sleep_mode=False)
    engine.sleep()
    engine.wake()
    assert llm.calls == []


def test_generate_validates_limits_before_touching_the_engine():
    engine = engine_on(RecordingLLM())
    engine.max_prompt_len, engine.max_new_tokens = 8, 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1, 2]], 1, SamplingConfig(max_new_tokens=5))
    with pytest.raises(ValueError, match="tokens"):
        engine.generate([[]], 1, SamplingConfig(max_new_tokens=4))
