"""SPMD helpers: one process per device; `python -m red.train` is world size 1 of the `torchrun` code path.

Every helper works without torch.distributed initialised (rank 0 of 1). Ranks own whole groups (prompts are
sharded, not completions); gradients are summed across ranks after the local micro-batches (the loss is
normalised by the global batch size, so a sum is the full-batch gradient).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str = "cpu") -> None:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_scalar(x: float) -> float:
    if not (is_initialized() and world_size() > 1):
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def max_scalar(x: float) -> float:
    if not (is_initialized() and world_size() > 1):
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_true(flag: bool) -> bool:
    return sum_scalar(1.0 if flag else 0.0) > 0


def all_reduce_grads(params) -> None:
    """Sum gradients across ranks (coalesced per dtype/device)."""
    if not (is_initialized() and world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None]
    buckets: dict = {}
    for g in grads:
        buckets.setdefault((g.dtype, g.device), []).append(g)
    for gs in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for g in gs:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()


def gather_objects(obj) -> list:
    """Every rank's object, in rank order (a list of one without a process group)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()
