"""One training step of every mode (red, luffy, grpo, sft, sft_then_grpo) in one pipeline.

RL step: draw prompts -> rollouts (n - k online + k teacher) -> rewards -> dynamic sampling with refill ->
old-policy pass (log p, entropy via red_kernels) -> w from the entropy-change ratio -> advantages, r̄ ->
red_loss over token-budgeted micro-batches with the global normaliser -> gradient all-reduce -> clip -> AdamW.
"""
from __future__ import annotations

import logging
import math
import time
import warnings

import torch

from . import distributed as D
from .algorithm import (EntropyRatioWeight, group_accuracy, group_advantages, refill, sample_mean_entropy,
                        split_means)
from .config import effective
from .groups import build_groups, grade_groups
from .policy import Sequence, collate, hidden_states, lm_head, micro_batches, old_policy_pass, per_token
from .rollout.base import SamplingConfig
from .rollout.mismatch import logprob_mismatch

log = logging.getLogger("red.trainer")
SUM_KEYS = ("pg_online", "pg_offline", "sft", "entropy_bonus", "kl")


def cosine_schedule(total: int, warmup: int, min_ratio: float):
    def f(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def make_optimizer(model, lr, betas, weight_decay, total, warmup, min_ratio):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(betas),
                            weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(total, warmup, min_ratio))
    return opt, sched


def policy_update(model, seqs, loss_cfg, pad_id, token_budget, device, opt, grad_clip, old=None):
    """One optimizer step over `seqs` (this rank's part of the batch): red_loss per micro-batch, normalised by
    the global batch size, gradients summed over ranks, clipped. Returns metrics (global where it matters)."""
    from red_kernels import red_loss

    weight, bias = lm_head(model)
    seq_agg = loss_cfg.loss_agg != "token_mean"
    local = len(seqs) if seq_agg else sum(len(s.response_ids) for s in seqs)
    norm = D.sum_scalar(local)
    opt.zero_grad(set_to_none=True)
    sums = {k: 0.0 for k in SUM_KEYS + ("loss",)}
    means, weights = {}, {}
    model.train()
    for idx in micro_batches([s.length for s in seqs], token_budget):
        mb_seqs = [seqs[i] for i in idx]
        mb = collate(mb_seqs, pad_id).to(device)
        old_lp = None if old is None else per_token([old[i] for i in idx], mb_seqs, mb.input_ids.shape[1]).to(device)
        h = hidden_states(model, mb.input_ids, mb.attention_mask)[:, :-1]
        out = red_loss(h, weight, mb.targets, mb.advantages.to(device), loss_mask=mb.loss_mask,
                       old_logprobs=old_lp, offline_mask=mb.offline_mask, group_accuracy=mb.group_accuracy,
                       offline_weight=mb.offline_weight, is_weights=mb.is_weights, bias=bias, config=loss_cfg,
                       global_normalizer=max(norm, 1.0))
        out.loss.backward()
        sums["loss"] += float(out.loss.detach())
        n_on = float((mb.loss_mask & ~mb.offline_mask).sum())
        n_off = float(mb.offline_mask.sum())
        for k, v in out.metrics.items():
            if k in SUM_KEYS:
                sums[k] += float(v)
            else:
                wgt = n_off if k in ("teacher_prob", "phi_mean", "entropy_offline") else n_on
                means[k] = means.get(k, 0.0) + float(v) * wgt
                weights[k] = weights.get(k, 0.0) + wgt
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    D.all_reduce_grads(params)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    opt.step()
    out = {k: D.sum_scalar(v) for k, v in sums.items()}
    for k in means:
        tot = D.sum_scalar(weights[k])
        out[k] = D.sum_scalar(means[k]) / tot if tot > 0 else float("nan")
    out["grad_norm"] = grad_norm
    return out


