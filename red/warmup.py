"""Warm-up stage: supervised fine-tuning on a different, easier task distribution, so that RED starts from a
'pretrained base' (the embedded default starts from a random model). Never trains on evaluation problems.

The result is saved to output_dir/warmup/ (HF format); a rerun (or a resume killed before the first RED
checkpoint) reloads it instead of training again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

from . import distributed as D
from .data import PromptStream, load_source, tokenize_examples
from .policy import Sequence
from .trainer import make_optimizer, policy_update

log = logging.getLogger("red.warmup")


def warmup_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "warmup")


def run_warmup(cfg, model, tokenizer, device, eos_id: int):
    """SFT `model` in place for cfg.warmup.steps on cfg.warmup.data. Returns the model."""
    from red_kernels import REDLossConfig
    from tqdm.auto import tqdm

    w = cfg.warmup
    examples, _ = load_source(w.data, cfg.data, split="train", seed=cfg.seed + 1)
    items, _ = tokenize_examples(examples, tokenizer, cfg.data, cfg.rollout.max_new_tokens, eos_id,
                                 need_traces=True, name=f"warmup {w.data}")
    opt, sched = make_optimizer(model, w.lr, cfg.optim.betas, 0.0, w.steps, w.warmup_steps, 0.1)
    loss_cfg = REDLossConfig(offline_shaping="none", sft_coef=1.0, loss_agg="token_mean")
    stream = PromptStream(len(items), cfg.seed + 1, True)
    ws, rk = D.world_size(), D.rank()
    per_rank = max(w.batch_size // ws, 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if D.is_main():
        print(f"[warm-up stage] SFT of the base model on {w.data} (a different, easier task than {cfg.data.train}; "
              f"never the held-out problems): {w.steps} steps x {w.batch_size} traces", flush=True)
    path = os.path.join(cfg.output_dir, "warmup_metrics.jsonl")
    if D.is_main() and os.path.exists(path):
        os.remove(path)
    bar = tqdm(total=w.steps, desc=f"warm-up SFT on {w.data}", disable=not (D.is_main() and cfg.log.progress),
               dynamic_ncols=True, leave=True)
    t0 = time.perf_counter()
    for step in range(w.steps):
        batch = [items[i] for i in stream.take(per_rank * ws)[rk::ws]]
        seqs = [Sequence(list(it.prompt_ids), list(it.trace_ids[0]), is_offline=True) for it in batch]
        m = policy_update(model, seqs, loss_cfg, pad, cfg.train.micro_batch_tokens, device, opt, cfg.optim.grad_clip)
        sched.step()
        row = {"stage": "warmup", "step": step + 1, "nll": m["sft"], "teacher_prob": m.get("teacher_prob"),
               "grad_norm": m["grad_norm"], "lr": opt.param_groups[0]["lr"], "time": time.perf_counter() - t0}
        if D.is_main():
            with open(path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(nll=f"{m['sft']:.3f}", p_teacher=f"{m.get('teacher_prob', float('nan')):.3f}")
    bar.close()
    if D.is_main():
        print(f"[warm-up stage] done in {time.perf_counter() - t0:.0f}s: final NLL {m['sft']:.3f}, "
              f"teacher-token prob {m.get('teacher_prob', float('nan')):.3f}", flush=True)
    save_model(model, tokenizer, warmup_dir(cfg.output_dir))
    return model


def save_model(model, tokenizer, out: str) -> None:
    """save_pretrained to a temporary directory, then rename (rank 0)."""
    if D.is_main():
        tmp = out + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    D.barrier()
