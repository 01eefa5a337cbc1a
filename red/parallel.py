"""SPMD: one process per device; `python -m red.train` is world size 1 of the `torchrun` code path.

* The process group serves CPU and CUDA tensors (`cpu:gloo,cuda:nccl` on GPU, `gloo` on CPU); every helper
  here works without a process group (rank 0 of 1).
* Ranks own whole groups (prompts are sharded, not completions). Gradients are reduced by the wrapper:
  DDP (`torch.nn.parallel.DistributedDataParallel`) or FSDP2 (`fully_shard` per decoder layer + the root, with
  `MixedPrecisionPolicy(param_dtype=compute dtype, reduce_dtype=float32)`); world size 1 wraps nothing.
* Per-step statistics are reduced in one collective (`reduce`: one all_gather of a float64 vector, then sums
  and maxima locally), never one collective per scalar.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env(device: torch.device) -> None:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")


def reduce(sums: dict | None = None, maxes: dict | None = None) -> tuple[dict, dict]:
    """Sum `sums` and take the max of `maxes` over ranks, in ONE collective. Values: numbers (None = absent,
    ignored by max, 0 in sums). Returns (sums, maxes) as floats."""
    sums, maxes = dict(sums or {}), dict(maxes or {})
    keys = list(sums) + list(maxes)
    vec = torch.tensor(
        [float(sums[k] or 0.0) for k in sums]
        + [float("-inf") if maxes[k] is None else float(maxes[k]) for k in maxes],
        dtype=torch.float64,
    )
    if active() and keys:
        out = torch.empty(world_size(), len(keys), dtype=torch.float64)
        dist.all_gather_into_tensor(out, vec[None])
        vec = torch.cat([out[:, : len(sums)].sum(0), out[:, len(sums) :].max(0).values])
    vals = vec.tolist()
    return dict(zip(sums, vals[: len(sums)])), {
        k: (None if v == float("-inf") else v) for k, v in zip(maxes, vals[len(sums) :])
    }


def gather_objects(obj) -> list:
    """Every rank's object, in rank order (a list of one without a process group)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- wrapping


def decoder_layers(model):
    """The decoder layers of an HF causal LM (model.model.layers for Llama/Qwen2-style models)."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None:
        raise ValueError("train.parallel=fsdp2: cannot find the decoder layers (model.base_model.layers)")
    return list(layers)


def wrap(model, kind: str, compute_dtype: torch.dtype):
    """The module the update calls: `model` itself (world size 1), a DDP wrapper, or `model` after fully_shard
    (FSDP2 shards it in place). The model's parameters stay float32 (the master copy)."""
    if not active():
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(model.parameters()).device
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(wrapped, enabled: bool):
    """Reduce gradients in this backward (the last micro-batch of an optimizer step) or not (the others)."""
    if not active() or enabled:
        if is_fsdp(wrapped):
            wrapped.set_requires_gradient_sync(True)
        yield
    elif is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(False)
        yield
    else:
        with wrapped.no_sync():
            yield


@contextlib.contextmanager
def gathered(model):
    """Full (unsharded) parameters for rank-local work without collectives inside it (HF generate, whose step
    count differs per rank): FSDP2 all-gathers once here and reshards after. A no-op for other models."""
    mods = [m for m in model.modules() if is_fsdp(m)] if active() else []
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
