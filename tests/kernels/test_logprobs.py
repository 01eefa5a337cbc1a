"""linear_logprobs on the 'torch' (chunked) and 'triton' backends against the float64 reference.

Tolerances (shared/spec/kernels.md): fp32 inputs: log p and entropy ≤ 1e-4 absolute, gradients ≤ 1e-4 relative
to the reference's max-abs; bf16/fp16 inputs (reference in fp64 on the same rounded inputs): log p ≤ 2e-3,
entropy ≤ 5e-3, gradients ≤ 2e-2 relative.

On CPU the 'triton' backend runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1). To run the same tests
on the compiled kernels: `TRITON_INTERPRET=0 RED_KERNELS_TEST_DEVICE=cuda pytest tests/kernels/test_logprobs.py`
(optionally RED_KERNELS_BACKEND=triton to run only that backend).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from red_kernels import backends, linear_logprobs
from red_kernels.reference import reference_logits, reference_logprobs

DEVICE = torch.device(
    "cuda" if os.environ.get("RED_KERNELS_TEST_DEVICE") == "cuda" and torch.cuda.is_available() else "cpu"
)
_ONLY = os.environ.get("RED_KERNELS_BACKEND")
BACKENDS = [_ONLY] if _ONLY in ("torch", "triton") else ["torch", "triton"]

FP32_TOL = dict(lp=1e-4, ent=1e-4, grad=1e-4)
HALF_TOL = dict(lp=2e-3, ent=5e-3, grad=2e-2)
EPS32 = torch.finfo(torch.float32).eps


def make_inputs(
    shape,
    hidden,
    vocab,
    *,
    dtype=torch.float32,
    bias=False,
    seed=0,
    ignore_frac=0.2,
    x_scale=1.0,
    w_scale=0.3,
    b_scale=0.5,
    ignore_index=-100,
):
    """Random (hidden [*shape, H], weight [V, H], targets [*shape], bias [V] or None) on DEVICE, in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, hidden, generator=g) * x_scale).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * w_scale).to(dtype)
    b = (torch.randn(vocab, generator=g) * b_scale).to(dtype) if bias else None
    y = torch.randint(0, vocab, tuple(shape), generator=g)
    y[torch.rand(tuple(shape), generator=g) < ignore_frac] = ignore_index
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(w), to(y), to(b)


def upstream(shape, mode, seed=1):
    """Per-token upstream weights (a for log p, c for entropy) of the loss L = Σ a·logp + Σ c·H."""
    g = torch.Generator().manual_seed(seed)
    a, c = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    return (None if mode == "ent" else a.to(DEVICE)), (None if mode == "lp" else c.to(DEVICE))


def run_op(fn, x, w, y, b, mode, leaf_dtype=None, **kw):
    """(logp, entropy, grads of (hidden, weight[, bias])) of fn under the upstream weights of `mode`.

    leaf_dtype=torch.float64 makes the inputs float64 leaves (exact reference gradients, not rounded to bf16).
    """
    leaves = [
        t.detach().to(leaf_dtype or t.dtype).clone().requires_grad_() for t in (x, w, b) if t is not None
    ]
    bias = leaves[2] if b is not None else None
    lp, ent = fn(leaves[0], leaves[1], y, bias, **kw)
    a, c = upstream(y.shape, mode)
    loss = sum((t * u).sum() for t, u in ((lp, a), (ent, c)) if u is not None)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return lp.detach(), ent.detach(), grads


def _op(backend, chunk_size=None, **kw):
    def fn(x, w, y, b, **extra):
        return linear_logprobs(x, w, y, bias=b, backend=backend, chunk_size=chunk_size, **kw, **extra)

    return fn


def _ref(x, w, y, b, temperature=1.0, ignore_index=-100, **zkw):
    return reference_logprobs(x, w, y, b, temperature, ignore_index, **zkw)


def max_logit(x, w, b, tau, **zkw):
    z = reference_logits(x.reshape(-1, x.shape[-1]), w, b, tau, **zkw)
    return z.abs().max().item() if z.numel() else 0.0


