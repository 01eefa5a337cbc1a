"""Input checks shared by every public op. Each error names the argument and says how to fix it."""

from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """True when t holds no NaN/inf, in one read-only pass: NaN and ±inf survive a sum (inf − inf = NaN), so a
    finite fp32 sum proves finiteness; only a non-finite sum (or an overflow of huge finite values) needs the
    exact elementwise check."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def check_positive(name, value, allow_none=False):
    """A finite number > 0 (or None when allow_none), else ValueError naming `name`."""
    if value is None and allow_none:
        return
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
        and value != float("inf")
    )
    if not ok:
        raise ValueError(
            f"{name} must be a finite number > 0{' or None' if allow_none else ''}, got {value!r}"
        )


def check_top_k(top_k):
    """None, or an int k ≥ 1 (a bool is not a k), else ValueError naming top_k."""
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(
            f"top_k must be None (full softmax) or an int >= 1 (the sampler's top-k), got {top_k!r}; "
            "a sampler's top_k=0 or -1 means no truncation: pass None"
        )


def check_linear_inputs(
    hidden,
    weight,
    targets,
    bias,
    temperature,
    ignore_index,
    check_values,
    *,
    softcap=None,
    logit_scale=1.0,
    vocab=None,
    top_k=None,
):
    """Validate the (hidden, weight, targets, bias, temperature, softcap, logit_scale) of a fused linear op.
    vocab: the global vocabulary size for the target range check (default weight.shape[0])."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"hidden must be a floating tensor (fp32/bf16/fp16), got {hidden.dtype}")
    if weight.dtype not in _FLOATS:
        raise TypeError(f"weight must be a floating tensor (fp32/bf16/fp16), got {weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype: cast one of them, "
            "e.g. hidden.to(weight.dtype)"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H] (the lm_head weight), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [..., H] with H = weight.shape[1] = {weight.shape[1]}, got shape {tuple(hidden.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    devices = {hidden.device, weight.device, targets.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype not in _FLOATS:
            raise TypeError(f"bias must be floating, got {bias.dtype}")
        devices.add(bias.device)
    if len(devices) > 1:
        raise ValueError(
            f"hidden, weight, targets and bias must be on one device, got {sorted(map(str, devices))}"
        )
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if temperature != temperature or temperature == float("inf"):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    check_positive("softcap", softcap, allow_none=True)
    check_positive("logit_scale", logit_scale)
    check_top_k(top_k)
    if check_values:
        vocab = weight.shape[0] if vocab is None else vocab
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"targets must be in [0, {vocab}) or ignore_index={ignore_index}; targets{list(first)} = "
                f"{int(targets[first])}. Check the tokenizer/vocab size against weight.shape[0]."
            )
        for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            if t is not None and t.numel() and not all_finite(t):
                raise ValueError(
                    f"{name} contains NaN or inf values; the op would return NaN gradients. "
                    "Find where they appear upstream (e.g. torch.autograd.set_detect_anomaly) or skip the batch."
                )


def check_same_shape(ref_name, ref, **tensors):
    """Raise ValueError unless every given tensor (None allowed) has the shape of `ref`."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
            )
