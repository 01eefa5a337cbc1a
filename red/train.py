"""`python -m red.train [--config FILE] [key.sub=value ...]` (or `torchrun --nproc_per_node=N -m red.train ...`).

With no arguments it runs the embedded default (red/configs/default.yaml): a tiny Qwen2 model and a BPE tokenizer
built in-process, a labelled warm-up SFT stage on an easier task, then RED on the synthetic task family, and
ends with `held-out accuracy: X% -> Y%`. Outputs in output_dir: metrics.jsonl, samples.jsonl, dynamics.png,
summary.json, step_N/ checkpoints (HF-loadable) and `latest`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time

import numpy as np
import torch

from . import checkpoint as C
from . import distributed as D
from .config import ConfigError, effective, load_config
from .data import DataError, load_source, tokenize_examples
from .eval import evaluate, package_versions, summarise
from .metrics_log import MetricsLogger, write_samples
from .rewards import Verifier

log = logging.getLogger("red.train")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def trace_eos_id(tokenizer, chat_eos: str | None) -> int:
    """The token that ends an assistant turn: `<|im_end|>` for ChatML templates, else the tokenizer's EOS."""
    for tok in ([chat_eos] if chat_eos else []) + (["<|im_end|>"] if "<|im_end|>" in (tokenizer.chat_template or "")
                                                     else []):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != tokenizer.unk_token_id:
            return tid
    if tokenizer.eos_token_id is None:
        raise ConfigError("config key 'model.path': the tokenizer has no EOS token")
    return tokenizer.eos_token_id


