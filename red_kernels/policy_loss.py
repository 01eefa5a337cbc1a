"""The RED policy loss per token, as pure functions (red-algorithm.md, steps 7–8). No vocabulary work here.

Online token:   ℓ = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) · is_w,   ρ = exp(log p − log p_old)
                (dual clip c > 1: for A < 0 the loss is capped at −c·A)
Offline token:  ℓ = −φ(p)·w·A + sft_coef·w·(−log p),   p = exp(log p), with φ by `offline_shaping`:
                none: φ = p;   luffy: φ = p/(p + γ);
                accuracy_shift (RED's accuracy-aware policy shift): φ = p/(r̄ + (1 − r̄)·p), r̄ ∈ [r_min, 1 − r_min]
Every token:    − entropy_coef·H + kl_coef·(exp(log p_ref − log p) − (log p_ref − log p) − 1)
Aggregation:    loss = Σ_tokens a_t·ℓ_t with a_t from `loss_agg` (see aggregation_weights).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch

SHAPINGS = ("accuracy_shift", "luffy", "none")  # RED's first: the order error messages list them in
SHAPING_ALIASES = {"red": "accuracy_shift"}  # old name -> new name (deprecated)
AGGREGATIONS = ("seq_sum_const", "token_mean", "seq_mean")  # see aggregation_weights
TOKEN_NORMALISED = ("token_mean",)  # aggregations whose global_normalizer counts loss tokens (else sequences)


@dataclass
class REDLossConfig:
    """Configuration of the RED / LUFFY / GRPO / SFT policy loss. Defaults are the RED defaults."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    dual_clip: float | None = None  # c > 1 caps the loss of negative-advantage tokens at −c·A
    offline_shaping: str = (
        "accuracy_shift"  # 'none' | 'luffy' | 'accuracy_shift' (old name 'red': deprecated)
    )
    shaping_gamma: float = 0.1  # γ of LUFFY shaping
    r_min: float = 1.0 / 16  # clamp r̄ to [r_min, 1 − r_min]; the trainer passes 1/(2n)
    sft_coef: float = 0.0  # extra NLL on offline tokens, weighted by w
    entropy_coef: float = 0.0  # entropy bonus (subtracted) on every loss token
    kl_coef: float = 0.0  # k3 KL to a reference policy on every loss token
    temperature: float = 1.0  # logits are divided by it
    softcap: float | None = None  # z = softcap·tanh(logit_scale·u/softcap)/temperature when set
    logit_scale: float = 1.0  # s multiplying the logits u = x·Wᵀ + b (before the softcap)
    loss_agg: str = "seq_sum_const"  # 'seq_sum_const' | 'token_mean' | 'seq_mean'
    loss_const: float | None = None  # C of seq_sum_const; None → the sequence dimension T
    ignore_index: int = -100

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"REDLossConfig.{key}={getattr(self, key)!r}: {why}")

        if not 0 <= self.clip_eps_low < 1:
            bad("clip_eps_low", "must be in [0, 1)")
        if not self.clip_eps_high >= 0:
            bad("clip_eps_high", "must be ≥ 0")
        if self.dual_clip is not None and not self.dual_clip > 1:
            bad("dual_clip", "must be None or > 1")
        self.offline_shaping = canonical_shaping(self.offline_shaping, "REDLossConfig.offline_shaping")
        if self.offline_shaping not in SHAPINGS:
            bad("offline_shaping", f"must be one of {SHAPINGS}")
        if not self.shaping_gamma > 0:
            bad("shaping_gamma", "must be > 0")
        if not 0 <= self.r_min < 0.5:
            bad("r_min", "must be in [0, 0.5)")
        for key in ("sft_coef", "entropy_coef", "kl_coef"):
            if not getattr(self, key) >= 0:
                bad(key, "must be ≥ 0")
        if not self.temperature > 0:
            bad("temperature", "must be > 0")
        if self.softcap is not None and not 0 < self.softcap < float("inf"):
            bad("softcap", "must be None or a finite number > 0")
        if not 0 < self.logit_scale < float("inf"):
            bad("logit_scale", "must be a finite number > 0")
        if self.loss_agg not in AGGREGATIONS:
            bad("loss_agg", f"must be one of {AGGREGATIONS}")
        if self.loss_const is not None and not self.loss_const > 0:
            bad("loss_const", "must be None or > 0")

    @classmethod
    def build(cls, config=None, **overrides):
        """A config from an optional base config plus keyword overrides (unknown keys raise TypeError)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown REDLossConfig keys {unknown}; known keys: {sorted(known)}")
        base = {} if config is None else {f.name: getattr(config, f.name) for f in fields(cls)}
        return cls(**{**base, **overrides})


def canonical_shaping(name: str, where: str) -> str:
    """The current name of an offline shaping; an old name still works, with a FutureWarning naming `where`."""
    if name in SHAPING_ALIASES:
        new = SHAPING_ALIASES[name]
        warnings.warn(
            f"{where}={name!r} is deprecated, use {new!r} (same shaping)", FutureWarning, stacklevel=3
        )
        return new
    return name


def shaping(p, r_bar, cfg: REDLossConfig):
    """φ(p) for offline tokens; p and r̄ are per token."""
    if cfg.offline_shaping == "none":
        return p
    if cfg.offline_shaping == "luffy":
        return p / (p + cfg.shaping_gamma)
    r = r_bar.clamp(cfg.r_min, 1.0 - cfg.r_min)
    return p / (r + (1.0 - r) * p)


def clipped_pg(ratio, adv, cfg: REDLossConfig):
    """−min(ρA, clip(ρ)A), with the optional dual clip for A < 0."""
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv)
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -cfg.dual_clip * adv), loss)
    return loss


def k3(logp, ref_logp):
    """k3 estimator of KL(π‖π_ref): exp(ref − logp) − (ref − logp) − 1 (≥ 0)."""
    d = ref_logp - logp
    return d.exp() - d - 1.0


def token_terms(logp, entropy, side, cfg: REDLossConfig):
    """Per-token loss components (unaggregated). `side` holds per-token tensors of the same shape as logp:
    online, offline (0/1 floats), adv, old_logp, r_bar, w, is_w, ref_logp (None when kl_coef = 0).
    Returns a dict of per-token tensors whose sum over keys is ℓ."""
    ratio = (logp - side["old_logp"]).exp()
    p = logp.exp()
    terms = {
        "pg_online": side["online"] * side["is_w"] * clipped_pg(ratio, side["adv"], cfg),
        "pg_offline": -side["offline"] * shaping(p, side["r_bar"], cfg) * side["w"] * side["adv"],
    }
    if cfg.sft_coef:
        terms["sft"] = side["offline"] * cfg.sft_coef * side["w"] * (-logp)
    if cfg.entropy_coef:
        terms["entropy_bonus"] = -cfg.entropy_coef * entropy
    if cfg.kl_coef:
        terms["kl"] = cfg.kl_coef * k3(logp, side["ref_logp"])
    return terms


def gradient_free(advantages, offline, cfg: REDLossConfig):
    """[S] bool: the sequences whose every loss term is identically zero, so that they send no gradient whatever
    their (finite) log-probs: A = 0 (the online term −min(ρ·0, clip(ρ)·0) and the offline term −φ·w·0 vanish), no offline
    NLL on them (sft_coef = 0, or an online sequence) and no term on every token (entropy_coef = kl_coef = 0).
    advantages [S] float, offline [S] bool. A trainer may run such sequences without a backward (their
    log-probs and entropies are still wanted for metrics and for RED's entropy ratio): the gradient is the same."""
    if cfg.entropy_coef or cfg.kl_coef:
        return torch.zeros(advantages.shape, dtype=torch.bool, device=advantages.device)
    free = advantages == 0
    if cfg.sft_coef:
        free = free & ~offline.bool()
    return free


def aggregation_weights(loss_mask, cfg: REDLossConfig, global_normalizer=None, seq_ids=None, num_seqs=None):
    """a [B, T] so that loss = Σ a·ℓ implements `loss_agg`; loss_mask [B, T] float.

    seq_sum_const: a = mask / (C·G);  token_mean: a = mask / G;  seq_mean: a = mask / (len_s·G), len_s the loss
    tokens of the position's sequence. G is `global_normalizer` (sequences for seq_*, tokens for token_mean, over
    the whole batch across micro-batches and ranks), default this call's own count (num_seqs, default B), so that
    micro-batch gradients add up to the full-batch gradient. seq_ids [B, T] (packed rows, red_kernels/sequences.py):
    the sequence of each position; None → row b is sequence b.
    """
    if cfg.loss_agg == "token_mean":
        g = loss_mask.sum().clamp(min=1.0) if global_normalizer is None else float(global_normalizer)
        return loss_mask / g
    n_seq = loss_mask.shape[0] if num_seqs is None else num_seqs
    g = float(n_seq) if global_normalizer is None else float(global_normalizer)
    if cfg.loss_agg == "seq_mean":
        if seq_ids is None:
            lengths = loss_mask.sum(dim=1, keepdim=True)
        else:
            idx = seq_ids.clamp(min=0)
            lengths = loss_mask.new_zeros(max(n_seq, 1)).index_add_(
                0, idx.reshape(-1), loss_mask.reshape(-1)
            )[idx]
        return loss_mask / (lengths.clamp(min=1.0) * g)
    c = float(loss_mask.shape[1]) if cfg.loss_const is None else float(cfg.loss_const)
    return loss_mask / (c * g)
