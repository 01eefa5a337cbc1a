"""Train/inference log-prob mismatch between a rollout engine and the trainer, and its truncated IS correction.

The engine samples token y_t from μ (its own numerics: bf16 kernels, different reductions), the trainer computes
π_old(y_t) for the same tokens. PPO/RED ratios should be taken against π_old, but the samples came from μ, so each
online token can be reweighted by the truncated importance-sampling weight min(π_old / μ, cap)
(TIS, "Your efficient RL framework secretly brings you off-policy RL training", Yao et al. 2025).
Pure tensor functions; no engine needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LogprobMismatch:
    """All detached float32. is_weights [B, T] (1 outside the mask); the rest 0-dim tensors over masked tokens."""

    is_weights: torch.Tensor
    mean_abs_diff: torch.Tensor
    max_abs_diff: torch.Tensor
    mean_is_weight: torch.Tensor
    capped_frac: torch.Tensor

    def metrics(self, prefix: str = "mismatch/") -> dict[str, float]:
        """Scalars for logging."""
        return {
            prefix + k: float(getattr(self, k))
            for k in ("mean_abs_diff", "max_abs_diff", "mean_is_weight", "capped_frac")
        }


@torch.no_grad()
def logprob_mismatch(
    engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor, cap: float = 2.0
) -> LogprobMismatch:
    """Mismatch statistics and truncated IS weights w = min(exp(trainer − engine), cap).

    Args:
        engine_logprobs: [B, T] the engine's log-prob of each sampled token at the sampling temperature.
        trainer_logprobs: [B, T] the trainer's (old-policy) log-prob of the same tokens at the same temperature.
        mask: [B, T] bool/0-1, true on the online (engine-sampled) completion tokens to compare.
        cap: truncation C ≥ 1 of the importance weight (2–3 is usual).

    Returns a LogprobMismatch. Tokens outside the mask get weight 1 and do not enter the statistics; an empty
    mask gives zeros (never NaN). Feed `is_weights` to red_loss(is_weights=...).
    """
    if engine_logprobs.shape != trainer_logprobs.shape or engine_logprobs.shape != mask.shape:
        raise ValueError(
            f"shapes differ: engine {tuple(engine_logprobs.shape)}, trainer "
            f"{tuple(trainer_logprobs.shape)}, mask {tuple(mask.shape)}"
        )
    if not cap >= 1.0:
        raise ValueError(f"cap must be >= 1, got {cap}")
    m = mask.bool()
    delta = trainer_logprobs.float() - engine_logprobs.float()
    delta = torch.where(m, delta, torch.zeros_like(delta))  # also drops ±inf/NaN padding outside the mask
    log_cap = math.log(cap)
    weights = torch.exp(delta.clamp(max=log_cap))  # clamp before exp: no overflow
    weights = torch.where(m, weights, torch.ones_like(weights))
    n = m.sum()
    count = n.clamp(min=1).float()
    abs_diff = delta.abs()
    zero = torch.zeros((), dtype=torch.float32, device=delta.device)
    return LogprobMismatch(
        is_weights=weights,
        mean_abs_diff=abs_diff.sum() / count,
        max_abs_diff=abs_diff.max() if n > 0 else zero,
        mean_is_weight=torch.where(m, weights, torch.zeros_like(weights)).sum() / count if n > 0 else zero,
        capped_frac=((delta >= log_cap) & m).sum().float() / count,
    )