def build_model(cfg, device, resume_dir):
    """(model, tokenizer, warm_up_ran)."""
    from .models import load_pretrained
    if resume_dir:
        model, tok = load_pretrained(resume_dir, cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
        return model.to(device), tok, False
    from .warmup import run_warmup, warmup_dir
    wdir = warmup_dir(cfg.output_dir)
    if cfg.warmup.enabled and os.path.isfile(os.path.join(wdir, "config.json")):
        log.info("warm-up already done: loading %s", wdir)
        model, tok = load_pretrained(wdir, cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
        return model.to(device), tok, False
    if cfg.model.path:
        model, tok = load_pretrained(cfg.model.path, cfg.model.dtype, cfg.model.config_overrides,
                                     cfg.model.attn_implementation)
    else:
        from . import synthetic
        tok = synthetic.build_tokenizer()
        model = synthetic.build_model(tok, cfg.model.tiny, seed=cfg.seed)
        model.config._attn_implementation = cfg.model.attn_implementation
    model = model.to(device)
    if cfg.warmup.enabled:
        run_warmup(cfg, model, tok, device, trace_eos_id(tok, cfg.data.eos_token))
        return model, tok, True
    return model, tok, False


def load_items(cfg, tok, eos_id):
    need = effective(cfg)["mode"] in ("red", "luffy", "sft", "sft_then_grpo")
    ex, skipped = load_source(cfg.data.train, cfg.data, split="train", seed=cfg.seed)
    train, rep = tokenize_examples(ex, tok, cfg.data, cfg.rollout.max_new_tokens, eos_id, need_traces=need,
                                   name=f"train {cfg.data.train}")
    evals = []
    for spec in cfg.data.eval:
        e, _ = load_source(spec, cfg.data, split="heldout", limit=cfg.data.eval_limit)
        items, _ = tokenize_examples(e, tok, cfg.data, eval_max_tokens(cfg), eos_id, name=f"eval {spec}",
                                     with_traces=False)
        evals.extend(items)
    for uid, it in enumerate(evals):
        it.uid = uid
    info = {"train_problems": len(train), "train_rows_skipped": len(skipped), "eval_problems": len(evals),
            **{f"data/{k}": v for k, v in rep.counts().items()}}
    return train, evals, info


def eval_max_tokens(cfg):
    return cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens


def run_eval(cfg, engine, tok, items, verifier):
    """Held-out evaluation, sharded over ranks, summarised globally."""
    if not items:
        return None
    mine = items[D.rank()::D.world_size()]
    res = evaluate(engine, tok, mine, verifier, n=cfg.eval.n, temperature=cfg.eval.temperature,
                   max_new_tokens=eval_max_tokens(cfg), top_p=1.0, seed=cfg.seed, keep_records=True)
    records = [r for part in D.gather_objects(res["records"]) for r in part]
    summ = summarise(records, res["n"])
    return {"accuracy": summ["all"][f"avg@{res['n']}"], "per_source": summ, "n": res["n"]}


def eval_row(ev) -> dict:
    if ev is None:
        return {}
    row = {"eval/acc": ev["accuracy"]}
    for src, s in ev["per_source"].items():
        if src != "all":
            row[f"eval/acc/{src}"] = s[f"avg@{ev['n']}"]
    row["eval/len_mean"] = ev["per_source"]["all"]["mean_length"]
    row["eval/truncation_rate"] = ev["per_source"]["all"]["truncation_rate"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m red.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="YAML file or a packaged config name (default: default.yaml)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=10")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return train(cfg)
    except (C.ResumeError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(cfg) -> int:
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    D.init_from_env(device.type)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    resume_dir = C.find_resume(cfg.output_dir, cfg.checkpoint.resume, cfg.train.steps)
    if cfg.checkpoint.resume == "never":
        C.clear(cfg.output_dir)
        D.barrier()
    if resume_dir:
        log.info("resuming from %s", resume_dir)
    model, tok, _ = build_model(cfg, device, resume_dir)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    eos_id = trace_eos_id(tok, cfg.data.eos_token)
    train_items, eval_items, info = load_items(cfg, tok, eos_id)

    from .rollout.factory import make_engine
    from .trainer import Trainer
    engine = make_engine(cfg, model, tok, stop_token_ids=sorted({eos_id, tok.eos_token_id} - {None}))
    verifier = Verifier(cfg.reward.workers, cfg.reward.timeout_s)
    trainer = Trainer(cfg, model, tok, train_items, engine, verifier, device)
    summary = {"versions": package_versions(), "config": cfg.to_dict(), **info}
    if resume_dir:
        st = C.load_state(resume_dir)
        trainer.load_state_dict(st["trainer"])
        summary = st.get("summary", summary)
        if "rng" in st:
            C.set_rng_state(st["rng"])
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    logger = MetricsLogger(metrics_path, os.path.join(cfg.output_dir, "tb") if cfg.log.tensorboard else None,
                           resume_step=trainer.step if resume_dir else None)
    try:
        if not resume_dir:
            before = run_eval(cfg, engine, tok, eval_items, verifier) if cfg.eval.before else None
            summary["eval_before"] = before
            logger.log({"step": 0, "stage": effective(cfg)["mode"], **info, **eval_row(before)})
            if before is not None and D.is_main():
                print(f"held-out accuracy before {effective(cfg)['mode']} (the base model): "
                      f"{100 * before['accuracy']:.1f}%", flush=True)
        if D.is_main():
            print(f"[{effective(cfg)['mode']} stage] steps {trainer.step + 1}..{cfg.train.steps}: "
                  f"{cfg.train.prompts_per_step} prompts x {cfg.rollout.n} ({effective(cfg)['num_offline']} teacher) "
                  f"per step on {cfg.data.train}", flush=True)
        _loop(cfg, trainer, engine, tok, eval_items, verifier, logger, summary)
    finally:
        verifier.close()
        logger.close()
    after, before = summary.get("eval_after"), summary.get("eval_before")
    summary["wall_time_s"] = time.perf_counter() - t_start
    if D.is_main():
        if cfg.log.plot:
            from .plot import plot_run
            plot_run(metrics_path, os.path.join(cfg.output_dir, "dynamics.png"),
                     title=f"{effective(cfg)['mode']} — {cfg.output_dir}")
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as fh:
            json.dump({k: v for k, v in summary.items() if k != "config"}, fh, indent=2, default=str)
        fmt = lambda e: "n/a" if e is None else f"{100 * e['accuracy']:.1f}%"
        print(f"outputs: {cfg.output_dir} (metrics.jsonl, dynamics.png, {os.path.basename(C.latest(cfg.output_dir) or '')})")
        print(f"held-out accuracy: {fmt(before)} -> {fmt(after)}", flush=True)
    return 0


def _loop(cfg, trainer, engine, tok, eval_items, verifier, logger, summary):
    from tqdm.auto import tqdm
    total = cfg.train.steps
    bar = tqdm(total=total, initial=trainer.step, desc=effective(cfg)["mode"], dynamic_ncols=True,
               disable=not (D.is_main() and cfg.log.progress))
    samples_path = os.path.join(cfg.output_dir, "samples.jsonl")
    while trainer.step < total:
        m = trainer.train_step()
        step = trainer.step
        if step == total or (cfg.eval.every and step % cfg.eval.every == 0):
            t = time.perf_counter()
            ev = run_eval(cfg, engine, tok, eval_items, verifier)
            m.update(eval_row(ev), time_eval=time.perf_counter() - t)
            if step == total:
                summary["eval_after"] = ev
        logger.log(m)
        if cfg.log.samples_every and step % cfg.log.samples_every == 0:
            write_samples(samples_path, step, trainer.last_samples)
        bar.update(1)
        post = {"R": m.get("reward_mean"), "acc": m.get("acc_online"), "len": m.get("len_online_mean"),
                "H_on": m.get("H_on"), "H_off": m.get("H_off"), "w": m.get("w"), "nll": m.get("nll"),
                "eval": m.get("eval/acc")}
        bar.set_postfix({k: f"{v:.3g}" for k, v in post.items() if isinstance(v, (int, float))}, refresh=False)
        if step == total or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            C.save(cfg.output_dir, step, trainer.model, tok,
                   {"trainer": trainer.state_dict(), "summary": summary, "config": cfg.to_dict()}, cfg.checkpoint.keep)
    bar.close()


if __name__ == "__main__":
    sys.exit(main())
