"""`python -m red.train [--config FILE] [key.sub=value ...]` (or `torchrun --nproc_per_node=N -m red.train ...`).

With no arguments it runs the embedded default (red/configs/default.yaml): a tiny Qwen2 model and a BPE tokenizer
built in-process, a labelled warm-up SFT stage on an easier task, then RED on the synthetic task family, and
ends with `held-out accuracy: X% -> Y%`. Outputs: see red/run_dir.py.

Exit status: 0 done; 2 bad input (config, data, run folder: one `error:` line naming the file/key and the fix);
3 stopped on non-finite numbers (the last good checkpoint intact); 130 / 143 stopped by SIGINT / SIGTERM after
writing a checkpoint (run the same command to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from transformers import set_seed

from . import checkpoint, drift, lean_layers, modes, parallel, synthetic
from .attention import packing_layout, resolve, shared_row_tokens
from .config import ConfigError, load_config
from .data import DataError, eval_sources, load_source, tokenize_examples
from .eval import package_versions
from .host_memory import HeapTrimmer
from .loop import Trainer, eval_row, run_stage
from .metrics import MetricsFileError, MetricsLogger
from .models import load_pretrained, stop_token_ids, trace_eos_id
from .rewards import Verifier
from .rollout import factory
from .rollout.session import RolloutSession
from .run_dir import RunDir, RunLock, RunLockError, json_ready, write_text
from .stop import GracefulStop, StopNow, Stopped
from .update import Policy

log = logging.getLogger("red.train")
# errors in what the user gave (config, data, run folder): one line on stderr and exit status 2, no traceback
FS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}
USER_ERRORS = (checkpoint.ResumeError, ConfigError, DataError, MetricsFileError, RunLockError)


def warmup_dir(cfg, run: RunDir) -> str:
    """Where the warm-up model is (to be) saved: warmup.path (shared by runs, e.g. red.compare's arms of one
    seed), else output_dir/warmup."""
    return cfg.warmup.path or run.warmup


def build_model(cfg, device, run: RunDir, resume_dir):
    """(model with float32 parameters, tokenizer, whether the warm-up is already done)."""
    attn = resolve(cfg.model.attn_implementation, device, cfg.model.dtype)
    warm_dir = warmup_dir(cfg, run)
    warm = cfg.warmup.enabled and os.path.isfile(os.path.join(warm_dir, "config.json"))
    if resume_dir or warm:
        if warm and not resume_dir:
            log.info("warm-up already done: loading %s", warm_dir)
        model, tok = load_pretrained(resume_dir or warm_dir, "float32", attn_implementation=attn)
    elif cfg.model.path:
        model, tok = load_pretrained(cfg.model.path, "float32", cfg.model.config_overrides, attn)
    else:
        tok = synthetic.build_tokenizer()
        model = synthetic.build_model(tok, cfg.model.tiny, seed=cfg.seed)
        model.config._attn_implementation = attn
    if cfg.model.gradient_checkpointing:  # transformers >= 5.25 renames it (the old name warns, gone in v6)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if cfg.model.lean_layers:
        swapped = lean_layers.apply(model)
        log.info("lean layers: %d RMSNorm, %d SwiGLU MLP modules", swapped["rmsnorm"], swapped["mlp"])
    return model.float().to(device), tok, bool(resume_dir or warm)


def read_examples(cfg, spec, split="train", seed=0):
    """(examples, skipped-row reports) of a data spec: read (and its errors raised) before any model loads."""
    return load_source(
        spec, cfg.data, split=split, seed=seed, limit=None if split == "train" else cfg.data.eval_limit
    )


def load_items(cfg, tok, eos_id, spec, split="train", seed=0, need_traces=False, read=None):
    ex, skipped = read or read_examples(cfg, spec, split, seed)
    max_len = cfg.rollout.max_new_tokens if split == "train" else cfg.eval_max_new_tokens()
    items, rep = tokenize_examples(
        ex,
        tok,
        cfg.data,
        max_len,
        eos_id,
        need_traces=need_traces,
        name=f"{split} {spec}",
        with_traces=split == "train",
    )
    return items, skipped, rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m red.train", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config", default=None, help="YAML file or a packaged config name (default: default.yaml)"
    )
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=10")
    ap.add_argument(
        "--warmup-only",
        action="store_true",
        help="run (or load) the warm-up, evaluate that base model, write summary.json and stop (red.compare "
        "shares one warm-up per seed between its arms this way)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        return train(load_config(args.config, args.overrides), warmup_only=args.warmup_only)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except checkpoint.NonFiniteError as e:  # training diverged: stopped with the last good checkpoint intact
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except Stopped as e:  # SIGINT / SIGTERM: the state is saved, the message says where
        print(e.message, file=sys.stderr, flush=True)
        return 128 + e.signum
    except StopNow as e:
        print(f"stopped at once by a second {e}: the step in flight is lost", file=sys.stderr, flush=True)
        return 128 + e.signum
    except OSError as e:  # a folder that cannot be written (read-only, full, a file in the way): say which
        if e.filename is None or e.errno not in FS_ERRNOS:
            raise
        print(
            f"error: {e.filename}: {e.strerror} ({errno.errorcode.get(e.errno, e.errno)}); output_dir must be a "
            f"writable folder with free space, data files readable",
            file=sys.stderr,
        )
        return 2


def ratio_distributions(rollout) -> str:
    """The one log line saying which two distributions the importance ratios (mismatch/*, is_correction) compare."""
    sampler = (
        "full softmax" if rollout.top_p >= 1 else f"top-p={rollout.top_p:g} truncated, renormalised softmax"
    )
    return (
        f"importance ratios compare the sampler's {sampler} with the trainer's full softmax, both at temperature "
        f"{rollout.temperature:g}"
        + ("" if rollout.top_p >= 1 else " (not the same distribution: biased ratios)")
    )


def train(cfg, warmup_only: bool = False) -> int:
    """A whole run of a loaded config (red/config.py): device, process group and seed, then `_train` under the
    run folder's lock with SIGINT / SIGTERM handled. 0 on success; `main` turns the errors into exit statuses."""
    t_start = time.perf_counter()
    if cfg.rollout.engine == "vllm":  # a missing vLLM stops the run before any model is built
        factory.choose_engine("vllm", on_cuda=True)
    device = parallel.pick_device(cfg.device)
    parallel.init_from_env(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    run = RunDir(cfg.output_dir)
    os.makedirs(run.root, exist_ok=True)
    with RunLock(run.root) if parallel.is_main() else contextlib.nullcontext(), GracefulStop() as stop:
        return _train(cfg, run, device, t_start, stop, warmup_only)


def _train(
    cfg, run: RunDir, device, t_start: float, stop: GracefulStop | None = None, warmup_only: bool = False
) -> int:
    """The run itself, holding the folder's lock (rank 0); `stop` tells the loop about SIGINT / SIGTERM.
    Data read -> resume point -> model -> data tokenised -> trainer -> the stages of red/modes.py (warm-up SFT,
    then the main stage; with `warmup_only`, its first evaluation only) -> summary."""
    reads = read_run_data(cfg)  # bad data stops the run before the folder is touched or a model loads
    resume_dir, state = resume_point(cfg, run)
    model, tok, warm_done = build_model(cfg, device, run, resume_dir)
    if state and state.get("master") is not None:
        model.load_state_dict(state["master"])
    eos_id = trace_eos_id(tok, cfg.data.eos_token)
    data = tokenize_run_data(cfg, tok, eos_id, *reads)
    tr = build_trainer(cfg, model, tok, eos_id, device, run)
    log.info(ratio_distributions(cfg.rollout))
    tr.stop = stop
    summary = (state or {}).get("summary") or {"versions": package_versions(), **data.info}
    summary["precision"] = tr.policy.precision()
    summary["attention"] = {"implementation": model.config._attn_implementation, "packing": tr.policy.packing}
    tracker = None  # W&B beside metrics.jsonl (rank 0); the JSONL stays the source of truth
    if "wandb" in cfg.log.report_to and parallel.is_main():
        from .tracking import WandbTracker

        tracker = WandbTracker(run.root, json_ready(cfg.to_dict()), name=cfg.output_dir)
    try:
        for stage in modes.plan(cfg):
            if stage.main:
                run_main_stage(tr, stage, data, state, summary, warmup_only, tracker)
            elif not warm_done:
                run_warmup(tr, stage, eos_id)
    finally:
        tr.verifier.close()
        tr.rollout.close()  # the vLLM engine: its temporary model directory and own process group
    summary["wall_time_s"] = time.perf_counter() - t_start
    if parallel.is_main():
        report(cfg, run, summary, data.split, tracker)
    return 0


def resume_point(cfg, run: RunDir):
    """(checkpoint directory to resume from or None, its trainer state or None). A fresh run
    (checkpoint.resume=never) clears the folder; a resumed one checks and records config drift. A fresh run
    writes its config to config.yaml; a resume never rewrites it."""
    resume_dir, state = checkpoint.find_resume(run, cfg.checkpoint.resume, cfg.train.steps)
    if cfg.checkpoint.resume == "never" and parallel.is_main():
        run.clear()
    parallel.barrier()
    if resume_dir:
        changes = drift.check(state["config"], cfg.to_dict(), cfg.checkpoint.allow_changes, resume_dir)
        log.info("resuming from %s", resume_dir)
        if changes and parallel.is_main():
            log.warning(
                "resume with changed config (allowed by checkpoint.allow_changes): %s; recorded in %s",
                ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
                run.config_history,
            )
            drift.record(run.root, RunDir.step_of(resume_dir), changes)
    if parallel.is_main() and not resume_dir:
        write_text(run.config, OmegaConf.to_yaml(cfg.to_dict()))
    return resume_dir, state


@dataclass
class RunData:
    """The main stage's problems: train items, evaluation items (uid = position) of `split` ('heldout' or
    'validation', red.data.eval_sources), counts for the first metrics row."""

    train: list
    eval: list
    split: str
    info: dict


def read_run_data(cfg) -> tuple:
    """(read of data.train, [(spec, read)] of the evaluation sets, their split): the rows, read with their errors
    raised."""
    train_read = read_examples(cfg, cfg.data.train, seed=cfg.seed)
    specs, split = eval_sources(cfg)
    return train_read, [(spec, read_examples(cfg, spec, split=split)) for spec in specs], split


def tokenize_run_data(cfg, tok, eos_id: int, train_read, eval_read, split: str) -> RunData:
    train_items, skipped, rep = load_items(
        cfg, tok, eos_id, cfg.data.train, seed=cfg.seed, need_traces=modes.uses_traces(cfg), read=train_read
    )
    eval_items = [
        it for spec, read in eval_read for it in load_items(cfg, tok, eos_id, spec, split=split, read=read)[0]
    ]
    for uid, it in enumerate(eval_items):
        it.uid = uid
    info = {
        "train_problems": len(train_items),
        "train_rows_skipped": len(skipped),
        "eval_problems": len(eval_items),
        **{f"data/{k}": v for k, v in rep.counts().items()},
    }
    return RunData(train_items, eval_items, split, info)


def build_trainer(cfg, model, tok, eos_id: int, device, run: RunDir) -> Trainer:
    """The policy (precision, parallel wrapper, micro-batch layout), the rollout session around the engine named
    by rollout.engine, the verifier, and the Trainer holding them."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    policy = Policy(model, cfg.model.dtype, cfg.train.parallel, pad_id)
    policy.packing = packing_layout(
        model.config._attn_implementation, device, cfg.train.packing, cfg.train.share_prompts
    )
    policy.row_tokens = shared_row_tokens(model.config)
    policy.trimmer = HeapTrimmer(cfg.train.release_host_memory and torch.device(device).type == "cpu")
    engine = factory.make_engine(cfg, model, tok, stop_token_ids=stop_token_ids(tok, eos_id))
    verifier = Verifier(cfg.reward.workers, cfg.reward.timeout_s, fn=cfg.reward.fn)
    return Trainer(cfg, policy, tok, RolloutSession(engine, model), verifier, run)


def say(text: str) -> None:
    """A progress line on stdout (rank 0)."""
    if parallel.is_main():
        print(text, flush=True)


def run_warmup(tr: Trainer, stage, eos_id: int) -> None:
    """The warm-up SFT stage on its own (easier) task, saved as the base model (`warmup_dir`)."""
    cfg = tr.cfg
    items = load_items(cfg, tr.tok, eos_id, stage.data, seed=stage.seed, need_traces=True)[0]
    tr.begin(stage, items)
    say(
        f"[warm-up stage] SFT of the base model on {stage.data} (a different, easier task than "
        f"{cfg.data.train}; never the held-out problems): {stage.steps} steps x {stage.prompts_per_step} traces"
    )
    t0 = time.perf_counter()
    with MetricsLogger(tr.run.warmup_metrics) as logger:
        run_stage(tr, stage, logger)
    m = tr.last_metrics
    say(
        f"[warm-up stage] done in {time.perf_counter() - t0:.0f}s: final NLL {m['nll']:.3f}, "
        f"teacher-token prob {m.get('teacher_prob', float('nan')):.3f}"
    )
    checkpoint.save_model(tr.policy.model, tr.tok, warmup_dir(cfg, tr.run), tr.policy.compute)


def run_main_stage(
    tr: Trainer, stage, data: RunData, state, summary: dict, warmup_only: bool = False, tracker=None
) -> None:
    """The main stage, from the checkpoint's step when resuming; a fresh one first evaluates the base model
    (step 0 row; with `warmup_only` that is all). Evaluations and checkpoints go into `summary` and
    metrics.jsonl."""
    cfg = tr.cfg
    tr.begin(stage, data.train)
    if state:
        tr.load_state_dict(state)
        if "rng" in state:
            checkpoint.set_rng_state(state["rng"])
    with MetricsLogger(
        tr.run.metrics,
        tr.run.tensorboard if cfg.log.tensorboard or "tensorboard" in cfg.log.report_to else None,
        resume_step=tr.step if state else None,
        tracker=tracker,
    ) as logger:
        if not state:
            before = tr.evaluate(data.eval) if cfg.eval.before or warmup_only else None
            summary["eval_before"] = before
            logger.log({"step": 0, "stage": stage.name, **data.info, **eval_row(before)})
            if before is not None:
                say(
                    f"{data.split.replace('heldout', 'held-out')} accuracy before {stage.name} (the base model): "
                    f"{100 * before['accuracy']:.1f}%"
                )
        if warmup_only:
            summary["warmup_only"] = True
            return
        say(
            f"[{stage.name} stage] steps {tr.step + 1}..{stage.steps}: {stage.prompts_per_step} prompts x "
            f"{cfg.rollout.n} ({stage.phases[-1].k} teacher) per step on {stage.data}"
        )
        run_stage(tr, stage, logger, data.eval, summary)


def report(cfg, run: RunDir, summary: dict, split: str, tracker=None) -> None:
    """summary.json, the dynamics plot (also to W&B), and the last two lines of the run (outputs, accuracy
    before -> after)."""
    if cfg.log.plot:
        from .plot import plot_run

        plot_run(run.metrics, run.plot, title=f"{cfg.algorithm.mode} — {cfg.output_dir}")
        if tracker is not None:
            tracker.log_image("dynamics", run.plot)
    if tracker is not None:
        tracker.finish()
    write_text(run.summary, json.dumps(json_ready(summary), indent=2, default=str, allow_nan=False))

    def fmt(e):
        return "n/a" if e is None else f"{100 * e['accuracy']:.1f}%"

    print(f"outputs: {cfg.output_dir} (metrics.jsonl, dynamics.png, {os.path.basename(run.latest() or '')})")
    name = "held-out" if split == "heldout" else split
    print(
        f"{name} accuracy: {fmt(summary.get('eval_before'))} -> {fmt(summary.get('eval_after'))}", flush=True
    )


if __name__ == "__main__":
    sys.exit(main())
