"""Checkpoints: step_N/ = HF model (save_pretrained in model.dtype) + tokenizer + trainer_state.pt + rng_rank{r}.pt.

trainer_state.pt holds the optimizer and scheduler state, the algorithm state, the data cursor and, when the
HF copy is not float32, the float32 master weights, so a resume is exact. Full (unsharded) state dicts are
gathered with torch.distributed.checkpoint.state_dict on every rank; rank 0 writes. The directory is written
under a temporary name and renamed, then the `latest` pointer is replaced (written last); only the last
`keep` step directories are kept. `resume: auto` continues from `latest` and refuses a resume that would run
zero steps; a `latest` that does not resolve to a complete, loadable checkpoint falls back to the newest one
that is (with a warning naming both), and when none is the run stops (nothing truncated or pruned).

Checkpoints are data, not code: trainer_state.pt and rng_rank{r}.pt are read with `torch.load(weights_only=True)`
(tensors, numbers, strings, lists, dicts only), so a crafted pickle in a run folder is refused, never run.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import zipfile

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
log = logging.getLogger("red.checkpoint")


class ResumeError(RuntimeError):
    pass


class NonFiniteError(RuntimeError):
    """Training produced non-finite numbers the run cannot go on from; nothing non-finite was saved."""


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or cannot be loaded safely; the message names the file."""


def rng_state() -> dict:
    """Every RNG stream as tensors and plain numbers (loadable with weights_only=True): Python's Mersenne
    Twister (version, 625 words, gauss), NumPy's legacy global state, torch CPU and CUDA generators."""
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    st = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    py, npy = st["python"], st["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    key = npy["key"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], key, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
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
    bad = non_finite(weights)
    if bad:  # every rank holds the full state: all raise
        raise NonFiniteError(
            f"step {step}: {len(bad)} weight tensors are not finite (e.g. {bad[0]}): not saved; the last good "
            f"checkpoint ({run.latest() or 'none'}) is intact"
        )
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
        # only older checkpoints are pruned (a newer, broken one left by a fallback is replaced when reached)
        for _, d in [(s, d) for s, d in run.steps() if s <= step][:-keep]:
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
    parallel.barrier()
    return final


def non_finite(state: dict) -> list[str]:
    """Names of the floating-point tensors in `state` holding NaN or ±inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _load(path: str):
    """torch.load with weights_only=True; any failure (missing, torn, or a pickle of other types) is a
    CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a type: never executed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, refused ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def load_state(ckpt_dir: str) -> dict:
    """trainer_state.pt (+ this rank's RNG state as state["rng"]); raises CheckpointError when the checkpoint is
    incomplete (no model weights) or a file cannot be loaded safely."""
    if not os.path.isfile(os.path.join(ckpt_dir, "config.json")) or not any(
        f.endswith(".safetensors") for f in os.listdir(ckpt_dir)
    ):
        raise CheckpointError(f"{ckpt_dir} has no model weights (config.json + *.safetensors)")
    state = _load(os.path.join(ckpt_dir, "trainer_state.pt"))
    if not isinstance(state, dict) or "trainer" not in state or "optimizer" not in state:
        raise CheckpointError(f"{os.path.join(ckpt_dir, 'trainer_state.pt')} is not a trainer state")
    rng_path = os.path.join(ckpt_dir, f"rng_rank{parallel.rank()}.pt")
    if os.path.exists(rng_path):
        state["rng"] = _load(rng_path)
    return state


def load_optimizer(model, opt, state: dict) -> None:
    set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))


def find_resume(run: RunDir, mode: str, total_steps: int) -> tuple[str | None, dict | None]:
    """(checkpoint directory, its loaded state) to resume from (resume: auto), or (None, None) to start fresh.

    The checkpoint `latest` names if it is complete and loads; else the newest one that does, with a warning
    naming both. Raises ResumeError when the folder holds checkpoints but none is usable (nothing is deleted)
    or when the checkpoint already reached total_steps (nothing would run)."""
    if mode != "auto":
        return None, None
    named = run.latest_name()
    order = [d for _, d in reversed(run.steps())]
    if named is not None:
        named_dir = os.path.join(run.root, named)
        order = [named_dir] + [d for d in order if d != named_dir]
    problems = []
    for d in order:
        try:
            state = load_state(d)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems and parallel.is_main():
            log.warning(
                "resume: %s; falling back to %s, the newest complete checkpoint",
                "; ".join(problems),
                d,
            )
        break
    else:
        if problems or named is not None:
            found = "; ".join(problems) or f"latest names {named!r}, which does not exist"
            raise ResumeError(
                f"{run.root} holds no complete checkpoint to resume from ({found}). Nothing was deleted: "
                f"restore the checkpoint, choose another output_dir, or set checkpoint.resume=never to start "
                f"over (this deletes its checkpoints and metrics)."
            )
        if os.path.exists(run.metrics) and parallel.is_main():
            log.warning(
                "%s has metrics but no checkpoint: starting from step 0 (metrics.jsonl restarts)", run.root
            )
        return None, None
    step = RunDir.step_of(d)
    if step >= total_steps:
        raise ResumeError(
            f"{run.root} already holds a checkpoint at step {step} of train.steps={total_steps}: resuming would "
            f"run zero steps. Raise train.steps, choose another output_dir, or set checkpoint.resume=never "
            f"to start over (this deletes its checkpoints)."
        )
    return d, state
