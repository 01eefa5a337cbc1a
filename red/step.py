"""One optimizer step of each kind, composing the stages (see red/records.py for the record they pass on).

RL:  draw prompts -> engine.generate (n - k online) + k teacher traces -> rewards.score -> dynamic sampling with
     refill -> update.old_policy_pass (log p_old, entropy) -> w from the entropy-change ratio, advantages, r̄
     -> TIS weights -> update.policy_update -> one metrics reduction.
SFT: k teacher traces per prompt -> update.policy_update (NLL) -> one metrics reduction.
`tr` is the loop's Trainer (red/loop.py): config, policy, engine (synced lazily), verifier, stage state.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from . import parallel, rewards
from .algorithm import (
    GROUP_KINDS,
    group_accuracy,
    group_advantages,
    group_kinds,
    group_share_key,
    refill,
    sample_mean_entropy,
    teacher_only_advantages,
)
from .metrics import batch_sums, finish_rollout_metrics
from .records import RolloutBatch
from .rollout.base import SamplingConfig
from .rollout.mismatch import logprob_mismatch
from .update import finish_metrics, old_policy_pass, policy_update

log = logging.getLogger("red.step")


def _prepare(tr, batch: RolloutBatch, loss_cfg) -> dict:
    """Global normaliser (sequences, or tokens for token_mean), tokens, kept groups and the most micro-batches
    any rank has, in one reduction."""
    from .packing import micro_batch_count

    micro = micro_batch_count(batch.lengths.tolist(), tr.cfg.train.micro_batch_tokens, tr.policy.packing)
    sums, mx = parallel.reduce(
        {
            "norm": batch.B if loss_cfg.loss_agg != "token_mean" else int(batch.response_len.sum()),
            "tokens": int(batch.lengths.sum()),
            "groups_kept": batch.G,
        },
        {"micro": micro},
    )
    return {**sums, "micro": int(mx["micro"])}


def _update(tr, batch, loss_cfg, pre: dict, use_old: bool) -> dict:
    upd = {}
    for _ in range(tr.cfg.train.ppo_epochs):
        upd = policy_update(
            tr.policy,
            batch,
            loss_cfg,
            tr.cfg.train.micro_batch_tokens,
            tr.opt,
            tr.cfg.optim.grad_clip,
            pre["norm"],
            pre["micro"],
            use_old=use_old,
        )
    tr.engine_stale = True  # synced lazily, right before the next generate
    return upd


def sft_step(tr, phase) -> dict:
    batch = RolloutBatch.teacher_only(tr.take_items(tr.per_rank), phase.k)
    batch = batch.replace(
        advantage=torch.zeros(batch.B),
        group_accuracy=torch.full((batch.B,), 0.5),
        offline_weight=torch.ones(batch.B),
    )
    t = time.perf_counter()
    upd = _update(
        tr, batch, tr.loss_cfg[phase.mode], _prepare(tr, batch, tr.loss_cfg[phase.mode]), use_old=False
    )
    grad_norm = upd.pop("grad_norm")
    sums, _ = parallel.reduce({**upd, "tokens": int(batch.response_len.sum())})
    m = finish_metrics(sums)
    m.update(nll=m.pop("sft"), grad_norm=grad_norm, time_update=time.perf_counter() - t)
    return m


def rl_step(tr, phase) -> dict:
    cfg, k = tr.cfg, phase.k
    sampling = SamplingConfig(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p)
    timers = {"time_rollout": 0.0, "time_reward": 0.0}
    need = [tr.per_rank]  # what the most-short rank still needs: every rank draws as many

    def draw(attempt, _):
        items = tr.take_items(need[0])
        t = time.perf_counter()
        sampling.seed = tr.seed_for(attempt)
        rollouts = tr.generate([it.prompt_ids for it in items], cfg.rollout.n - k, sampling)
        timers["time_rollout"] += time.perf_counter() - t
        t = time.perf_counter()
        batch = rewards.score(
            RolloutBatch.from_rollouts(items, rollouts, k),
            tr.tok,
            tr.verifier,
            cfg.reward,
            cfg.rollout.max_new_tokens,
        )
        timers["time_reward"] += time.perf_counter() - t
        if not batch.G:
            return batch, torch.zeros(0, cfg.rollout.n), torch.zeros(0, cfg.rollout.n, dtype=torch.bool)
        return batch, batch.grouped(batch.correct.float()), batch.grouped(batch.is_offline)

    def need_more(short: int) -> bool:
        _, mx = parallel.reduce(maxes={"short": short})
        need[0] = max(int(mx["short"]), 1)
        return mx["short"] > 0

    tog = cfg.algorithm.teacher_only_groups
    parts, ds = refill(
        draw, tr.per_rank, cfg.algorithm.max_refill, cfg.algorithm.dynamic_sampling, need_more, tog
    )
    tr.engine.sleep()
    drawn = RolloutBatch.cat([b for b, _ in parts])
    batch = RolloutBatch.cat([b.select_groups(keep) for b, keep in parts])
    rsums, rmax = batch_sums(drawn, ds)

    t = time.perf_counter()
    loss_cfg = tr.loss_cfg[phase.mode]
    pre = _prepare(tr, batch, loss_cfg)
    if pre["groups_kept"] == 0:
        sums, maxes = parallel.reduce(rsums, rmax)
        log.warning("step %d: every group was dropped by dynamic sampling; no update", tr.step + 1)
        no_share = {group_share_key(kind): None for kind in GROUP_KINDS}  # no kept group: no share
        return {**finish_rollout_metrics(sums, maxes, tr), **timers, **no_share, "skipped_update": 1}
    batch = old_policy_pass(
        tr.policy, batch, cfg.train.micro_batch_tokens, loss_cfg.temperature, pre["micro"]
    )
    timers["time_old_pass"] = time.perf_counter() - t

    h = sample_mean_entropy(batch.entropy.double(), batch.response_mask())
    off = batch.is_offline
    hs, _ = parallel.reduce(
        {"h_on": h[~off].sum(), "c_on": (~off).sum(), "h_off": h[off].sum(), "c_off": off.sum()}
    )
    h_on = hs["h_on"] / hs["c_on"] if hs["c_on"] else None
    h_off = hs["h_off"] / hs["c_off"] if hs["c_off"] else None
    w, w_raw = tr.weight.update(h_on, h_off)
    acc, grouped_off = batch.grouped(batch.correct.float()), batch.grouped(off)
    adv = group_advantages(
        batch.grouped(batch.reward),
        grouped_off,
        adv_std=cfg.algorithm.adv_std,
        adv_stats=cfg.algorithm.adv_stats if k else "group",
    )
    adv = teacher_only_advantages(adv, acc, grouped_off, tog)
    kinds = group_kinds(acc, grouped_off)
    rbar = group_accuracy(acc)
    batch = batch.replace(
        advantage=adv.reshape(-1),
        group_accuracy=rbar.repeat_interleave(batch.n),
        offline_weight=torch.full((batch.B,), float(w)),
    )
    batch, mismatch = _is_weights(batch, cfg)

    t = time.perf_counter()
    upd = _update(tr, batch, loss_cfg, pre, use_old=True)
    timers["time_update"] = time.perf_counter() - t
    grad_norm = upd.pop("grad_norm")
    sums, maxes = parallel.reduce(
        {
            **rsums,
            **upd,
            "rbar_sum": rbar.sum(),
            "adv_off_sum": adv[grouped_off].sum(),
            "n_off_kept": grouped_off.sum(),
            **{f"kept_{kind}": kinds[kind].sum() for kind in GROUP_KINDS},
        },
        {
            **rmax,
            "rbar_max": float(rbar.max()) if batch.G else None,
            "rbar_negmin": -float(rbar.min()) if batch.G else None,
        },
    )
    m = {
        **finish_rollout_metrics(sums, maxes, tr),
        **timers,
        **mismatch,
        **finish_metrics({k: v for k, v in sums.items() if k in upd}),
    }
    g = pre["groups_kept"]
    m.update(
        grad_norm=grad_norm,
        H_on=h_on,
        H_off=h_off,
        w=w,
        w_raw=w_raw,
        w_raw_abs=abs(w_raw) if math.isfinite(w_raw) else None,
        rbar_mean=sums["rbar_sum"] / g,
        rbar_min=-maxes["rbar_negmin"],
        rbar_max=maxes["rbar_max"],
        adv_offline_mean=sums["adv_off_sum"] / sums["n_off_kept"] if k and sums["n_off_kept"] else None,
        groups_kept=g,
        **{group_share_key(kind): sums[f"kept_{kind}"] / g for kind in GROUP_KINDS},
        tokens=pre["tokens"],
    )
    m["tokens_per_s"] = pre["tokens"] / max(sum(v for kk, v in m.items() if kk.startswith("time_")), 1e-9)
    tr.last_samples = tr.samples(batch)
    return m


def _is_weights(batch: RolloutBatch, cfg) -> tuple[RolloutBatch, dict]:
    """Engine/trainer log-prob mismatch on online tokens; with rollout.is_correction=tis its truncated IS weights."""
    if batch.engine_logprobs is None or not bool((~batch.is_offline).any()):
        return batch, {}
    mask = batch.response_mask() & ~batch.is_offline[:, None]
    mm = logprob_mismatch(batch.engine_logprobs, batch.old_logprobs, mask, cap=cfg.rollout.is_cap)
    if cfg.rollout.is_correction == "tis":
        batch = batch.replace(is_weights=mm.is_weights)
    return batch, mm.metrics()
