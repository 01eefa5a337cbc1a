"""RED algorithm steps as pure tensor functions (no I/O): advantages, dynamic sampling, entropy-change-ratio
offline weight, accuracy-aware shift inputs. The group layout (k teacher traces last, flagged is_offline) is built
by red/records.py, the reward formula by red/rewards.py. See shared/spec/red-algorithm.md.

Shapes: G groups of n members each; tensors shaped [G, n] hold one value per group member, [B] = [G·n]
flattened group-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def group_advantages(
    rewards: torch.Tensor,
    is_offline: torch.Tensor,
    *,
    adv_std: bool = True,
    adv_stats: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """A_i = (R_i - mean_G R) / (std_G R + eps) for every member of each group ([G, n] -> [G, n]).

    adv_stats='group' takes mean/std over the whole group (offline members included); 'online' over the
    online members only (applied to all members). std is the unbiased sample std (torch.std, as in OpenRLHF);
    a statistic over a single member has std 0. adv_std=False: mean-centring only (LUFFY / Dr.GRPO).

    Zero online spread (adv_stats='online' when the online rewards of a group are all equal, or there is one
    online member): the group's std over ALL members is used instead of the online one, so the result stays
    finite — e.g. online rewards 0,0,0 and a teacher at 1: online mean 0, whole-group std 0.5, advantages
    0,0,0,2 (not 1e6 = 1/eps). If the whole group has no spread either, every reward equals the online mean
    and every advantage is 0.
    """
    r = rewards.double()
    if adv_stats == "group":
        sel = torch.ones_like(is_offline, dtype=torch.bool)
    elif adv_stats == "online":
        sel = ~is_offline
    else:
        raise ValueError(f"adv_stats must be 'group' or 'online', got {adv_stats!r}")
    w = sel.double()
    cnt = w.sum(-1, keepdim=True)
    mean = (r * w).sum(-1, keepdim=True) / cnt.clamp_min(1)
    adv = r - mean
    if adv_std:
        var = ((r - mean) ** 2 * w).sum(-1, keepdim=True) / (cnt - 1).clamp_min(1)
        std = var.sqrt()
        if adv_stats == "online":  # no online spread -> the whole group's std (finite; see the docstring)
            std = torch.where(std > 0, std, r.std(-1, keepdim=True) if r.shape[-1] > 1 else std)
        adv = adv / (std + eps)
    adv = torch.where(cnt > 0, adv, torch.zeros_like(adv))
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def group_accuracy(acc: torch.Tensor) -> torch.Tensor:
    """r̄ per group: mean accuracy over all members, teacher included ([G, n] -> [G])."""
    return acc.double().mean(-1).float()


# What happens to a teacher-only group (no online member correct, a teacher trace correct); see
# red-algorithm.md "Hazard found on our own task: teacher-only groups":
#   keep         the spec's step 4 as written (online members get -(1/n)/sigma each: pushed away from all they sample)
#   zero_online  the group is kept, its online members' advantages are set to 0 (only the teacher's term acts)
#   drop         the group is dropped like a zero-variance group (dynamic sampling refills it)
TEACHER_ONLY_CHOICES = ("keep", "zero_online", "drop")
# Kinds of group, in the order the per-step metrics report them (shares of the kept groups).
GROUP_KINDS = ("teacher_only", "all_correct", "all_wrong")


def group_share_key(kind: str) -> str:
    """metrics.jsonl key of the share of the step's kept (trained-on) groups that are of `kind` (GROUP_KINDS)."""
    return f"kept_frac_{kind}"


def group_kinds(acc: torch.Tensor, is_offline: torch.Tensor | None = None) -> dict:
    """[G, n] accuracy (and offline flags) -> {kind: [G] bool} for GROUP_KINDS. teacher_only: at least one online
    member, none of them correct, and a correct offline member. Without flags no group is teacher-only."""
    a = acc.bool()
    off = torch.zeros_like(a) if is_offline is None else is_offline.bool()
    teacher_only = (~off).any(-1) & ~(a & ~off).any(-1) & (a & off).any(-1)
    return {"teacher_only": teacher_only, "all_correct": a.all(-1), "all_wrong": (~a).all(-1)}


def keep_groups(
    acc: torch.Tensor, is_offline: torch.Tensor | None = None, teacher_only: str = "keep"
) -> tuple[torch.Tensor, dict]:
    """Dynamic sampling filter. Drops groups whose accuracy has zero variance (all correct or all wrong,
    teacher included) and, with teacher_only='drop', teacher-only groups. Returns (keep [G] bool,
    {'all_correct': int, 'all_wrong': int, 'teacher_only': int}) — how many were dropped for each reason."""
    kinds = group_kinds(acc, is_offline)
    keep = ~(kinds["all_correct"] | kinds["all_wrong"])
    dropped_to = kinds["teacher_only"] & keep if teacher_only == "drop" else torch.zeros_like(keep)
    keep &= ~dropped_to
    return keep, {
        "all_correct": int(kinds["all_correct"].sum()),
        "all_wrong": int(kinds["all_wrong"].sum()),
        "teacher_only": int(dropped_to.sum()),
    }


def teacher_only_advantages(adv: torch.Tensor, acc: torch.Tensor, is_offline: torch.Tensor, choice: str):
    """Applies algorithm.teacher_only_groups to computed advantages ([G, n] each -> [G, n]): 'zero_online'
    sets the online members of teacher-only groups to 0; 'keep' and 'drop' (already dropped) change nothing."""
    if choice not in TEACHER_ONLY_CHOICES:
        raise ValueError(
            f"teacher_only_groups must be one of {', '.join(TEACHER_ONLY_CHOICES)}, got {choice!r}"
        )
    if choice != "zero_online":
        return adv
    zero = group_kinds(acc, is_offline)["teacher_only"][:, None] & ~is_offline.bool()
    return torch.where(zero, torch.zeros_like(adv), adv)


