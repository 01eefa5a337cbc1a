"""`red_loss`: the mixed GRPO / offline (LUFFY, RED) / SFT policy loss straight from hidden states.

The vocabulary work is one fused sweep (fused_linear_loss); everything else is O(tokens) math from
policy_loss. Shapes: B sequences of T positions; H hidden size; V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends, vocab_parallel
from ._validate import check_linear_inputs, check_same_shape
from .fused_linear_loss import fused_linear_token_loss
from .logprobs import compact_rows, linear_logprobs, scatter_rows, without_autocast
from .policy_loss import REDLossConfig, aggregation_weights, shaping, token_terms
from .sequences import per_token, sequence_index

METRIC_KEYS = (
    "pg_online",
    "pg_offline",
    "sft",
    "entropy_bonus",
    "kl",
    "clip_frac_low",
    "clip_frac_high",
    "ratio_mean",
    "entropy_online",
    "entropy_offline",
    "teacher_prob",
    "phi_mean",
)


@dataclass
class REDLossOutput:
    """loss: 0-dim differentiable. logprobs, entropy: [B, T] fp32, detached, 0 outside loss_mask.
    metrics: 0-dim detached tensors (call .item() when logging; no host sync inside the op)."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict


def _per_seq(name, t):
    """A per-sequence input ([S] tensor, list, or None) as a tensor, or None."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float32)
    if t.dim() != 1:
        raise ValueError(f"{name} must be per sequence, shape [S], got {tuple(t.shape)}")
    return t


def _check_inputs(
    targets,
    advantages,
    loss_mask,
    offline_mask,
    r_bar,
    w,
    old,
    ref,
    is_w,
    cfg,
    global_normalizer,
    sequence_ids,
):
    if targets.dim() != 2:
        raise ValueError(f"targets must be [B, T] (sequences × positions), got shape {tuple(targets.shape)}")
    check_same_shape(
        "targets",
        targets,
        loss_mask=loss_mask,
        offline_mask=offline_mask,
        old_logprobs=old,
        ref_logprobs=ref,
        is_weights=is_w,
    )
    if (
        not isinstance(advantages, torch.Tensor)
        or advantages.dim() not in (1, 2)
        or (advantages.dim() == 2 and advantages.shape != targets.shape)
    ):
        shape = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(
            f"advantages must be per sequence [S] (S = B without sequence_ids) or per token "
            f"[B, T]={tuple(targets.shape)}, got {shape}"
        )
    per_seq = {
        "advantages": advantages if advantages.dim() == 1 else None,
        "group_accuracy": r_bar,
        "offline_weight": w,
    }
    ids, n_seq = sequence_index(sequence_ids, targets, loss_mask.bool(), per_seq)
    if sequence_ids is not None and cfg.loss_agg == "seq_sum_const" and cfg.loss_const is None:
        raise ValueError(
            "loss_agg='seq_sum_const' with sequence_ids needs REDLossConfig.loss_const (C, e.g. the "
            "maximum response length): the packed row length T is not a sequence length"
        )
    mask = loss_mask.bool()
    off = torch.zeros_like(mask) if offline_mask is None else offline_mask.bool()
    if bool((off & ~mask).any()):
        raise ValueError(
            "offline_mask marks tokens where loss_mask is off: teacher tokens must be loss tokens "
            "(use offline_mask & loss_mask)"
        )
    if bool((mask & (targets == cfg.ignore_index)).any()):
        raise ValueError(
            f"loss_mask is on where targets == ignore_index ({cfg.ignore_index}); "
            "mask those positions out of loss_mask"
        )
    adv = advantages if advantages.dim() == 2 else per_token(advantages, ids)
    if not bool(torch.isfinite(adv[mask]).all()):
        raise ValueError("advantages contain NaN/inf on loss tokens (a group with zero std and no epsilon?)")
    for name, t in (("old_logprobs", old), ("ref_logprobs", ref), ("is_weights", is_w)):
        if t is not None and not bool(torch.isfinite(t[mask]).all()):
            raise ValueError(f"{name} contain NaN/inf on loss tokens")
    if r_bar is not None and not bool(((r_bar >= 0) & (r_bar <= 1)).all()):
        raise ValueError(
            f"group_accuracy (r̄) must be in [0, 1], got min {float(r_bar.min())}, max {float(r_bar.max())}"
        )
    if w is not None and not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError("offline_weight (w) must be finite and ≥ 0")
    if global_normalizer is not None:
        g = float(global_normalizer)
        if not (g > 0 and g != float("inf")):
            raise ValueError(
                f"global_normalizer must be a finite number > 0 (sequences for seq_*, tokens for "
                f"token_mean, over the whole batch), got {global_normalizer!r}; pass None to use "
                "this call's own count"
            )
    if cfg.kl_coef and ref is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs [B, T]")
    if cfg.offline_shaping == "accuracy_shift" and r_bar is None and bool(off.any()):
        raise ValueError(
            "offline_shaping='accuracy_shift' needs group_accuracy [S] (the group's mean accuracy r̄) "
            "when there are offline tokens"
        )
    return mask, off, adv, ids, n_seq


@without_autocast
def red_loss(
    hidden,
    weight,
    targets,
    advantages,
    *,
    loss_mask,
    old_logprobs=None,
    offline_mask=None,
    group_accuracy=None,
    offline_weight=None,
    ref_logprobs=None,
    is_weights=None,
    bias=None,
    config: REDLossConfig | None = None,
    global_normalizer=None,
    sequence_ids=None,
    backend=None,
    chunk_size=None,
    check_inputs=True,
    process_group=None,
    vocab_start=None,
    reduce_hidden_grad=True,
    **config_overrides,
) -> REDLossOutput:
    """The RED policy loss (and its baselines GRPO / LUFFY / SFT by configuration) from hidden states.

    Args:
        hidden: [B, T, H] last hidden states at the positions that predict `targets`.
        weight: [V, H] lm_head weight (bias: optional [V]).
        targets: [B, T] token ids (ignore_index allowed outside loss_mask).
        advantages: [S] (per sequence; S = B without sequence_ids) or [B, T] advantages A (the offline weight w
            is applied here, not by the caller).
        loss_mask: [B, T] bool/0-1, the response tokens that carry loss.
        old_logprobs: [B, T] log p_old of online tokens; None → ρ ≡ 1 (one update per rollout batch).
        offline_mask: [B, T] bool, teacher-trace tokens (subset of loss_mask); None → all online.
        group_accuracy: [S] r̄ of each sequence's group (offline_shaping='accuracy_shift').
        offline_weight: [S] w, the entropy-ratio weight of offline sequences (default 1).
        ref_logprobs: [B, T] reference-policy log-probs (kl_coef > 0).
        is_weights: [B, T] truncated importance weights for online tokens (rollout-engine mismatch).
        config / **config_overrides: REDLossConfig fields (clip_eps_low, offline_shaping, loss_agg, temperature,
            softcap, logit_scale, ...).
        global_normalizer: sequences (seq_*) or tokens (token_mean) of the whole batch across micro-batches
            and ranks, so accumulated micro-batch gradients equal the full-batch gradient (default: this call's
            S sequences, or its loss tokens).
        sequence_ids: None (row b is sequence b), or [B, T] ([T] when B = 1) int ids for packed rows: id k in
            [0, S) marks sequence k's positions — ONE contiguous run inside one row — and indexes the
            per-sequence inputs (advantages[k], group_accuracy[k], offline_weight[k]); −1 marks positions of no
            sequence (padding, the unused tail of a row), which must be outside loss_mask; prompt positions
            may take k or −1. S = the per-sequence inputs' length (max id + 1 if there are none). seq_mean
            divides by each sequence's own loss-token count; seq_sum_const then needs loss_const (see
            red_kernels/sequences.py). Packed and padded layouts of the same sequences give the same loss.
        backend, chunk_size, check_inputs: as in linear_logprobs.
        process_group, vocab_start, reduce_hidden_grad: vocabulary-parallel weight shards, as in
            linear_logprobs; every rank computes the (cheap, O(tokens)) loss stage redundantly and returns the same
            loss, log-probs and metrics; weight/bias gradients are the shard's.

    Under a caller's torch.autocast the op computes exactly as outside it (autocast is off inside it; its
    gradients are formed in this call), with the same output and gradient dtypes.
    """
    cfg = REDLossConfig.build(config, **config_overrides)
    name = backends.resolve(
        backend, hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    )
    shard = vocab_parallel.setup(process_group, weight, hidden, vocab_start, reduce_hidden_grad, name)
    vocab_parallel.checked(
        shard,
        lambda: check_linear_inputs(
            hidden,
            weight,
            targets,
            bias,
            cfg.temperature,
            cfg.ignore_index,
            check_inputs,
            softcap=cfg.softcap,
            logit_scale=cfg.logit_scale,
            vocab=None if shard is None else shard.vocab,
        ),
    )
    r_bar = _per_seq("group_accuracy", group_accuracy)
    w = _per_seq("offline_weight", offline_weight)
    mask, off, adv, ids, n_seq = _check_inputs(
        targets,
        advantages,
        loss_mask,
        offline_mask,
        r_bar,
        w,
        old_logprobs,
        ref_logprobs,
        is_weights,
        cfg,
        global_normalizer,
        sequence_ids,
    )
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    on = mask & ~off
    agg = aggregation_weights(
        mask.to(**f32), cfg, global_normalizer, None if sequence_ids is None else ids, n_seq
    )

    def seq(t, fill):
        return per_token(torch.full((max(n_seq, 1),), fill, **f32) if t is None else t.to(**f32), ids)

    side_full = {
        "online": on.to(**f32),
        "offline": off.to(**f32),
        "adv": adv.to(**f32),
        "agg": agg,
        "r_bar": seq(r_bar, 0.5),
        "w": seq(w, 1.0),
        "is_w": torch.ones(targets.shape, **f32) if is_weights is None else is_weights.to(**f32),
        "old_logp": None if old_logprobs is None else old_logprobs.to(**f32),
        "ref_logp": None if ref_logprobs is None else ref_logprobs.to(**f32),
    }
    eff_targets = torch.where(mask, targets, torch.full_like(targets, cfg.ignore_index))
    if name == "reference":
        logp, ent = linear_logprobs(
            hidden,
            weight,
            eff_targets,
            bias=bias,
            temperature=cfg.temperature,
            ignore_index=cfg.ignore_index,
            backend="reference",
            check_inputs=False,
            softcap=cfg.softcap,
            logit_scale=cfg.logit_scale,
        )
        side = {k: (v.reshape(-1) if v is not None else None) for k, v in side_full.items()}
        loss = _weighted_loss(logp.reshape(-1), ent.reshape(-1), side, cfg)
        logp_d, ent_d = logp.detach(), ent.detach()
    else:
        x, y, index = compact_rows(hidden, eff_targets, cfg.ignore_index)
        side = {
            k: (v.reshape(-1).index_select(0, index) if v is not None else None) for k, v in side_full.items()
        }

        def token_loss(rows, lp, h):
            return _weighted_loss(
                lp, h, {k: (v[rows] if v is not None else None) for k, v in side.items()}, cfg
            )

        zmap = backends.LogitMap(
            float(cfg.temperature),
            float(cfg.logit_scale),
            None if cfg.softcap is None else float(cfg.softcap),
        )
        if shard is not None:
            y = vocab_parallel.local_targets(y, shard, weight.shape[0])
        loss, logp_c, ent_c = fused_linear_token_loss(
            x, weight, bias, y, zmap, token_loss, backends.ops(name), chunk_size, shard
        )
        n = targets.numel()
        logp_d = scatter_rows(logp_c, index, n, targets.shape)
        ent_d = scatter_rows(ent_c, index, n, targets.shape)
    metrics = _metrics(logp_d, ent_d, side_full, mask, on, off, cfg)
    return REDLossOutput(loss=loss, logprobs=logp_d, entropy=ent_d, metrics=metrics)


def _sanitised(logp, side):
    """Side inputs with the old log-probs of non-online tokens replaced by log p (ρ = 1 there), so a masked-out
    term can never produce inf·0 = NaN."""
    old = side["old_logp"]
    s = dict(side)
    s["old_logp"] = logp.detach() if old is None else torch.where(side["online"] > 0, old, logp.detach())
    if s["ref_logp"] is not None:
        s["ref_logp"] = torch.where(side["agg"] > 0, s["ref_logp"], logp.detach())
    return s


def _weighted_loss(logp, ent, side, cfg):
    terms = token_terms(logp, ent, _sanitised(logp, side), cfg)
    return sum((side["agg"] * t).sum() for t in terms.values())


def _metrics(logp, ent, side, mask, on, off, cfg):
    """Loss components (aggregated like the loss) and diagnostics, all detached 0-dim tensors."""
    with torch.no_grad():
        s = _sanitised(logp, side)
        terms = token_terms(logp, ent, s, cfg)
        out = {
            k: (side["agg"] * terms[k]).sum() if k in terms else logp.new_zeros(())
            for k in ("pg_online", "pg_offline", "sft", "entropy_bonus", "kl")
        }

        def mean(v, m):
            return (v * m).sum() / m.sum().clamp(min=1)

        ratio = (logp - s["old_logp"]).exp()
        onf, offf = on.float(), off.float()
        adv = side["adv"]
        out["clip_frac_low"] = mean(((ratio < 1 - cfg.clip_eps_low) & (adv < 0)).float(), onf)
        out["clip_frac_high"] = mean(((ratio > 1 + cfg.clip_eps_high) & (adv > 0)).float(), onf)
        out["ratio_mean"] = mean(ratio, onf)
        out["entropy_online"] = mean(ent, onf)
        out["entropy_offline"] = mean(ent, offf)
        p = logp.exp()
        out["teacher_prob"] = mean(p, offf)
        out["phi_mean"] = mean(shaping(p, side["r_bar"], cfg), offf)
    return out


class FusedLinearREDLoss(torch.nn.Module):
    """Module form of red_loss: holds the REDLossConfig; forward(hidden, weight, targets, advantages, **kw)."""

    def __init__(self, config: REDLossConfig | None = None, backend=None, **config_overrides):
        super().__init__()
        self.config = REDLossConfig.build(config, **config_overrides)
        self.backend = backend

    def forward(self, hidden, weight, targets, advantages, **kwargs) -> REDLossOutput:
        kwargs.setdefault("backend", self.backend)
        return red_loss(hidden, weight, targets, advantages, config=self.config, **kwargs)

    def extra_repr(self):
        return repr(self.config)
