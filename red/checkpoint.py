"""Checkpoints: step_N/ = HF model (save_pretrained in model.dtype) + tokenizer + trainer_state.pt + rng_rank{r}.pt.

trainer_state.pt holds the optimizer and scheduler state, the algorithm state, the data cursor and, when the
HF copy is not float32, the float32 master weights, so a resume is exact. Full (unsharded) state dicts are
gathered with torch.distributed.checkpoint.state_dict on every rank; rank 0 writes. The directory is written
under a temporary name and renamed, then the `latest` pointer is replaced (written last); only the last
`keep` step directories are kept. `resume: auto` continues from `latest` and refuses a resume that would run
zero steps.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from . import parallel
from .run_dir import RunDir, atomic, commit, temporary, write_text

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


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


def full_state(model) -> dict:
    """The full float32 state dict on CPU (a collective under FSDP2: every rank calls)."""
    return get_model_state_dict(model, options=FULL)


def save_pretrained(model, out: str, state: dict, dtype: torch.dtype) -> None:
    """save_pretrained of `state` in `dtype`, with config.json saying that dtype (so dtype="auto" loads it).
    Tied copies are dropped from `state` (a gathered FSDP2 state has lost the tie)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    drop = set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()
    weights = {k: v.to(dtype) for k, v in state.items() if k not in drop}
    model.save_pretrained(out, state_dict=weights, safe_serialization=True)
    saved, model.config.dtype = model.config.dtype, dtype  # save_pretrained wrote the parameters' dtype
    try:
        model.config.save_pretrained(out)
    finally:
        model.config.dtype = saved


def save_model(model, tokenizer, out: str, dtype: torch.dtype) -> None:
    """HF save_pretrained of the (gathered) weights in `dtype` (rank 0), written atomically."""
    state = full_state(model)
    if parallel.is_main():
        with atomic(out) as tmp:
            save_pretrained(model, tmp, state, dtype)
            tokenizer.save_pretrained(tmp)
    parallel.barrier()


def save(
    run: RunDir, step: int, model, tokenizer, dtype: torch.dtype, opt, trainer_state: dict, keep: int
) -> str:
    """Write step_N (all ranks call: rank 0 writes the model and state, each rank its RNG state)."""
    final = run.step(step)
    weights = full_state(model)
    optim = get_optimizer_state_dict(model, opt, options=FULL)
    state = {**trainer_state, "optimizer": optim, "master": weights if dtype != torch.float32 else None}
    tmp = temporary(final)  # every rank writes into it; rank 0 commits it
    if parallel.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    parallel.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{parallel.rank()}.pt"))
    if parallel.is_main():
        save_pretrained(model, tmp, weights, dtype)
        tokenizer.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))  # tmp/ is renamed into place below
    parallel.barrier()
    if parallel.is_main():
        commit(tmp, final)
        write_text(run.latest_file, f"step_{step}\n")
        for _, d in run.steps()[:-keep]:
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
    parallel.barrier()
    return final


def load_state(ckpt_dir: str) -> dict:
    state = torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), map_location="cpu", weights_only=False)
    rng_path = os.path.join(ckpt_dir, f"rng_rank{parallel.rank()}.pt")
    if os.path.exists(rng_path):
        state["rng"] = torch.load(rng_path, map_location="cpu", weights_only=False)
    return state


def load_optimizer(model, opt, state: dict) -> None:
    set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))


def find_resume(run: RunDir, mode: str, total_steps: int) -> str | None:
    """The checkpoint to resume from (resume: auto), or None to start fresh. Raises ResumeError when the
    checkpoint already reached total_steps (nothing would run)."""
    d = run.latest() if mode == "auto" else None
    if d is None:
        return None
    step = RunDir.step_of(d)
    if step >= total_steps:
        raise ResumeError(
            f"{run.root} already holds a checkpoint at step {step} of train.steps={total_steps}: resuming would "
            f"run zero steps. Raise train.steps, choose another output_dir, or set checkpoint.resume=never "
            f"to start over (this deletes its checkpoints)."
        )
    return d