def refill(draw, target: int, max_refill: int, enabled: bool = True, need_more=None, teacher_only="keep"):
    """Dynamic sampling with refill: call `draw(attempt, need)` -> (groups, acc [g, n]) or (groups, acc,
    is_offline [g, n]) until `target` kept groups are collected or `max_refill` extra draws are spent; `need` is
    the number of groups still missing (the first draw asks for `target`).

    Returns (parts, stats): parts = [(groups, keep [g] bool)] for every draw, in order, the masks keeping at most
    `target` groups in total (the first kept ones); stats = draws, dropped_all_correct, dropped_all_wrong,
    dropped_teacher_only, kept, short (how many groups the batch lacks). With enabled=False every group of the
    first draw is kept, except teacher-only groups when teacher_only='drop'. need_more(short: int) -> bool
    decides whether to draw again (default: short > 0; the trainer passes an any-rank reduction so that all
    ranks draw in lockstep).
    """
    parts, kept = [], 0
    stats = {"draws": 0, "dropped_all_correct": 0, "dropped_all_wrong": 0, "dropped_teacher_only": 0}
    for attempt in range(max_refill + 1):
        groups, acc, *off = draw(attempt, target - kept)
        off = off[0] if off else None
        stats["draws"] += 1
        if not enabled:
            mask = torch.ones(acc.shape[0], dtype=torch.bool)
            if teacher_only == "drop":
                mask = ~group_kinds(acc, off)["teacher_only"]
                stats["dropped_teacher_only"] += int((~mask).sum())
            parts.append((groups, mask))
            kept += int(mask.sum())
            break
        mask, why = keep_groups(acc, off, teacher_only)
        stats["dropped_all_correct"] += why["all_correct"]
        stats["dropped_all_wrong"] += why["all_wrong"]
        stats["dropped_teacher_only"] += why["teacher_only"]
        mask &= mask.cumsum(0) <= target - kept  # at most target groups in total
        parts.append((groups, mask))
        kept += int(mask.sum())
        if not (need_more(target - kept) if need_more is not None else kept < target):
            break
    stats["kept"] = min(kept, target)
    stats["short"] = max(target - kept, 0)
    return parts, stats


def sample_mean_entropy(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h_i: mean token entropy of each sample over its response tokens ([B, T], [B, T] -> [B]; 0 if empty)."""
    m = mask.to(entropy.dtype)
    return (entropy * m).sum(-1) / m.sum(-1).clamp_min(1)


OFFLINE_WEIGHTS = ("entropy_ratio", "fixed")
"""How the offline weight w is chosen (algorithm.offline_weight): the entropy-change ratio, or fixed at 1
(EntropyRatioWeight(fixed=True))."""


@dataclass
class EntropyRatioWeight:
    """Offline weight w from the ratio of entropy changes (step 6 of the spec); carries H^{k-1} across steps.

        w_raw = (1 - H_off^k / H_off^{k-1}) / (1 - H_on^k / H_on^{k-1}),   w = clip(|w_raw|, w_min, w_max)

    w = 1 at the first step. A denominator with |den| < eps, or any non-finite ratio, gives w = w_max (w_raw is
    reported as inf / nan). With ema = alpha the entropies are smoothed first: H~^k = alpha H~^{k-1} +
    (1 - alpha) H^k (H~^1 = H^1), and the ratio uses the smoothed values. fixed=True always gives w = 1.
    """

    w_min: float = 1.0
    w_max: float = 7.0
    eps: float = 1e-8
    ema: float | None = None
    fixed: bool = False
    prev_on: float | None = None
    prev_off: float | None = None

    def update(self, h_on: float | None, h_off: float | None) -> tuple[float, float]:
        """Feed this step's H_on, H_off (None: no such samples this step). Returns (w, w_raw)."""
        if h_on is None or h_off is None:
            return 1.0, float("nan")
        if self.ema is not None and self.prev_on is not None:
            h_on = self.ema * self.prev_on + (1 - self.ema) * h_on
            h_off = self.ema * self.prev_off + (1 - self.ema) * h_off
        prev_on, prev_off = self.prev_on, self.prev_off
        self.prev_on, self.prev_off = float(h_on), float(h_off)
        if prev_on is None:
            return 1.0, 1.0
        w_raw = _entropy_ratio(h_on, h_off, prev_on, prev_off, self.eps)
        if self.fixed:
            return 1.0, w_raw
        if not math.isfinite(w_raw):
            return float(self.w_max), w_raw
        return float(min(max(abs(w_raw), self.w_min), self.w_max)), w_raw

    def state_dict(self) -> dict:
        return {"prev_on": self.prev_on, "prev_off": self.prev_off}

    def load_state_dict(self, state: dict) -> None:
        self.prev_on, self.prev_off = state["prev_on"], state["prev_off"]


def _entropy_ratio(h_on, h_off, prev_on, prev_off, eps) -> float:
    def change(h, prev):
        if prev == 0:
            return float("nan") if h == 0 else float("-inf")
        return 1.0 - h / prev

    num, den = change(h_off, prev_off), change(h_on, prev_on)
    if not (math.isfinite(num) and math.isfinite(den)):
        return float("nan")
    if abs(den) < eps:
        return float("inf") if num != 0 else float("nan")
    return num / den
