"""red_kernels under a caller's `torch.autocast` region (CPU bf16 autocast here; CUDA autocast is the same code).

The ops have their own precision policy (fp32 logits/statistics, fp32 dX/dW accumulation), so inside autocast they
must compute exactly what they compute outside it for the same input dtypes: autocast is disabled inside them
(forward and backward). The comparison is BITWISE (torch.equal): with autocast off the very same kernels run on
the very same dtypes and shapes, and CPU GEMMs / the Triton interpreter are deterministic for a fixed thread count,
so any difference at all means autocast re-cast something. Forward AND backward run inside the autocast region
(the harsher case: a custom Function's backward sees the autocast state of the thread calling .backward()).
"""

import pytest
import torch

from red_kernels import FusedLinearREDLoss, linear_logprobs, red_loss

AC = dict(device_type="cpu", dtype=torch.bfloat16)
BACKENDS = ["torch", "triton"]  # triton: the kernels in Triton's interpreter (tests/conftest.py)
DTYPES = [torch.float32, torch.bfloat16]
B, T, H, V = 2, 7, 24, 53  # odd sizes: no block size divides them


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = -100  # prompt positions: ignored rows
    return hidden, weight, targets


def _grads(fn, hidden, weight, autocast, ac=AC):
    """(outputs, d hidden, d weight) of fn(h, w) -> (outputs, scalar), forward and backward in or out of autocast."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    with torch.autocast(**ac, enabled=autocast):
        outs, scalar = fn(h, w)
        scalar.backward()
    return [o.detach() for o in outs], h.grad, w.grad


def _assert_bitwise(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), f"max |diff| {(x.float() - y.float()).abs().max().item()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_logprobs_same_under_autocast(backend, dtype):
    hidden, weight, targets = _inputs(dtype)
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    def fn(h, w):  # gradient through both log p and entropy; chunk_size=3 forces several row chunks
        lp, ent = linear_logprobs(h, w, targets, backend=backend, chunk_size=3, temperature=0.7)
        return (lp, ent), (lp * g_lp).sum() + (ent * g_h).sum()

    out, dh, dw = _grads(fn, hidden, weight, autocast=False)
    out_ac, dh_ac, dw_ac = _grads(fn, hidden, weight, autocast=True)
    assert out[0].dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    _assert_bitwise(out + [dh, dw], out_ac + [dh_ac, dw_ac])


CONFIGS = {
    "red": dict(offline_shaping="accuracy_shift", loss_agg="seq_sum_const", entropy_coef=0.01),
    "grpo": dict(offline_shaping="none", loss_agg="seq_mean", clip_eps_high=0.2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_red_loss_same_under_autocast(backend, dtype, config):
    hidden, weight, targets = _inputs(dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    mask = targets != -100
    old = torch.where(mask, -torch.rand(B, T, generator=g) * 3, 0.0)
    extra = {}
    if config == "red":  # row 1 is a teacher (offline) trace
        extra = dict(offline_mask=mask & (torch.arange(B)[:, None] == 1), group_accuracy=[0.25, 0.25])

    def fn(h, w):
        out = red_loss(
            h,
            w,
            targets,
            torch.tensor([0.7, -1.3]),
            loss_mask=mask,
            old_logprobs=old,
            backend=backend,
            chunk_size=4,
            **CONFIGS[config],
            **extra,
        )
        return (out.loss, out.logprobs, out.entropy, *out.metrics.values()), out.loss

    out, dh, dw = _grads(fn, hidden, weight, autocast=False)
    out_ac, dh_ac, dw_ac = _grads(fn, hidden, weight, autocast=True)
    assert out[0].dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    _assert_bitwise(out + [dh, dw], out_ac + [dh_ac, dw_ac])


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_same_under_autocast(backend):
    hidden, weight, targets = _inputs(torch.bfloat16, seed=4)
    loss_fn = FusedLinearREDLoss(backend=backend, offline_shaping="none", loss_agg="token_mean")

    def fn(h, w):
        out = loss_fn(h, w, targets, torch.tensor([1.0, -0.5]), loss_mask=targets != -100)
        return (out.loss, out.logprobs), out.loss

    out, dh, dw = _grads(fn, hidden, weight, autocast=False)
    out_ac, dh_ac, dw_ac = _grads(fn, hidden, weight, autocast=True)
    _assert_bitwise(out + [dh, dw], out_ac + [dh_ac, dw_ac])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_from_autocast_matmul(backend):
    """A model under autocast hands out bf16 hidden states while the lm_head weight stays fp32. Mixed dtypes are
    a TypeError outside autocast (the op never guesses a precision), and stay the same error inside it; the fix
    the message names (cast the hidden states to the weight's dtype) then gives exactly the fp32 result."""
    _, weight, targets = _inputs(torch.float32, seed=5)
    x = torch.randn(B, T, 16, generator=torch.Generator().manual_seed(6))
    proj = torch.randn(16, H, generator=torch.Generator().manual_seed(7))
    with torch.autocast(**AC):
        hidden = x @ proj
    assert hidden.dtype == torch.bfloat16 and weight.dtype == torch.float32
    for autocast in (False, True):
        with torch.autocast(**AC, enabled=autocast):
            with pytest.raises(
                TypeError,
                match=r"hidden \(torch.bfloat16\) and weight \(torch.float32\) must "
                r"share a dtype: cast one of them, e.g. hidden.to\(weight.dtype\)",
            ):
                linear_logprobs(hidden, weight, targets, backend=backend)
            with pytest.raises(TypeError, match="must share a dtype"):
                red_loss(hidden, weight, targets, torch.ones(B), loss_mask=targets != -100, backend=backend)

    def fn(h, w):
        lp, ent = linear_logprobs(h.to(w.dtype), w, targets, backend=backend)
        return (lp, ent), lp.sum() - ent.sum()

    out, dh, dw = _grads(fn, hidden, weight, autocast=False)
    out_ac, dh_ac, dw_ac = _grads(fn, hidden, weight, autocast=True)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.float32
    _assert_bitwise(out + [dh, dw], out_ac + [dh_ac, dw_ac])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ac_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_under_cuda_autocast(backend, ac_dtype, dtype, monkeypatch):
    """The same on the GPU under CUDA autocast (bf16 and fp16): linear_logprobs and red_loss, bit for bit. The
    Triton tile config is pinned so both calls run the same kernels (no atomics: reproducible)."""
    monkeypatch.setenv("RED_KERNELS_TRITON_CONFIG", "default")
    ac = dict(device_type="cuda", dtype=ac_dtype)
    hidden, weight, targets = (t.cuda() for t in _inputs(dtype, seed=8))
    mask = targets != -100

    def fn(h, w):
        lp, ent = linear_logprobs(h, w, targets, backend=backend)
        out = red_loss(
            h, w, targets, torch.tensor([0.7, -1.3], device="cuda"), loss_mask=mask, backend=backend
        )
        return (lp, ent, out.loss, out.logprobs), (lp - ent).sum() + out.loss

    out, dh, dw = _grads(fn, hidden, weight, autocast=False, ac=ac)
    out_ac, dh_ac, dw_ac = _grads(fn, hidden, weight, autocast=True, ac=ac)
    _assert_bitwise(out + [dh, dw], out_ac + [dh_ac, dw_ac])
