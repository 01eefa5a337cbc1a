"""The loop: runs the stages of a run (red/modes.py) step by step and owns the cadence — evaluation, checkpoints,
metrics rows, sample completions, the progress bar. The rollout engine's lifecycle (lazy weight sync, wake,
sleep, close) is the RolloutSession's (red/rollout/session.py).
"""

from __future__ import annotations

import logging
import signal
import time
import warnings

import torch

from . import checkpoint, parallel
from .algorithm import EntropyRatioWeight
from .checkpoint import NonFiniteError
from .data import PromptStream
from .eval import evaluate, summarise
from .metrics import write_samples
from .modes import loss_config, offline_weight_settings
from .records import STATUSES
from .step import run_step
from .stop import Stopped
from .update import make_optimizer

log = logging.getLogger("red.loop")


class Trainer:
    """Run state: what the run is made of (config, policy, tokenizer, rollout session, verifier, run directory)
    and the state of the running stage (optimizer, schedule, prompt stream, offline weight w, step counter)."""

    def __init__(self, cfg, policy, tokenizer, rollout, verifier, run):
        self.cfg, self.policy, self.tok, self.rollout, self.verifier, self.run = (
            cfg,
            policy,
            tokenizer,
            rollout,
            verifier,
            run,
        )
        self.nonfinite_streak = 0  # steps in a row whose update was skipped (non-finite loss or gradient)
        self.last_samples: list = []

    def begin(self, stage, items) -> None:
        ws = parallel.world_size()
        if stage.main and stage.prompts_per_step % ws:
            raise ValueError(
                f"config key 'train.prompts_per_step': {stage.prompts_per_step} is not divisible "
                f"by the world size {ws} (ranks own whole groups)"
            )
        self.stage, self.items, self.step = stage, items, 0
        self.per_rank = max(stage.prompts_per_step // ws, 1)
        self.new_optimizer(0)
        self.stream = PromptStream(len(items), stage.seed, self.cfg.data.shuffle or not stage.main)
        last = stage.phases[-1]
        self.weight = EntropyRatioWeight(**offline_weight_settings(self.cfg, last.mode, last.k))
        self.loss_cfg = {p.mode: loss_config(self.cfg, p.mode) for p in stage.phases}

    def new_optimizer(self, step: int) -> None:
        """A fresh optimizer and schedule for the phase that runs `step` (red/modes.py Stage.schedule_of)."""
        i, st = self.stage.phase_index(step), self.stage
        sch = st.schedule_of(i)
        self.opt, self.sched = make_optimizer(
            self.policy.model,
            sch.lr,
            self.cfg.optim.betas,
            st.weight_decay,
            st.optimizer_span(i),
            sch.warmup_steps,
            sch.min_lr_ratio,
        )
        self.opt_phase = i

    def phase_changes_optimizer(self) -> bool:
        """Whether the next step starts a phase with another optimizer (see modes.Phase.schedule)."""
        i = self.stage.phase_index(self.step)
        return i != self.opt_phase and self.stage.optimizer_span(i) != self.stage.steps

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "cursor": self.stream.cursor,
            "scheduler": self.sched.state_dict(),
            "entropy_weight": self.weight.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """From a checkpoint's trainer_state.pt (red/checkpoint.py)."""
        st = state["trainer"]
        self.step, self.stream.cursor = st["step"], st["cursor"]
        last = self.stage.phase_index(max(self.step - 1, 0))  # the phase whose optimizer was saved
        self.new_optimizer(max(self.step - 1, 0))
        checkpoint.load_optimizer(self.policy.model, self.opt, state)
        self.sched.load_state_dict(st["scheduler"])
        self.opt_phase = last
        self.weight.load_state_dict(st["entropy_weight"])
        # the checkpoint's optimizer state carries its hyperparameters: the config's win (they differ only
        # when checkpoint.allow_changes let them, red/drift.py); the current lr is recomputed from the
        # schedule (same formula as the scheduler's own step, so unchanged settings give the same bits)
        lr = self.stage.schedule_of(last).lr
        self.sched.base_lrs = [lr for _ in self.opt.param_groups]
        for g, f in zip(self.opt.param_groups, self.sched.lr_lambdas, strict=True):
            g.update(
                initial_lr=lr,
                lr=lr * f(self.sched.last_epoch),
                betas=tuple(self.cfg.optim.betas),
                weight_decay=self.stage.weight_decay,
            )
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]

    def take_items(self, per_rank: int):
        ws = parallel.world_size()
        return [self.items[i] for i in self.stream.take(per_rank * ws)[parallel.rank() :: ws]]

    def seed_for(self, attempt: int) -> int:
        return (
            self.cfg.seed * 1_000_003 + self.step * 7_919 + attempt * 104_729 + parallel.rank() * 15_485_863
        ) % 2**62

    def samples(self, batch) -> list:
        """Up to log.samples_max rows: one online sample and the teacher trace of the first groups."""
        out = []
        for g, it in enumerate(batch.items):
            rows = range(g * batch.n, (g + 1) * batch.n)
            for pick in [r for r in rows if not batch.is_offline[r]][:1] + [
                r for r in rows if batch.is_offline[r]
            ][:1]:
                if len(out) >= self.cfg.log.samples_max:
                    return out
                out.append(
                    {
                        "row": it.row,
                        "prompt": self.tok.decode(it.prompt_ids, skip_special_tokens=True),
                        "answer": it.answer,
                        "offline": bool(batch.is_offline[pick]),
                        "status": STATUSES[int(batch.status[pick])],
                        "reward": float(batch.reward[pick]),
                        "advantage": float(batch.advantage[pick]),
                        "response": batch.texts[pick],
                    }
                )
        return out

    def evaluate(self, items):
        """Held-out evaluation, sharded over ranks, summarised globally."""
        if not items:
            return None
        c = self.cfg
        mine = items[parallel.rank() :: parallel.world_size()]
        res = evaluate(
            self.rollout,
            self.tok,
            mine,
            self.verifier,
            n=c.eval.n,
            temperature=c.eval.temperature,
            max_new_tokens=c.eval_max_new_tokens(),
            top_p=1.0,
            seed=c.seed,
            keep_records=True,
        )
        records = [r for part in parallel.gather_objects(res["records"]) for r in part]
        summ = summarise(records, res["n"])
        return {"accuracy": summ["all"][f"avg@{res['n']}"], "per_source": summ, "n": res["n"]}


