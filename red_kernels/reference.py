"""Plain float64 reference: materialises the full [N, V] logits. For tests and checks only (O(N·V) memory)."""
from __future__ import annotations

import torch


def reference_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """log p(targets) and entropy, both [...] like targets, computed in float64 with autograd.

    Ignored rows give 0. Returned tensors are float64 and differentiable w.r.t. hidden/weight/bias
    (which are upcast to float64 inside, so gradients flow back in their own dtype).
    """
    x = hidden.reshape(-1, hidden.shape[-1]).double()
    y = targets.reshape(-1)
    z = x @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    logp = logp_all.gather(1, safe_y[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros_like(logp)
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero)
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)