def check_against_reference(
    backend,
    x,
    w,
    y,
    b,
    *,
    tau=1.0,
    mode="mix",
    tol=None,
    chunk_size=None,
    ignore_index=-100,
    logit_ulps=0.0,
    **zkw,
):
    """Compare values and gradients with the fp64 reference; returns the observed errors.

    logit_ulps > 0 widens every tolerance by logit_ulps·eps32·max|z|: fp32 logits of magnitude |z| are only
    known to ~eps32·|z|, so log p, entropy and the softmax (hence the gradients) inherit that absolute error.
    zkw: softcap= / logit_scale= for both the op and the reference.
    """
    tol = dict(tol or (FP32_TOL if x.dtype == torch.float32 else HALF_TOL))
    slack = logit_ulps * EPS32 * max_logit(x, w, b, tau, **zkw)
    lp, ent, grads = run_op(
        _op(backend, chunk_size, ignore_index=ignore_index), x, w, y, b, mode, temperature=tau, **zkw
    )
    lp_r, ent_r, grads_r = run_op(
        _ref, x, w, y, b, mode, leaf_dtype=torch.float64, temperature=tau, ignore_index=ignore_index, **zkw
    )
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == y.shape
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    ignored = y == ignore_index
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    errs = {
        "lp": (lp.double() - lp_r).abs().max().item() if lp.numel() else 0.0,
        "ent": (ent.double() - ent_r).abs().max().item() if ent.numel() else 0.0,
    }
    assert errs["lp"] <= tol["lp"] + slack, errs
    assert errs["ent"] <= tol["ent"] + slack, errs
    for name, g, g_r in zip(("hidden", "weight", "bias"), grads, grads_r):
        assert g.dtype == x.dtype and g.shape == g_r.shape and torch.isfinite(g).all(), name
        scale = g_r.abs().max().item()
        errs[name] = (g.double() - g_r).abs().max().item() / scale if scale > 0 else g.abs().max().item()
        assert errs[name] <= tol["grad"] + slack, (name, errs)
    assert (grads[0][ignored] == 0).all()  # ignored rows get exactly zero gradient
    return errs


# (shape, H, V, dtype, bias, tau, chunk_size): N, H and V divisible by no block size; batch and flat rows.
CASES = {
    "flat_fp32": ((37,), 48, 1000, torch.float32, False, 1.0, None),
    "batch_bias_tau": ((2, 9), 100, 777, torch.float32, True, 0.7, None),
    "multi_tile_chunked": ((130,), 33, 3001, torch.float32, True, 1.3, 50),
    "bf16": ((3, 17), 64, 1500, torch.bfloat16, True, 0.8, None),
    "fp16": ((50,), 72, 1203, torch.float16, False, 1.0, None),
}


