"""Checkpoints: output_dir/step_N/ = HF model (save_pretrained) + tokenizer + trainer_state.pt + rng_rank{r}.pt.

Written to a temporary directory and renamed, then the `latest` pointer is replaced (written last); only the
last `keep` step directories are kept. `resume: auto` continues from `latest` and refuses a resume that would
run zero steps.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from . import distributed as D

_STEP = re.compile(r"^step_(\d+)$")


class ResumeError(RuntimeError):
    pass


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def step_dirs(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    out = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir)
           if (m := _STEP.match(d)) and os.path.isdir(os.path.join(output_dir, d))]
    return sorted(out)


def latest(output_dir: str) -> str | None:
    """The directory the `latest` pointer names (None if there is none or it is dangling)."""
    p = os.path.join(output_dir, "latest")
    if not os.path.exists(p):
        return None
    name = open(p).read().strip()
    d = os.path.join(output_dir, name)
    return d if os.path.isfile(os.path.join(d, "trainer_state.pt")) else None


def save(output_dir: str, step: int, model, tokenizer, state: dict, keep: int) -> str:
    """Write step_N (all ranks call; rank 0 writes the model, each rank its RNG state)."""
    final = os.path.join(output_dir, f"step_{step}")
    tmp = os.path.join(output_dir, f".tmp_step_{step}")
    if D.is_main():
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    D.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{D.rank()}.pt"))
    if D.is_main():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, "trainer_state.pt.tmp"))
        os.replace(os.path.join(tmp, "trainer_state.pt.tmp"), os.path.join(tmp, "trainer_state.pt"))
    D.barrier()
    if D.is_main():
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(os.path.join(output_dir, "latest"), f"step_{step}\n")
        for s, d in step_dirs(output_dir)[:-keep]:
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
    D.barrier()
    return final


def load_state(ckpt_dir: str) -> dict:
    state = torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), map_location="cpu", weights_only=False)
    rng_path = os.path.join(ckpt_dir, f"rng_rank{D.rank()}.pt")
    if os.path.exists(rng_path):
        state["rng"] = torch.load(rng_path, map_location="cpu", weights_only=False)
    return state


def find_resume(output_dir: str, mode: str, total_steps: int) -> str | None:
    """The checkpoint to resume from (resume: auto), or None to start fresh. Raises ResumeError when the
    checkpoint already reached total_steps (nothing would run)."""
    if mode != "auto":
        return None
    d = latest(output_dir)
    if d is None:
        return None
    step = int(_STEP.match(os.path.basename(d)).group(1))
    if step >= total_steps:
        raise ResumeError(
            f"{output_dir} already holds a checkpoint at step {step} of train.steps={total_steps}: resuming would "
            f"run zero steps. Raise train.steps, choose another output_dir, or set checkpoint.resume=never "
            f"to start over (this deletes its checkpoints).")
    return d


def clear(output_dir: str) -> None:
    """Remove a previous run's checkpoints and logs from output_dir (checkpoint.resume=never)."""
    if not D.is_main() or not os.path.isdir(output_dir):
        return
    for _, d in step_dirs(output_dir):
        shutil.rmtree(d, ignore_errors=True)
    for name in os.listdir(output_dir):
        if name.startswith(".tmp_step_") or name in ("latest", "metrics.jsonl", "samples.jsonl", "warmup",
                                                     "warmup_metrics.jsonl", "dynamics.png", "summary.json"):
            p = os.path.join(output_dir, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
