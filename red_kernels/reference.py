"""Plain float64 references that materialise the full [N, V] logits: for tests, checks and benchmarks only
(O(N·V) memory). `backend="reference"` of the public ops answers from `reference_logprobs`.

`naive_red_loss` is written directly from red-algorithm.md steps 7–8 (not from red_kernels.policy_loss), so tests
compare two implementations of the formulas, not one with itself. It is the one RED-loss reference of the repo.
"""

from __future__ import annotations

import torch


def reference_logits(hidden, weight, bias=None, temperature=1.0, softcap=None, logit_scale=1.0):
    """float64 logits [..., V]: z = s·u/τ, or c·tanh(s·u/c)/τ with a softcap c; u = hidden·weightᵀ + bias."""
    u = hidden.double() @ weight.double().t()
    if bias is not None:
        u = u + bias.double()
    u = u * logit_scale
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u / temperature


def reference_logprobs(
    hidden,
    weight,
    targets,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    *,
    softcap=None,
    logit_scale=1.0,
    top_k=None,
):
    """log p(targets) and entropy, both [...] like targets, computed in float64 with autograd.

    With top_k, p is the softmax over the tokens whose logit is at least the row's k-th largest, plus the target.
    Ignored rows give 0. Returned tensors are float64 and differentiable w.r.t. hidden/weight/bias
    (which are upcast to float64 inside, so gradients flow back in their own dtype).
    """
    y = targets.reshape(-1)
    z = reference_logits(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, temperature, softcap, logit_scale
    )
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.detach().sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        keep = (z.detach() >= kth) | torch.nn.functional.one_hot(safe_y, z.shape[-1]).bool()
        z = z.masked_fill(~keep, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, safe_y[:, None]).squeeze(1)
    p_all = logp_all.exp()
    entropy = -(p_all * torch.where(p_all > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    zero = torch.zeros_like(logp)
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero)
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)


def naive_red_loss(
    hidden,
    weight,
    targets,
    adv,
    mask,
    *,
    old=None,
    offline=None,
    r_bar=None,
    w=None,
    ref=None,
    is_w=None,
    bias=None,
    clip_eps_low=0.2,
    clip_eps_high=0.28,
    dual_clip=None,
    offline_shaping="accuracy_shift",
    shaping_gamma=0.1,
    r_min=1 / 16,
    sft_coef=0.0,
    entropy_coef=0.0,
    kl_coef=0.0,
    temperature=1.0,
    loss_agg="seq_sum_const",
    loss_const=None,
    normalizer=None,
    softcap=None,
    logit_scale=1.0,
):
    """The RED loss (0-dim float64, differentiable) of [B, T] sequences; keyword names as red_loss/REDLossConfig
    (old, offline, r_bar, w, ref, is_w = old_logprobs, offline_mask, group_accuracy, offline_weight,
    ref_logprobs, is_weights; normalizer = global_normalizer)."""
    B, T = targets.shape
    logsm = torch.log_softmax(
        reference_logits(hidden, weight, bias, temperature, softcap, logit_scale), dim=-1
    )
    logp = logsm.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    m = mask.double()
    offline = torch.zeros_like(mask) if offline is None else offline
    off = offline.double()
    on = m * (1 - off)
    A = adv.double() if adv.dim() == 2 else adv.double()[:, None].expand(B, T)
    old_lp = logp.detach() if old is None else torch.where(on > 0, old.double(), logp.detach())
    ratio = torch.exp(logp - old_lp)
    clipped = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    pg = -torch.min(ratio * A, clipped * A)
    if dual_clip is not None:
        pg = torch.where(A < 0, torch.min(pg, -dual_clip * A), pg)
    if is_w is not None:
        pg = pg * is_w.double()
    p = logp.exp()
    if offline_shaping == "none":
        phi = p
    elif offline_shaping == "luffy":
        phi = p / (p + shaping_gamma)
    else:
        r = (torch.full((B,), 0.5) if r_bar is None else r_bar).double().clamp(r_min, 1 - r_min)[:, None]
        phi = p / (r + (1 - r) * p)
    wt = (torch.ones(B) if w is None else w).double()[:, None]
    per_tok = on * pg + off * (-phi * wt * A) + off * sft_coef * wt * (-logp)
    per_tok = per_tok - entropy_coef * ent * m
    if kl_coef:
        d = torch.where(m > 0, ref.double(), logp.detach()) - logp
        per_tok = per_tok + kl_coef * (torch.exp(d) - d - 1) * m
    per_tok = per_tok * m
    if loss_agg == "token_mean":
        return per_tok.sum() / (m.sum().clamp(min=1) if normalizer is None else normalizer)
    G = B if normalizer is None else normalizer
    if loss_agg == "seq_mean":
        return (per_tok.sum(1) / m.sum(1).clamp(min=1)).sum() / G
    C = T if loss_const is None else loss_const
    return per_tok.sum() / (C * G)