class Trainer:
    def __init__(self, cfg, model, tokenizer, train_items, engine, verifier, device):
        from red_kernels import REDLossConfig

        self.cfg, self.model, self.tok, self.items = cfg, model, tokenizer, train_items
        self.engine, self.verifier, self.device = engine, verifier, device
        self.eff = effective(cfg)
        o = cfg.optim
        self.opt, self.sched = make_optimizer(model, o.lr, o.betas, o.weight_decay, cfg.train.steps,
                                              o.warmup_steps, o.min_lr_ratio)
        from .data import PromptStream
        self.stream = PromptStream(len(train_items), cfg.seed, cfg.data.shuffle)
        self.weight = EntropyRatioWeight(w_min=cfg.algorithm.w_min, w_max=self.eff["w_max"], eps=cfg.algorithm.w_eps,
                                         ema=cfg.algorithm.entropy_ema, fixed=self.eff["offline_weight"] == "fixed")
        lo = cfg.loss
        self.tau = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        self.loss_cfg = REDLossConfig(
            clip_eps_low=lo.clip_eps_low, clip_eps_high=lo.clip_eps_high, dual_clip=lo.dual_clip,
            offline_shaping=self.eff["offline_shaping"], shaping_gamma=lo.shaping_gamma, r_min=self.eff["r_min"],
            sft_coef=lo.sft_coef, entropy_coef=self.eff["entropy_coef"], kl_coef=lo.kl_coef, temperature=self.tau,
            loss_agg=lo.loss_agg, loss_const=self.eff["loss_const"])
        self.sft_cfg = REDLossConfig(offline_shaping="none", sft_coef=1.0, loss_agg="token_mean", temperature=1.0)
        ws = D.world_size()
        if cfg.train.prompts_per_step % ws:
            raise ValueError(f"config key 'train.prompts_per_step': {cfg.train.prompts_per_step} is not divisible "
                             f"by the world size {ws} (ranks own whole groups)")
        self.per_rank = cfg.train.prompts_per_step // ws
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.step = 0
        self.last_samples: list = []

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, "cursor": self.stream.cursor, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "entropy_weight": self.weight.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.step, self.stream.cursor = st["step"], st["cursor"]
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.weight.load_state_dict(st["entropy_weight"])

    def mode_at(self, step: int) -> str:
        m = self.eff["mode"]
        if m == "sft_then_grpo":
            return "sft" if step < self.cfg.algorithm.sft_steps else "grpo"
        return m

    def _take_items(self, per_rank=None):
        per_rank = self.per_rank if per_rank is None else per_rank
        idx = self.stream.take(per_rank * D.world_size())[D.rank()::D.world_size()]
        return [self.items[i] for i in idx]

    def _seed(self, attempt: int) -> int:
        return (self.cfg.seed * 1_000_003 + self.step * 7_919 + attempt * 104_729 + D.rank() * 15_485_863) % 2**62

    # ------------------------------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        mode = self.mode_at(self.step)
        m = self._sft_step() if mode == "sft" else self._rl_step(mode)
        with warnings.catch_warnings():   # a step whose groups were all dropped made no optimizer step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched.step()
        self.step += 1
        m.update(step=self.step, mode=mode, lr=self.opt.param_groups[0]["lr"], epoch=self.stream.epoch,
                 time_step=time.perf_counter() - t0)
        return m

    def _sft_step(self) -> dict:
        items = self._take_items()
        k = max(self.cfg.rollout.num_offline, 1)
        seqs = [Sequence(list(it.prompt_ids), list(it.trace_ids[j % len(it.trace_ids)]), is_offline=True)
                for it in items if it.trace_ids for j in range(k)]
        t = time.perf_counter()
        m = policy_update(self.model, seqs, self.sft_cfg, self.pad_id, self.cfg.train.micro_batch_tokens, self.device,
                          self.opt, self.cfg.optim.grad_clip)
        self.engine.load_weights(self.model.named_parameters())
        m["nll"] = m.pop("sft")
        m["time_update"] = time.perf_counter() - t
        m["tokens"] = D.sum_scalar(sum(len(s.response_ids) for s in seqs))
        return m

    def _rl_step(self, mode: str) -> dict:
        cfg, eff = self.cfg, self.eff
        k = eff["num_offline"] if mode in ("red", "luffy") else 0
        n_on = cfg.rollout.n - k
        sampling = SamplingConfig(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p)
        timers = {"time_rollout": 0.0, "time_reward": 0.0}
        all_drawn = []

        def draw(attempt, need):
            # a refill draws what the most-short rank still needs, so every rank takes the same slice size
            items = self._take_items(max(int(D.max_scalar(need)), 1))
            t = time.perf_counter()
            self.engine.wake()
            sampling.seed = self._seed(attempt)
            rollouts = self.engine.generate([it.prompt_ids for it in items], n_on, sampling)
            timers["time_rollout"] += time.perf_counter() - t
            t = time.perf_counter()
            groups = build_groups(items, rollouts, k)
            grade_groups(groups, self.tok, self.verifier, cfg.reward, cfg.rollout.max_new_tokens)
            timers["time_reward"] += time.perf_counter() - t
            all_drawn.extend(groups)
            acc = torch.stack([g.acc() for g in groups]) if groups else torch.zeros(0, cfg.rollout.n)
            return groups, acc

        groups, ds = refill(draw, self.per_rank, cfg.algorithm.max_refill, cfg.algorithm.dynamic_sampling,
                            need_more=D.any_true)
        self.engine.sleep()
        m = self._rollout_metrics(all_drawn, ds)
        m.update(timers)
        if D.sum_scalar(len(groups)) == 0:
            log.warning("step %d: every group was dropped by dynamic sampling; no update", self.step + 1)
            m["skipped_update"] = 1
            return m
        seqs = [mem.seq for g in groups for mem in g.members]
        is_off = torch.tensor([s.is_offline for s in seqs], dtype=torch.bool).reshape(-1)
        t = time.perf_counter()
        old, ents = old_policy_pass(self.model, seqs, self.pad_id, cfg.train.micro_batch_tokens, self.tau, self.device)
        m["time_old_pass"] = time.perf_counter() - t
        h = torch.tensor([float(e.double().mean()) if len(e) else 0.0 for e in ents], dtype=torch.float64)
        h_on, h_off = self._global_means(h, is_off)          # plain means over samples, all ranks
        w, w_raw = self.weight.update(h_on, h_off)
        n = cfg.rollout.n   # (a rank may hold no kept group while others do: empty [0, n] tensors then)
        acc_all = torch.stack([g.acc() for g in groups]) if groups else torch.zeros(0, n)
        offline_flags = torch.stack([g.is_offline() for g in groups]) if groups else torch.zeros(0, n, dtype=torch.bool)
        rewards = torch.stack([g.rewards() for g in groups]) if groups else torch.zeros(0, n)
        adv = group_advantages(rewards, offline_flags, adv_std=cfg.algorithm.adv_std,
                               adv_stats=cfg.algorithm.adv_stats if k else "group")
        rbar = group_accuracy(acc_all)
        for gi, g in enumerate(groups):
            for j, mem in enumerate(g.members):
                mem.seq.advantage = float(adv[gi, j])
                mem.seq.group_accuracy = float(rbar[gi])
                mem.seq.offline_weight = w
        m.update(self._mismatch(seqs, old))
        t = time.perf_counter()
        for _ in range(cfg.train.ppo_epochs):
            upd = policy_update(self.model, seqs, self.loss_cfg, self.pad_id, cfg.train.micro_batch_tokens,
                                self.device, self.opt, cfg.optim.grad_clip, old=old)
        self.engine.load_weights(self.model.named_parameters())
        m["time_update"] = time.perf_counter() - t
        m.update(upd)
        m.update(H_on=h_on, H_off=h_off, w=w, w_raw=w_raw, w_raw_abs=abs(w_raw) if math.isfinite(w_raw) else None,
                 rbar_mean=float(rbar.mean()) if len(rbar) else None,
                 rbar_min=float(rbar.min()) if len(rbar) else None, rbar_max=float(rbar.max()) if len(rbar) else None,
                 adv_offline_mean=float(adv[offline_flags].mean()) if k and len(rbar) else None,
                 groups_kept=D.sum_scalar(len(groups)))
        tokens = D.sum_scalar(sum(s.length for s in seqs))
        m["tokens"] = tokens
        m["tokens_per_s"] = tokens / max(sum(v for kk, v in m.items() if kk.startswith("time_")), 1e-9)
        self.last_samples = self._samples(groups)
        return m

    # ------------------------------------------------------------------------------------------ metrics
    @staticmethod
    def _global_means(h, is_off):
        s_on = D.sum_scalar(float(h[~is_off].sum())); c_on = D.sum_scalar(float((~is_off).sum()))
        s_off = D.sum_scalar(float(h[is_off].sum())); c_off = D.sum_scalar(float(is_off.sum()))
        return (s_on / c_on if c_on else None), (s_off / c_off if c_off else None)

    def _rollout_metrics(self, groups, ds) -> dict:
        """Over every drawn group (before dynamic sampling), summed over ranks."""
        S = lambda x: D.sum_scalar(x)
        on = [m for g in groups for m in g.members if not m.is_offline]
        off = [m for g in groups for m in g.members if m.is_offline]
        cnt = lambda ms, f: S(sum(1 for m in ms if f(m)))
        tot = lambda ms, f: S(sum(f(m) for m in ms))
        n_on, n_off, n_groups = S(len(on)), S(len(off)), S(len(groups))
        div = lambda a, b: a / b if b else None
        cor, wrong = [m for m in on if m.correct], [m for m in on if not m.correct]
        out = {
            "reward_mean": div(tot(on + off, lambda m: m.reward), n_on + n_off),
            "reward_online": div(tot(on, lambda m: m.reward), n_on),
            "reward_offline": div(tot(off, lambda m: m.reward), n_off),
            "acc_online": div(cnt(on, lambda m: m.correct), n_on),
            "acc_offline": div(cnt(off, lambda m: m.correct), n_off),
            "len_online_mean": div(tot(on, lambda m: m.length), n_on),
            "len_online_max": max(D.gather_objects(max([m.length for m in on], default=0))),
            "len_offline_mean": div(tot(off, lambda m: m.length), n_off),
            "len_correct_mean": div(tot(cor, lambda m: m.length), S(len(cor))),
            "len_wrong_mean": div(tot(wrong, lambda m: m.length), S(len(wrong))),
            "truncated_frac": div(cnt(on, lambda m: m.truncated), n_on),
            "truncated_frac_correct": div(cnt(cor, lambda m: m.truncated), S(len(cor))),
            "truncated_frac_wrong": div(cnt(wrong, lambda m: m.truncated), S(len(wrong))),
            "groups_drawn": n_groups, "draws": ds["draws"],
            "drop_frac_all_correct": div(S(ds["dropped_all_correct"]), n_groups),
            "drop_frac_all_wrong": div(S(ds["dropped_all_wrong"]), n_groups),
            "groups_short": S(ds["short"]),
        }
        for st in ("correct", "wrong", "no_answer", "timeout", "gold_unparseable"):
            out[f"status_online/{st}"] = cnt(on, lambda m, st=st: m.status == st)
            out[f"status_offline/{st}"] = cnt(off, lambda m, st=st: m.status == st)
        tf = out["truncated_frac"]
        if tf is not None and tf > self.cfg.log.truncation_warn and D.is_main():
            log.warning("step %d: %.0f%% of online samples hit rollout.max_new_tokens=%d (their reward is usually 0)",
                        self.step + 1, 100 * tf, self.cfg.rollout.max_new_tokens)
        return out

    def _mismatch(self, seqs, old) -> dict:
        on = [(s, o) for s, o in zip(seqs, old) if not s.is_offline and s.engine_logprobs is not None]
        if not on:
            return {}
        eng = torch.cat([torch.tensor(s.engine_logprobs, dtype=torch.float32) for s, _ in on])[None]
        tr = torch.cat([o for _, o in on])[None]
        mm = logprob_mismatch(eng, tr, torch.ones_like(eng, dtype=torch.bool), cap=self.cfg.rollout.is_cap)
        if self.cfg.rollout.is_correction == "tis":
            off = 0
            for s, o in on:
                s.is_weights = mm.is_weights[0, off:off + len(o)].tolist()
                off += len(o)
        return mm.metrics()

    def _samples(self, groups) -> list:
        """Up to log.samples_max members: one online sample and the teacher trace of the first groups."""
        out = []
        for g in groups:
            picks = [next((m for m in g.members if not m.is_offline), None),
                     next((m for m in g.members if m.is_offline), None)]
            for mem in (p for p in picks if p is not None):
                if len(out) >= self.cfg.log.samples_max:
                    return out
                out.append({"row": g.item.row, "prompt": self.tok.decode(g.item.prompt_ids, skip_special_tokens=True),
                            "answer": g.item.answer, "offline": mem.is_offline, "status": mem.status,
                            "reward": mem.reward, "advantage": mem.seq.advantage, "response": mem.text})
        return out
