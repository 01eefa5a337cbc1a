"""Every Triton kernel variant (triton_plan.VARIANTS) and every GPU tile config, in Triton's interpreter, against
the float64 reference (tolerances of shared/spec/kernels.md, via test_logprobs.check_against_reference).

Small tiles (16×64×16) and GROUP_N = 2 make a few rows and columns exercise many token blocks, partial program
groups, vocabulary tiles (online rescaling), ragged splits and H steps; cases with BLOCK_K | H and BLOCK_V | V run
the lean kernels' unmasked paths.
"""

from __future__ import annotations

import pytest
import torch
from test_logprobs import _extreme, check_against_reference, make_inputs, run_op, upstream

from red_kernels import backends
from red_kernels.backends import triton_plan as plan
from red_kernels.reference import reference_logprobs

T = backends.ops("triton")

# (shape, H, V, dtype, bias, tau, softcap, vocab splits)
CASES = {
    "fp32_ragged": ((45,), 40, 700, torch.float32, True, 0.8, None, 3),
    "bf16_even": ((2, 19), 48, 640, torch.bfloat16, False, 1.2, None, 2),
    "fp16_even_k": ((33,), 64, 500, torch.float16, True, 1.0, None, 1),
    "softcap": ((37,), 32, 500, torch.float32, True, 0.9, 2.5, 2),
}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(T, "INTERPRETER_MAX_BLOCKS", (16, 64, 16))
    monkeypatch.setattr(plan, "GROUP_N", 2)


def _with_splits(monkeypatch, splits):
    forward = T.stats
    monkeypatch.setattr(T, "stats", lambda *a, **k: forward(*a, **k, vocab_splits=splits))


@pytest.mark.parametrize("case", [*CASES, "all_very_negative"])
@pytest.mark.parametrize("variant", sorted(plan.VARIANTS))
def test_variant_matches_float64(variant, case, small_tiles, monkeypatch):
    monkeypatch.setenv("RED_KERNELS_TRITON_VARIANT", variant)
    if case in CASES:
        shape, h, v, dtype, bias, tau, cap, splits = CASES[case]
        x, w, y, b = make_inputs(shape, h, v, dtype=dtype, bias=bias, seed=21)
        zkw, ulps = ({} if cap is None else dict(softcap=cap, logit_scale=1.3)), 0.0
    else:
        (x, w, y, b), tau, splits, zkw, ulps = _extreme(case), 0.9, 2, {}, 8
    _with_splits(monkeypatch, splits)
    check_against_reference("triton", x, w, y, b, tau=tau, mode="mix", chunk_size=13, logit_ulps=ulps, **zkw)


@pytest.mark.parametrize("variant", ["fused3", "vsplit", "fast", "baseline"])
def test_loss_path_forward_with_grad_matches_float64(variant, small_tiles, monkeypatch):
    """The loss path (gradient formed in the forward sweep; 'fused3' keeps the fp32 logits chunk; 'vsplit' takes
    the stats of all rows, then the vocabulary-chunked backward) against the float64 gradient of
    L = Σ a·log p + Σ c·H."""
    monkeypatch.setenv("RED_KERNELS_TRITON_VARIANT", variant)
    x, w, y, b = make_inputs((41,), 40, 600, bias=True, ignore_frac=0.0, seed=22)
    a, c = upstream(y.shape, "mix")
    logp, ent, dx, dw, db = backends.forward_with_grad(
        T, x, w, b, y, backends.LogitMap(0.9, 1.2, 3.0), lambda rows, lp, h: (a[rows], c[rows]), chunk_size=15
    )
    lp_r, ent_r, grads_r = run_op(
        lambda *t, **k: reference_logprobs(*t, temperature=0.9, logit_scale=1.2, softcap=3.0),
        x,
        w,
        y,
        b,
        "mix",
        leaf_dtype=torch.float64,
    )
    assert (logp.double() - lp_r).abs().max() <= 1e-4 and (ent.double() - ent_r).abs().max() <= 1e-4
    for g, g_r in zip((dx, dw, db), grads_r):
        assert (g.double() - g_r).abs().max() <= 1e-4 * g_r.abs().max()


GPU_CONFIGS = [("half", i) for i in range(len(plan.CONFIG_SHAPES))] + [
    ("fp32", i) for i in range(len(plan.FP32_CONFIG_SHAPES))
]


@pytest.mark.parametrize("lean", [False, True], ids=["baseline", "lean"])
@pytest.mark.parametrize("kind,index", GPU_CONFIGS)
def test_each_gpu_tile_config(kind, index, lean, monkeypatch):
    """Each GPU config's BLOCK_N × BLOCK_V × BLOCK_K (pinned through RED_KERNELS_TRITON_CONFIG) once, with the
    input dtype its list is for (fp16 stands in for the half list: the interpreter's bf16 tiles are upcast): two
    token blocks (one partial), a ragged last vocabulary tile, BLOCK_K | H (half) or a partial H step (fp32)."""
    shape = plan.config_shapes(kind == "fp32")[index]
    monkeypatch.setenv("RED_KERNELS_TRITON_CONFIG", ",".join(map(str, shape)))
    monkeypatch.setenv("RED_KERNELS_TRITON_VARIANT", "lean" if lean else "baseline")
    bn, bv, bk = shape[:3]
    dtype = torch.float32 if kind == "fp32" else torch.float16
    h = bk + 6 if kind == "fp32" else 2 * bk
    x, w, y, b = make_inputs((bn + 5,), h, 2 * bv + 37, dtype=dtype, bias=index % 2 == 0, seed=index)
    check_against_reference("triton", x, w, y, b, tau=0.8, mode="mix")  # on a GPU: the compiled path
