"""Activation-lean RMSNorm and SwiGLU (red/lean_layers.py): the same forward bit for bit, gradients equal to
autograd's in float64 and close in float32 / bfloat16, less saved for the backward, and only the recognised
modules swapped (a whole Llama and Qwen2 model: same loss and gradients as without)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_packing import tiny_llama

from red import lean_layers
from red.lean_layers import RMSNormFunction, SiluMulFunction


def _reference_norm(x, w, eps):
    """transformers' RMSNorm forward (float32 inside), or in float64 for float64 x."""
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    return w * (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(1, 1, 3), (2, 5, 7), (3, 17, 64), (4, 33)]),
    seed=st.integers(0, 1000),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
)
def test_rmsnorm_matches_autograd_in_float64(shape, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = _reference_norm(x, w, 1e-6)
    dx_ref, dw_ref = torch.autograd.grad(ref, (x, w), dy)
    got = RMSNormFunction.apply(x, w, 1e-6)
    dx, dw = torch.autograd.grad(got, (x, w), dy)
    assert torch.equal(got, ref)
    assert torch.allclose(dx, dx_ref, rtol=1e-10, atol=1e-12 / scale)
    assert torch.allclose(dw, dw_ref, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(1, 1), (2, 5, 7), (3, 9, 40)]), seed=st.integers(0, 1000))
def test_silu_mul_matches_autograd_in_float64(shape, seed):
    g = torch.Generator().manual_seed(seed)
    a = (4 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    dh = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = F.silu(a) * b
    ref_grads = torch.autograd.grad(ref, (a, b), dh)
    got = SiluMulFunction.apply(a, b)
    grads = torch.autograd.grad(got, (a, b), dh)
    assert torch.equal(got, ref)
    for x, y in zip(grads, ref_grads):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_gradients_stay_close_to_float64(dtype):
    """In float32 / bfloat16 inputs (float32 weight, as under autocast), the lean backward is no further from the
    float64 gradient than autograd's own."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(4, 9, 48, generator=g, dtype=torch.float64)
    w64 = 1 + 0.1 * torch.randn(48, generator=g, dtype=torch.float64)
    dy64 = torch.randn(4, 9, 48, generator=g, dtype=torch.float64)
    exact = torch.autograd.grad(_reference_norm(x64.requires_grad_(), w64, 1e-6), x64, dy64)[0]
    errs = []
    for fn in (_reference_norm, RMSNormFunction.apply):
        x = x64.detach().to(dtype).requires_grad_()
        w = w64.float()
        y = fn(x, w, 1e-6)
        dx = torch.autograd.grad(y, x, dy64.to(y.dtype))[0]
        errs.append(float((dx.double() - exact).norm() / exact.norm()))
    assert errs[1] <= 1.5 * errs[0] + 1e-7, errs
    a, b = (torch.randn(4, 9, 40, generator=g).to(dtype).requires_grad_() for _ in range(2))
    dh = torch.randn(4, 9, 40, generator=g).to(dtype)
    ref = torch.autograd.grad(F.silu(a) * b, (a, b), dh)
    got = torch.autograd.grad(SiluMulFunction.apply(a, b), (a, b), dh)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for x, y in zip(got, ref):
        assert torch.allclose(x.float(), y.float(), rtol=tol, atol=tol)


def _saved_bytes(model, ids):
    """Bytes autograd saves for the backward of model(ids), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(seen.values())


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_lean_model_gives_the_same_loss_and_gradients_and_saves_less(family):
    model = tiny_model(seed=0)[0] if family == "qwen2" else tiny_llama("sdpa")
    lean = copy.deepcopy(model)
    layers = model.config.num_hidden_layers
    assert lean_layers.apply(lean) == {"rmsnorm": 2 * layers + 1, "mlp": layers}
    ids = torch.randint(3, 200, (2, 23))
    runs = []
    for m in (model, lean):
        m.zero_grad()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        runs.append((out.logits.detach(), [p.grad.clone() for p in m.parameters()]))
    (l1, g1), (l2, g2) = runs
    assert torch.equal(l1, l2)  # the forward is bit-identical
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max().clamp_min(1e-12)))
    assert _saved_bytes(lean, ids) < 0.85 * _saved_bytes(model, ids)
    assert lean.state_dict().keys() == model.state_dict().keys()


def test_other_modules_are_left_alone():
    class RMSNorm(torch.nn.Module):  # another family's norm (e.g. Gemma's 1 + w): not recognised
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

    net = torch.nn.Sequential(RMSNorm(), torch.nn.Linear(4, 4), torch.nn.SiLU())
    assert lean_layers.apply(net) == {"rmsnorm": 0, "mlp": 0}
    assert all("forward" not in m.__dict__ for m in net.modules())


@pytest.mark.parametrize("lean, checkpointing", [(True, False), (False, True)])
def test_the_trainer_builds_its_model_with_the_configured_layers(tmp_path, lean, checkpointing):
    from types import SimpleNamespace

    from red.config import load_config
    from red.train import build_model

    cfg = load_config(
        None,
        [
            f"model.lean_layers={str(lean).lower()}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
        ],
    )
    model, _, _ = build_model(cfg, "cpu", SimpleNamespace(warmup=str(tmp_path / "warmup")), None)
    swapped = [m for m in model.modules() if "forward" in m.__dict__]
    layers = model.config.num_hidden_layers
    assert len(swapped) == (3 * layers + 1 if lean else 0)
    on = "is_activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else None
    assert getattr(model, on or "is_gradient_checkpointing") == checkpointing