@pytest.mark.parametrize("mode", ["lp", "ent", "mix"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case, mode):
    shape, h, v, dtype, bias, tau, chunk = CASES[case]
    x, w, y, b = make_inputs(shape, h, v, dtype=dtype, bias=bias, seed=len(case))
    check_against_reference(backend, x, w, y, b, tau=tau, mode=mode, chunk_size=chunk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weight_and_hidden(backend):
    """A transposed-view weight (stride (1, V)) and a hidden that is a column slice are read through strides."""
    x, w, y, b = make_inputs((2, 13), 40, 300, bias=True, seed=4)
    w_view = w.t().contiguous().t()
    x_view = torch.cat([x, x], dim=-1)[..., :40]
    assert not w_view.is_contiguous() and not x_view.is_contiguous()
    check_against_reference(backend, x_view, w_view, y, b, tau=0.9, mode="mix")


def _strided(t, how):
    """(base, view): base holds t's values at every other position along `how`, view = those values, strided."""
    if how == "cols":
        base = torch.stack([t, t.flip(-1) if t.dim() else t], dim=-1).contiguous()
        return base, lambda u: u[..., 0]
    base = torch.stack([t, t.flip(0)], dim=1).reshape(2 * t.shape[0], *t.shape[1:]).contiguous()
    return base, lambda u: u[::2]


@pytest.mark.parametrize(
    "arg", ["hidden_rows", "hidden_cols", "weight_rows", "weight_cols", "bias", "targets", "all"]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, arg):
    """Every argument may be a non-contiguous view (a bias with stride 2 gave |Δ log p| = 2.43 on the Triton path
    before its stride was honoured). Gradients flow back through the views into their bases."""
    x, w, y, b = make_inputs((29,), 40, 300, bias=True, seed=12)
    picks = {
        "x": ("hidden_rows", "hidden_cols"),
        "w": ("weight_rows", "weight_cols"),
        "b": ("bias",),
        "y": ("targets",),
    }
    inputs = dict(x=x, w=w, y=y, b=b)
    views, grads_of = {}, {}
    for name, t in inputs.items():
        chosen = [a for a in picks[name] if arg in (a, "all")][:1]
        how = "rows" if chosen and chosen[0].endswith("rows") else "cols"
        base, view = _strided(t, how) if chosen else (t.clone(), lambda u: u)
        if name != "y":
            base.requires_grad_()
        views[name] = view(base)
        grads_of[name] = (base, view)
        assert views[name].is_contiguous() != bool(chosen) and torch.equal(views[name], t)
    lp, ent = linear_logprobs(
        views["x"], views["w"], views["y"], bias=views["b"], temperature=0.9, backend=backend
    )
    a, c = upstream(y.shape, "mix")
    leaves = [grads_of[k][0] for k in ("x", "w", "b")]
    grads = torch.autograd.grad((lp * a).sum() + (ent * c).sum(), leaves)
    lp, ent = lp.detach(), ent.detach()
    grads = [grads_of[k][1](g) for k, g in zip(("x", "w", "b"), grads)]
    lp_r, ent_r, grads_r = run_op(_ref, x, w, y, b, "mix", leaf_dtype=torch.float64, temperature=0.9)
    assert (lp.double() - lp_r).abs().max() <= FP32_TOL["lp"]
    assert (ent.double() - ent_r).abs().max() <= FP32_TOL["ent"]
    for g, g_r in zip(grads, grads_r):
        assert (g.double() - g_r).abs().max() <= FP32_TOL["grad"] * g_r.abs().max()


# (shape, H, V, dtype, bias, tau, x_scale, softcap, logit_scale): saturating rows have |s·u/c| ≫ 1 (tanh ≈ ±1)
SOFTCAP_CASES = {
    "softcap": ((33,), 40, 700, torch.float32, True, 0.8, 1.0, 3.0, 1.0),
    "softcap_saturating_scaled": ((2, 9), 24, 513, torch.float32, True, 1.3, 4.0, 2.0, 1.7),
    "logit_scale_only": ((21,), 32, 400, torch.float32, False, 0.9, 1.0, None, 0.35),
    "softcap_bf16": ((19,), 48, 600, torch.bfloat16, True, 1.0, 1.0, 5.0, 0.8),
}


@pytest.mark.parametrize("mode", ["mix", "ent"])
@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_and_logit_scale(backend, case, mode):
    """z = c·tanh(s·u/c)/τ (or s·u/τ): values and exact gradients (∂z/∂u = s·(1 − tanh²)/τ) against float64."""
    shape, h, v, dtype, bias, tau, x_scale, cap, scale = SOFTCAP_CASES[case]
    x, w, y, b = make_inputs(shape, h, v, dtype=dtype, bias=bias, seed=len(case), x_scale=x_scale)
    check_against_reference(backend, x, w, y, b, tau=tau, mode=mode, softcap=cap, logit_scale=scale)


def test_softcap_changes_the_result():
    """The softcap is applied (not silently ignored): capped log-probs differ from uncapped ones."""
    x, w, y, b = make_inputs((9,), 16, 100, x_scale=4.0, ignore_frac=0.0)
    plain, _ = linear_logprobs(x, w, y, backend="torch")
    capped, _ = linear_logprobs(x, w, y, backend="torch", softcap=1.0)
    assert (plain - capped).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    x, w, y, b = make_inputs((24,), 20, 300, ignore_index=-1, ignore_frac=0.5, bias=True)
    check_against_reference(backend, x, w, y, b, ignore_index=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zeros(backend):
    x, w, y, b = make_inputs((2, 5), 16, 50, bias=True, ignore_frac=1.1)
    lp, ent, grads = run_op(_op(backend), x, w, y, b, "mix")
    assert lp.shape == ent.shape == (2, 5)
    assert (lp == 0).all() and (ent == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("shape", [(0,), (2, 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend, shape):
    x, w, y, b = make_inputs(shape, 16, 50)
    lp, ent, grads = run_op(_op(backend), x, w, y, b, "mix")
    assert lp.shape == ent.shape == shape
    assert all((g == 0).all() and g.shape == t.shape for g, t in zip(grads, (x, w)))


def _extreme(kind):
    x, w, y, b = make_inputs((40,), 32, 900, bias=True, seed=7)
    g = torch.Generator().manual_seed(8)
    if kind == "all_very_negative":  # every logit ≈ −1e4 (NaN with a running max initialised at 0)
        b = b - 1e4
    elif kind == "spread_1e4":  # logits near ±1e4: most p underflow to exactly 0
        b = b + 1e4 * torch.where(torch.rand(900, generator=g) < 0.5, -1.0, 1.0).to(DEVICE)
    elif kind == "one_hot_rows":  # large hidden norm: p ≈ one-hot, entropy ≈ 0, log p of others ≈ −hundreds
        x = x * 40
    return x, w, y, b


@pytest.mark.parametrize("kind", ["all_very_negative", "spread_1e4", "one_hot_rows"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, kind):
    x, w, y, b = _extreme(kind)
    # fp32 logits of magnitude ~1e4 carry ~1e-3 rounding (eps32·1e4) in both implementations, which the fp64
    # reference does not: widen the tolerance by 8 ulps of the largest logit (≈ 1e-2 at 1.1e4, ≈ 1e-4 at ~100;
    # observed on CPU: log p 2.9e-3, entropy 7.5e-4, gradients 3.5e-4 relative at 1.1e4).
    check_against_reference(backend, x, w, y, b, tau=0.9, mode="mix", logit_ulps=8)


def test_large_vocab_torch_backend():
    # the real Qwen2.5 vocabulary size; the chunked path holds [rows, V] blocks only
    x, w, y, b = make_inputs((3,), 16, 151_936, bias=True, ignore_frac=0.0, seed=3)
    check_against_reference("torch", x, w, y, b, tau=1.1, mode="mix")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend deselected by RED_KERNELS_BACKEND")
@pytest.mark.parametrize("splits", [2, 3])
def test_triton_vocab_splits_merge(splits):
    """Several vocabulary splits per token block merge to the chunked path's statistics."""
    triton_ops = backends.ops("triton")
    x, w, y, b = make_inputs((20,), 40, 5000, bias=True, ignore_frac=0.0, seed=5)
    got, _ = triton_ops.stats(x, w, b, y, backends.LogitMap(0.9), vocab_splits=splits)
    want = backends.forward_stats(backends.ops("torch"), x, w, b, y, 0.9)
    assert triton_ops.plan.split_layout(5000, splits)[0] == splits
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend deselected by RED_KERNELS_BACKEND")
def test_triton_backward_is_deterministic_and_forward_with_grad_matches():
    triton_ops, chunked = backends.ops("triton"), backends.ops("torch")
    x, w, y, b = make_inputs((30,), 24, 700, bias=True, ignore_frac=0.0, seed=9)
    stats = backends.forward_stats(triton_ops, x, w, b, y, 1.2)
    a, c = upstream(y.shape, "mix")
    first = backends.backward(triton_ops, x, w, b, y, 1.2, stats, a, c, chunk_size=7)
    second = backends.backward(triton_ops, x, w, b, y, 1.2, stats, a, c, chunk_size=7)
    assert all(torch.equal(p, q) for p, q in zip(first, second))

    def grad_fn(rows, logp, ent):
        return a[rows] * 2, c[rows] - 1

    got = backends.forward_with_grad(triton_ops, x, w, b, y, 1.2, grad_fn)
    want = backends.forward_with_grad(chunked, x, w, b, y, 1.2, grad_fn)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-4)


SMALL_TILE_CASES = {
    # (shape, H, V, dtype, bias, tau, vocab splits of the forward)
    "fp32_many_tiles": ((45,), 40, 700, torch.float32, True, 0.8, 3),
    "bf16_many_tiles": ((2, 11), 50, 333, torch.bfloat16, False, 1.2, 1),
    "softcap_many_tiles": ((37,), 40, 500, torch.float32, True, 0.9, 2),
}


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend deselected by RED_KERNELS_BACKEND")
@pytest.mark.parametrize("case", [*SMALL_TILE_CASES, "all_very_negative", "spread_1e4"])
def test_triton_small_tiles(case, monkeypatch):
    """16×64×16 interpreter tiles: many token blocks, vocabulary tiles (online rescaling) and H steps."""
    triton_ops = backends.ops("triton")
    monkeypatch.setattr(triton_ops, "INTERPRETER_MAX_BLOCKS", (16, 64, 16))
    if case in SMALL_TILE_CASES:
        shape, h, v, dtype, bias, tau, splits = SMALL_TILE_CASES[case]
        x, w, y, b = make_inputs(shape, h, v, dtype=dtype, bias=bias, seed=11)
        ulps = 0.0
    else:
        (x, w, y, b), tau, splits, ulps = _extreme(case), 0.9, 2, 8
    forward = triton_ops.stats
    monkeypatch.setattr(triton_ops, "stats", lambda *a, **k: forward(*a, **k, vocab_splits=splits))
    zkw = dict(softcap=2.5, logit_scale=1.3) if case.startswith("softcap") else {}
    check_against_reference("triton", x, w, y, b, tau=tau, mode="mix", chunk_size=13, logit_ulps=ulps, **zkw)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(
    max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 200),
    h=st.integers(1, 160),
    v=st.integers(2, 2500),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
    tau=st.floats(0.5, 2.0),
    x_scale=st.floats(0.1, 4.0),
    ignore_frac=st.floats(0.0, 0.6),
    mode=st.sampled_from(["lp", "ent", "mix"]),
    chunk=st.sampled_from([None, 29, 64]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(backend, n, h, v, bias, dtype, tau, x_scale, ignore_frac, mode, chunk, seed):
    x, w, y, b = make_inputs(
        (n,), h, v, dtype=dtype, bias=bias, seed=seed, x_scale=x_scale, ignore_frac=ignore_frac
    )
    check_against_reference(backend, x, w, y, b, tau=tau, mode=mode, chunk_size=chunk)


_COMPILE_SCRIPT = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from red_kernels.backends import triton_kernels as K
from red_kernels.backends.triton_plan import gpu_configs as _gpu_configs

def signature(fn, dtype, dz_dtype):
    ptr = {"x_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "y_ptr": "i64", "dz_ptr": dz_dtype}
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptr.get(name, "fp32")
        else:
            sig[name] = "fp32" if name in ("tau", "scale", "softcap") else "i32"
    return sig

config = min(_gpu_configs(), key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"])  # smallest: quick to build
variants = [(("bf16", None), False), (("fp32", "ieee"), False), (("bf16", None), True)]  # (dtype, precision), softcap
for fn, ((dtype, precision), cap) in itertools.product((K.forward_stats_kernel, K.dlogits_kernel), variants):
    consts = dict(config.kwargs, HAS_BIAS=True, HAS_SOFTCAP=cap, UPCAST=False, INPUT_PRECISION=precision, GROUP_N=0)
    if "STORE_Z" in fn.arg_names:
        consts["STORE_Z"] = False
    src = ASTSource(fn, signature(fn, dtype, dtype), constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    assert len(kernel.asm["cubin"]) > 0
print("compiled")
"""


def test_kernels_compile_for_hopper_without_gpu(tmp_path):
    """The compiled path (not the interpreter): both kernels, bf16 and fp32, lower to sm_90 cubin with the ptxas
    shipped in the triton wheel. Catches type errors the interpreter accepts; needs no GPU."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]
