"""Activation-lean RMSNorm and SwiGLU for training: the same forward, less saved for the backward.

Autograd keeps every intermediate an op needs for its gradient. In a Llama-style decoder layer two of them are
cheap to recompute and costly to keep (float32, per token and layer):

* RMSNorm  y = w ⊙ (x · r),  r = (mean(x²) + ε)^(-1/2).  Autograd keeps x and the normalised x·r (2·H floats).
  Lean: keeps x and r (H + 1); backward recomputes x̂ = x·r and
      dx = r · (g − x̂ · mean(g ⊙ x̂)),  g = dy ⊙ w;   dw = Σ_tokens dy ⊙ x̂.
* SwiGLU   h = silu(a) ⊙ b  (a = gate_proj(x), b = up_proj(x)).  Autograd keeps a, silu(a) and b (3·I).
  Lean: keeps a and b (2·I); backward recomputes σ(a) and
      da = dh ⊙ b ⊙ σ(a)·(1 + a·(1 − σ(a))),   db = dh ⊙ silu(a).

At SmolLM2-135M's shape (H = 576, I = 1536, 30 layers) that is 1.31 → 1.00 MiB of saved activations per token
(measured with saved-tensor hooks), for two elementwise recomputations in the backward. The forward runs the same
ops in the same order as transformers' modules (bit-identical outputs for float32 / bfloat16 / float16 inputs;
float64 inputs are normalised in float64, not float32); the backward is the analytic gradient, equal to autograd's
up to float round-off (tests/red/test_lean_layers.py).

`apply(model)` swaps the forward of the modules it recognises (RMSNorm and MLP classes of the Llama, Qwen2, Qwen3
and Mistral families, checked by their attributes) and leaves every other module alone; the parameters, state
dict and checkpoints are unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")


class RMSNormFunction(torch.autograd.Function):
    """y = w ⊙ (x·r).to(x.dtype), r = rsqrt(mean(x²) + eps) computed in float32 (float64 for float64 x);
    saves x and r."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xc = x.to(_compute(x))
        r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (xc * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        c = r.dtype
        xhat = x.to(c) * r
        dw = None
        if ctx.needs_input_grad[1]:
            prod = dy.to(c) * xhat.to(x.dtype).to(c)
            dw = prod.reshape(-1, prod.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = dy.to(c) * weight.to(c)
            dx = (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


def _compute(t) -> torch.dtype:
    """float32, or float64 for float64 tensors (the float64 tests check the formulas, not the round-off)."""
    return torch.promote_types(t.dtype, torch.float32)


class SiluMulFunction(torch.autograd.Function):
    """h = silu(a) ⊙ b; saves a and b."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, dh):
        a, b = ctx.saved_tensors
        c = _compute(a)
        ac, dc = a.to(c), dh.to(c)
        s = torch.sigmoid(ac)
        da = (dc * b.to(c) * s * (1 + ac * (1 - s))).to(a.dtype) if ctx.needs_input_grad[0] else None
        db = (dc * (ac * s)).to(b.dtype) if ctx.needs_input_grad[1] else None
        return da, db


def _norm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _is_norm(m) -> bool:
    return type(m).__name__ in NORM_CLASSES and hasattr(m, "variance_epsilon") and m.weight.dim() == 1


def _is_mlp(m) -> bool:
    act = getattr(m, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    parts = all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj"))
    return type(m).__name__ in MLP_CLASSES and silu and parts


def apply(model) -> dict:
    """Swap in the lean forwards on `model`'s recognised RMSNorm and SwiGLU MLP modules (in place). Returns how
    many of each were swapped: {"rmsnorm": n, "mlp": m} (both 0 for a model of another family: nothing changes)."""
    counts = {"rmsnorm": 0, "mlp": 0}
    for m in model.modules():
        if _is_norm(m):
            m.forward = types.MethodType(_norm_forward, m)
            counts["rmsnorm"] += 1
        elif _is_mlp(m):
            m.forward = types.MethodType(_mlp_forward, m)
            counts["mlp"] += 1
    return counts
