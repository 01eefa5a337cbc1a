"""Backend selection. CUDA tensors → Triton kernels; CPU tensors → exact chunked PyTorch.

Override per call with `backend=` or process-wide with the environment variable RED_KERNELS_BACKEND
(`triton`, `torch`, `reference`). Tests force `triton` with TRITON_INTERPRET=1 to run the kernels on CPU.
"""
from __future__ import annotations

import os

BACKENDS = ("triton", "torch", "reference")


def resolve(backend: str | None, device) -> str:
    choice = backend if backend is not None else os.environ.get("RED_KERNELS_BACKEND") or None
    if choice is None:
        return "triton" if device.type == "cuda" else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (auto), got {choice!r}")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing red_kernels, or use backend='torch'")
    return choice


def ops(name: str):
    """The module implementing forward_stats/backward for a backend ('triton' or 'torch')."""
    if name == "triton":
        from . import triton_ops
        return triton_ops
    from . import chunked
    return chunked