def eval_row(ev) -> dict:
    if ev is None:
        return {}
    row = {"eval/acc": ev["accuracy"]}
    row.update(
        {f"eval/acc/{src}": s[f"avg@{ev['n']}"] for src, s in ev["per_source"].items() if src != "all"}
    )
    row["eval/len_mean"] = ev["per_source"]["all"]["mean_length"]
    row["eval/truncation_rate"] = ev["per_source"]["all"]["truncation_rate"]
    return row


def run_stage(tr: Trainer, stage, logger, eval_items=(), summary=None) -> None:
    """Steps tr.step..stage.steps of a begun stage; the main stage evaluates, checkpoints and writes samples."""
    from tqdm.auto import tqdm

    cfg = tr.cfg
    desc = stage.name if stage.main else f"warm-up SFT on {stage.data}"
    bar = tqdm(
        total=stage.steps,
        initial=tr.step,
        desc=desc,
        dynamic_ncols=True,
        disable=not (parallel.is_main() and cfg.log.progress),
    )
    t0, m = time.perf_counter(), {}
    while tr.step < stage.steps:
        t = time.perf_counter()
        phase = stage.phase_at(tr.step)
        if tr.phase_changes_optimizer():
            tr.new_optimizer(tr.step)
        skipped_before = tr.policy.skipped_updates
        m = run_step(tr, phase)
        with warnings.catch_warnings():  # a step whose groups were all dropped made no optimizer step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            tr.sched.step()
        tr.step += 1
        step = tr.step
        m.update(
            step=step,
            mode=phase.mode,
            lr=tr.opt.param_groups[0]["lr"],
            epoch=tr.stream.epoch,
            time_step=time.perf_counter() - t,
        )
        if not stage.main:
            m.update(stage="warmup", time=time.perf_counter() - t0)
        elif step == stage.steps or (cfg.eval.every and step % cfg.eval.every == 0):
            t = time.perf_counter()
            ev = tr.evaluate(list(eval_items))
            m.update(eval_row(ev), time_eval=time.perf_counter() - t)
            if step == stage.steps:
                summary["eval_after"] = ev
        skipped = tr.policy.skipped_updates > skipped_before
        tr.nonfinite_streak = tr.nonfinite_streak + 1 if skipped else 0
        m.update(update_skipped_nonfinite=int(skipped), updates_skipped_total=tr.policy.skipped_updates)
        signum, weights_ok = step_flags(tr)
        logger.log(m)
        check_numerics(tr, step, skipped, weights_ok)
        if stage.main and cfg.log.samples_every and step % cfg.log.samples_every == 0:
            write_samples(tr.run.samples, step, tr.last_samples)
        bar.update(1)
        post = {
            "R": m.get("reward_mean"),
            "acc": m.get("acc_online"),
            "len": m.get("len_online_mean"),
            "H_on": m.get("H_on"),
            "H_off": m.get("H_off"),
            "w": m.get("w"),
            "nll": m.get("nll"),
            "p_teacher": None if stage.main else m.get("teacher_prob"),
            "eval": m.get("eval/acc"),
        }
        bar.set_postfix(
            {k: f"{v:.3g}" for k, v in post.items() if isinstance(v, (int, float))}, refresh=False
        )
        saved = stage.main and (
            step == stage.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        )
        if saved:
            save_checkpoint(tr, step, summary)
        if signum:
            bar.close()
            name = signal.Signals(signum).name
            if not stage.main:
                raise Stopped(signum, f"stopped by {name} in the warm-up stage (step {step}): nothing saved")
            if not saved:
                save_checkpoint(tr, step, summary)
            raise Stopped(
                signum,
                f"stopped by {name} after step {step}: checkpoint {tr.run.step(step)} written; run the same "
                f"command to resume",
            )
    bar.close()
    tr.last_metrics = m


