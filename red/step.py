"""One optimizer step of each kind, composing the stages (see red/records.py for the record they pass on).

RL:  draw prompts -> engine.generate (n - k online) + k teacher traces -> rewards.score -> dynamic sampling with
     refill -> advantages, r̄ -> the step's plan (red/plan.py, built once) -> [old-policy pass] -> w from the
     entropy-change ratio -> [TIS weights] -> update.update -> one metrics reduction.
     Sequences whose every loss term is zero (red_kernels.policy_loss.gradient_free: A = 0 and no per-token
     term, e.g. the online members that teacher_only_groups=zero_online zeroes) are planned in the plan's
     frozen part: the update runs them without autograd (their log-probs, entropies and metrics as before,
     no backward); `gradient_free_frac` is their share of the step's sequences.
     On-policy (`on_policy`: one epoch, no TIS) there is no old-policy pass: the update's own detached
     log-probs are the old ones (ρ ≡ 1) and its forward gives the pre-step entropies; RED's w, which the
     offline loss needs, comes from the online part of the update (run first) and a no-grad pass over the
     offline rows only.
SFT: k teacher traces per prompt -> update.policy_update (NLL) -> one metrics reduction.
`tr` is the loop's Trainer (red/loop.py): config, policy, rollout session (red/rollout/session.py), verifier,
stage state.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from red_kernels.policy_loss import TOKEN_NORMALISED, gradient_free

from . import parallel, rewards
from .algorithm import (
    GROUP_KINDS,
    group_accuracy,
    group_advantages,
    group_kinds,
    group_share_key,
    refill,
    teacher_only_advantages,
)
from .metrics import batch_sums, finish_rollout_metrics
from .modes import MODES, teacher_only_groups
from .plan import Plan
from .records import RolloutBatch
from .rollout.base import SamplingConfig
from .rollout.mismatch import logprob_mismatch
from .update import finish_metrics, forward_pass, update

log = logging.getLogger("red.step")


def peak_rss_mib(reset: bool = False) -> float | None:
    """This process's peak resident memory (VmHWM, MiB) since the last reset; reset=True starts a new window
    (Linux /proc; None elsewhere). Lets each phase of a step report its own peak."""
    try:
        with open("/proc/self/status") as f:
            hwm = next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:")), None)
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return hwm
    except OSError:
        return None


def on_policy(cfg) -> bool:
    """Whether the update is provably on-policy: one optimizer step per rollout batch (policy_update makes one),
    one PPO epoch (train.ppo_epochs = 1) and no TIS correction (rollout.is_correction = none, which needs the old
    log-probs before the loss). Then the old policy is the one the update's forward runs: its detached log-probs
    are the old log-probs (ρ ≡ 1, no separate pass) and its entropies are the pre-step entropies."""
    return cfg.train.ppo_epochs == 1 and cfg.rollout.is_correction != "tis"


def _plan(tr, batch: RolloutBatch, loss_cfg, split: bool = False, free=None) -> tuple[Plan, dict]:
    """The step's plan (red/plan.py), built once, padded to the most micro-batches any rank has in each part;
    and the global normaliser (sequences, or tokens for the TOKEN_NORMALISED aggregations), tokens and kept
    groups — all in one reduction. free: [B] bool, the gradient-free rows (the plan's frozen part, no backward)."""
    p = tr.policy
    plan = Plan.build(
        batch,
        tr.cfg.train.micro_batch_tokens,
        p.pad_id,
        p.packing,
        p.device,
        split,
        row_tokens=p.row_tokens,
        gradient_free=free,
    )
    frozen, first, second = plan.counts()
    sums, mx = parallel.reduce(
        {
            "norm": int(batch.response_len.sum()) if loss_cfg.loss_agg in TOKEN_NORMALISED else batch.B,
            "tokens": int(batch.lengths.sum()),
            "groups_kept": batch.G,
            "sequences": batch.B,
            "gradient_free": int(free.sum()) if free is not None else 0,
        },
        {"frozen": frozen, "first": first, "second": second},
    )
    plan.pad((int(mx["frozen"]), int(mx["first"]), int(mx["second"])))
    return plan, sums


def _update(tr, plan: Plan, loss_cfg, pre: dict, use_old: bool, between=None) -> dict:
    upd = {}
    for _ in range(tr.cfg.train.ppo_epochs):
        upd = update(
            tr.policy,
            plan,
            loss_cfg,
            tr.opt,
            tr.cfg.optim.grad_clip,
            pre["norm"],
            use_old=use_old,
            between=between,
        )
    tr.rollout.weights_changed()  # synced lazily, right before the next generate
    return upd


def run_step(tr, phase) -> dict:
    """One optimizer step of the phase's leaf mode: sft_step for modes of kind 'sft', else rl_step
    (red/modes.py). The metrics row of the step."""
    return (sft_step if MODES[phase.mode].kind == "sft" else rl_step)(tr, phase)


def sft_step(tr, phase) -> dict:
    batch = RolloutBatch.teacher_only(tr.take_items(tr.per_rank), phase.k)
    batch = batch.replace(
        advantage=torch.zeros(batch.B),
        group_accuracy=torch.full((batch.B,), 0.5),
        offline_weight=torch.ones(batch.B),
    )
    t = time.perf_counter()
    plan, pre = _plan(tr, batch, tr.loss_cfg[phase.mode])
    plan.set_sequences(
        advantages=batch.advantage, group_accuracy=batch.group_accuracy, offline_weight=batch.offline_weight
    )
    upd = _update(tr, plan, tr.loss_cfg[phase.mode], pre, use_old=False)
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

    mem_between = peak_rss_mib(reset=True)  # since the last step's update: loading, evaluation, checkpoints

    def draw(attempt, _):
        items = tr.take_items(need[0])
        t = time.perf_counter()
        sampling.seed = tr.seed_for(attempt)
        rollouts = tr.rollout.generate([it.prompt_ids for it in items], cfg.rollout.n - k, sampling)
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

    tog = teacher_only_groups(cfg, phase.mode)
    parts, ds = refill(
        draw, tr.per_rank, cfg.algorithm.max_refill, cfg.algorithm.dynamic_sampling, need_more, tog
    )
    tr.rollout.sleep()
    drawn = RolloutBatch.cat([b for b, _ in parts])
    batch = RolloutBatch.cat([b.select_groups(keep) for b, keep in parts])
    rsums, rmax = batch_sums(drawn, ds)
    take_parts = getattr(tr.verifier, "take_parts", None)  # reward.fn's named parts, summed over this step
    rsums.update(take_parts() if take_parts else {})

    # peak RSS MiB of each phase (rollout includes reward); their max over the run is the process peak
    mem = {"mem_between": mem_between, "mem_rollout": peak_rss_mib(reset=True)}
    t = time.perf_counter()
    loss_cfg = tr.loss_cfg[phase.mode]
    skip_old = on_policy(cfg)
    # w from this step's entropies, needed before the offline tokens' loss: the update runs the online
    # sequences first and learns H_on from its own forward; only the offline rows get a no-grad pass (H_off)
    split = skip_old and k > 0 and not tr.weight.fixed
    off = batch.is_offline
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
        offline_weight=torch.ones(batch.B),
    )
    # sequences with A = 0 and no other loss term (e.g. the online members that teacher_only_groups=zero_online
    # zeroes) send no gradient: the update runs them without a backward
    free = gradient_free(batch.advantage, off, loss_cfg)
    plan, pre = _plan(tr, batch, loss_cfg, split, free)
    timers["time_plan"] = time.perf_counter() - t
    if pre["groups_kept"] == 0:
        sums, maxes = parallel.reduce(rsums, rmax)
        log.warning("step %d: every group was dropped by dynamic sampling; no update", tr.step + 1)
        no_share = {group_share_key(kind): None for kind in GROUP_KINDS}  # no kept group: no share
        return {**finish_rollout_metrics(sums, maxes, tr), **timers, **no_share, "skipped_update": 1}
    plan.set_sequences(
        advantages=batch.advantage, group_accuracy=batch.group_accuracy, offline_weight=batch.offline_weight
    )
    t = time.perf_counter()
    if not skip_old:
        forward_pass(tr.policy, plan.batches, loss_cfg.temperature)
    elif split:
        forward_pass(tr.policy, plan.second, loss_cfg.temperature)
    timers["time_old_pass"] = time.perf_counter() - t
    mem["mem_old_pass"] = peak_rss_mib(reset=True)
    ent: dict = {}

    def weigh():
        """H_on, H_off from the plan's entropies (pre-step policy) -> w, set on every sequence."""
        rows, h = plan.sequence_means("entropy")
        o = off[rows]
        hs, _ = parallel.reduce(
            {"h_on": h[~o].sum(), "c_on": (~o).sum(), "h_off": h[o].sum(), "c_off": o.sum()}
        )
        ent["h_on"] = hs["h_on"] / hs["c_on"] if hs["c_on"] else None
        ent["h_off"] = hs["h_off"] / hs["c_off"] if hs["c_off"] else None
        ent["w"], ent["w_raw"] = tr.weight.update(ent["h_on"], ent["h_off"])
        plan.set_sequences(offline_weight=torch.full((batch.B,), float(ent["w"])))

    mismatch = {}
    if not skip_old:
        weigh()
        mismatch = _mismatch(plan, cfg)
    t = time.perf_counter()
    upd = _update(tr, plan, loss_cfg, pre, use_old=not skip_old, between=weigh if split else None)
    timers["time_update"] = time.perf_counter() - t
    mem["mem_update"] = peak_rss_mib(reset=True)
    if skip_old:
        if not split:  # w ≡ 1 here (fixed, or no offline rows): the entropies are the update's own
            weigh()
            assert ent["w"] == 1.0, "the offline weight was needed before the update"
        mismatch = _mismatch(plan, cfg)
    w, w_raw, h_on, h_off = ent["w"], ent["w_raw"], ent["h_on"], ent["h_off"]
    batch = batch.replace(offline_weight=torch.full((batch.B,), float(w)))
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
        **mem,
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
        gradient_free_frac=pre["gradient_free"] / pre["sequences"],
    )
    m["tokens_per_s"] = pre["tokens"] / max(sum(v for kk, v in m.items() if kk.startswith("time_")), 1e-9)
    tr.last_samples = tr.samples(batch)
    return m


def _mismatch(plan: Plan, cfg) -> dict:
    """Engine/trainer log-prob mismatch on online tokens, in the plan's layout (the trainer's old log-probs:
    the old pass's, or the update's own before its step); with rollout.is_correction=tis its truncated IS
    weights are set on each micro-batch (the old pass ran, so this comes before the update)."""
    mbs = [mb for mb in plan.batches if len(mb.rows) and mb.engine_logprobs is not None]
    masks = [mb.loss_mask & ~mb.offline_mask for mb in mbs]
    if not mbs or not any(bool(m.any()) for m in masks):
        return {}
    eng = torch.cat([mb.engine_logprobs[m] for mb, m in zip(mbs, masks)])
    old = torch.cat([mb.old_logprobs[m] for mb, m in zip(mbs, masks)])
    mm = logprob_mismatch(eng, old, torch.ones_like(eng, dtype=torch.bool), cap=cfg.rollout.is_cap)
    if cfg.rollout.is_correction == "tis":
        for mb, m in zip(mbs, masks):
            mb.is_weights = logprob_mismatch(
                mb.engine_logprobs, mb.old_logprobs, m, cfg.rollout.is_cap
            ).is_weights
    return mm.metrics()
