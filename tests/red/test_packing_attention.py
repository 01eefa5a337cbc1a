"""red/attention.py: which attention and micro-batch layout each device gets, and the torch_varlen attention
function (torch's varlen_attn registered in transformers) run on CPU with a stand-in for the CUDA-only kernel."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_batching import make_batch

from red import attention
from red.packing import micro_batches
from red.update import Policy, old_policy_pass


def _blocks(q, k, v, cu, causal, scale):
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qq, kk, vv = (x[a:b].transpose(0, 1) for x in (q, k, v))
        out[a:b] = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=scale).transpose(0, 1)
    return out


class NewVarlen:
    """Stand-in with torch 2.13's signature (window_size, enable_gqa, scale); records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(
        self,
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
        seqused_k=None,
        block_table=None,
        num_splits=None,
    ):
        self.calls.append(
            dict(
                shape=tuple(query.shape),
                kv_heads=key.shape[1],
                cu=cu_seq_q.tolist(),
                cu_dtype=cu_seq_q.dtype,
                same=cu_seq_k is cu_seq_q or torch.equal(cu_seq_k, cu_seq_q),
                max=(max_q, max_k),
                scale=scale,
                window=tuple(window_size),
                gqa=enable_gqa,
            )
        )
        assert query.dim() == 3 and key.shape[0] == query.shape[0]
        if enable_gqa:
            key, value = (x.repeat_interleave(query.shape[1] // x.shape[1], dim=1) for x in (key, value))
        assert key.shape[1] == query.shape[1]
        return _blocks(query, key, value, cu_seq_q, causal=tuple(window_size) == (-1, 0), scale=scale)


def old_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """Stand-in with an older signature: is_causal, no GQA, no scale (default 1/sqrt(D))."""
    assert key.shape[1] == query.shape[1], "no GQA in this signature: heads must be repeated"
    return _blocks(query, key, value, cu_seq_q, causal=is_causal, scale=None)


def test_selection_by_device(monkeypatch):
    assert attention.resolve("auto", "cpu") == "sdpa" and attention.resolve("eager", "cuda") == "eager"
    assert (
        attention.packing_layout("sdpa", "cpu") == "rows"
        and attention.packing_layout("eager", "cpu") == "rows"
    )
    assert attention.packing_layout("flash_attention_2", "cuda") == "flat"
    assert attention.packing_layout(attention.VARLEN, "cuda") == "flat"
    assert attention.packing_layout("sdpa", "cpu", enabled=False) == "off"
    with pytest.warns(UserWarning, match="padded micro-batches"):
        assert attention.packing_layout("sdpa", "cuda") == "off"  # the last resort
    monkeypatch.setattr(attention, "has_flash_attn", lambda: True)
    assert attention.resolve("auto", "cuda") == "flash_attention_2"
    monkeypatch.setattr(attention, "has_flash_attn", lambda: False)
    assert attention.resolve("auto", "cuda") == attention.VARLEN  # torch 2.13 has varlen_attn
    assert attention.resolve("auto", "cuda", "float32") == "sdpa"  # flash kernels: 16-bit only
    from transformers import AttentionInterface

    assert attention.VARLEN in AttentionInterface._global_mapping
    monkeypatch.setattr(attention, "_varlen_fn", lambda: None)
    assert attention.resolve("auto", "cuda") == "sdpa"


def test_varlen_wrapper_maps_a_packed_row_onto_varlen_attn():
    torch.manual_seed(0)
    lens = [3, 5, 2]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    fake = NewVarlen()
    out, w = attention.varlen_attention_forward(
        module, q, k, v, None, scaling=0.3, position_ids=pos, varlen=fake
    )
    (c,) = fake.calls
    assert c["shape"] == (10, 4, 8) and c["kv_heads"] == 2 and c["gqa"] and c["same"]
    assert c["cu"] == [0, 3, 8, 10] and c["cu_dtype"] == torch.int32 and c["max"] == (5, 5)
    assert c["scale"] == 0.3 and c["window"] == (-1, 0) and w is None
    ref = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[..., a : a + n, :],
                k[..., a : a + n, :].repeat_interleave(2, 1),
                v[..., a : a + n, :].repeat_interleave(2, 1),
                is_causal=True,
                scale=0.3,
            )
            for a, n in zip([0, 3, 8], lens)
        ],
        dim=2,
    )
    assert out.shape == (1, 10, 4, 8) and torch.allclose(out, ref.transpose(1, 2), atol=1e-6)
    attention.varlen_attention_forward(
        module, q, k, v, None, scaling=0.3, position_ids=pos, varlen=fake, sliding_window=4
    )
    assert fake.calls[-1]["window"] == (3, 0)
    old, _ = attention.varlen_attention_forward(
        module, q, k, v, None, scaling=8**-0.5, position_ids=pos, varlen=old_varlen
    )
    ref_old = attention.varlen_attention_forward(
        module, q, k, v, None, scaling=8**-0.5, position_ids=pos, varlen=fake
    )[0]
    assert torch.allclose(old, ref_old, atol=1e-6)
    with pytest.raises(ValueError, match="dropout"):
        attention.varlen_attention_forward(module, q, k, v, None, dropout=0.1, position_ids=pos, varlen=fake)


@pytest.fixture
def varlen_model(monkeypatch):
    fake = NewVarlen()
    monkeypatch.setattr(attention, "_varlen_fn", lambda: fake)
    model, tok = tiny_model(seed=0)  # GQA: 2 query heads, 1 key/value head
    attention.register()
    yield model, tok, fake
    model.config._attn_implementation = "sdpa"


def test_torch_varlen_packed_passes_match_padded_sdpa(varlen_model):
    model, tok, fake = varlen_model
    b = make_batch(9, seed=2)
    ref = old_policy_pass(Policy(model, pad_id=tok.pad_token_id), b, 24, 0.8)
    model.config._attn_implementation = attention.VARLEN
    p = Policy(model, pad_id=tok.pad_token_id)
    p.packing = attention.packing_layout(attention.VARLEN, "cuda")
    got = old_policy_pass(p, b, 24, 0.8)
    mbs = micro_batches(b, 24, tok.pad_token_id, "flat")
    assert len(fake.calls) == len(mbs) * model.config.num_hidden_layers
    assert [c["cu"][-1] for c in fake.calls] == [mb.input_ids.shape[1] for mb in mbs]
    assert torch.allclose(got.old_logprobs, ref.old_logprobs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.entropy, ref.entropy, rtol=1e-5, atol=1e-6)


def test_torch_varlen_generate_uses_sdpa_with_padding_and_cache(varlen_model):
    model, tok, fake = varlen_model
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    model.config._attn_implementation = attention.VARLEN
    assert torch.equal(model.generate(ids, **kw), ref)
    assert fake.calls == []  # left padding and KV cache: never the varlen path


def test_a_saved_model_loads_with_torch_varlen(tmp_path):
    from red.models import load_pretrained

    model, tok = tiny_model(seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    name = attention.resolve(attention.VARLEN, "cuda")  # an explicit choice registers it
    loaded, _ = load_pretrained(str(tmp_path), "float32", attn_implementation=name)
    assert loaded.model.layers[0].self_attn.config._attn_implementation == attention.VARLEN