def step_flags(tr: Trainer) -> tuple[int | None, bool]:
    """(the signal that asked the run to stop or None, whether every parameter is finite), the same on every
    rank: local shards under FSDP2, one small reduction per step when distributed."""
    ok = all(
        bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
        for p in tr.policy.model.parameters()
    )
    stop = getattr(tr, "stop", None)
    signum = stop.signum if stop is not None else None
    if parallel.world_size() > 1:
        _, mx = parallel.reduce(maxes={"signum": signum or 0, "bad": float(not ok)})
        signum, ok = int(mx["signum"]) or None, mx["bad"] == 0
    return signum, ok


def check_numerics(tr: Trainer, step: int, skipped: bool, weights_ok: bool) -> None:
    """Stop (NonFiniteError) when the weights went non-finite, or after train.max_nonfinite_steps skipped
    updates in a row; a single skipped update is logged and training goes on."""
    last = tr.run.latest() or "none yet"
    if not weights_ok:
        raise NonFiniteError(
            f"step {step}: the optimizer step made the weights non-finite (NaN/inf; is optim.lr sane?): stopping "
            f"before anything is saved; the last good checkpoint ({last}) is intact"
        )
    limit = tr.cfg.train.max_nonfinite_steps
    if skipped and parallel.is_main():
        log.warning(
            "step %d: non-finite loss or gradient norm, update skipped (%d in a row; the run stops at %d)",
            step,
            tr.nonfinite_streak,
            limit,
        )
    if tr.nonfinite_streak >= limit:
        raise NonFiniteError(
            f"steps {step - limit + 1}..{step}: a non-finite loss or gradient in {limit} steps in a row (updates "
            f"skipped; train.max_nonfinite_steps={limit}): stopping; the last good checkpoint ({last}) is intact. "
            f"Lower optim.lr or check the data, then resume"
        )


def save_checkpoint(tr: Trainer, step: int, summary) -> None:
    checkpoint.save(
        tr.run,
        step,
        tr.policy.model,
        tr.tok,
        tr.policy.compute,
        tr.opt,
        {"trainer": tr.state_dict(), "summary": summary, "config": tr.cfg.to_dict()},
        tr.cfg.checkpoint.keep,
    )
