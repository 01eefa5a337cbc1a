"""Freed heap memory handed back to the OS between micro-batches (CPU training on glibc).

On CPU a step's tensors come from glibc's malloc. What a micro-batch frees (its activations, the loss kernels'
temporaries) stays resident in the heap as free chunks, and the next micro-batch's differently shaped tensors
only partly reuse them: at SmolLM2-135M's shape the process held 400-750 MiB of free heap after each backward
(mallinfo2), and its peak resident memory grew from micro-batch to micro-batch. `HeapTrimmer` calls
`malloc_trim(0)` (which returns the free pages inside the heap, not only its top) once the free heap exceeds a
threshold. In in-process profiling runs at that shape (steps 2-3 of 3), the update's peak RSS was
3,336-3,388 MiB with it and 3,428-3,543 MiB without, for ~5 % more update time. It
does nothing where it cannot apply: not Linux/glibc (no mallinfo2, glibc < 2.33), or a CUDA/other device
(`train.release_host_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc():
    """glibc with mallinfo2 and malloc_trim, or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        info, trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    info.restype, info.argtypes = _MallInfo2, []
    trim.restype, trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
    return libc


class HeapTrimmer:
    """Call after a micro-batch's backward: trims the heap when more than `min_free_mib` of it is free.
    `enabled=False`, or no glibc, makes it a no-op (`available` says which). `trims` counts the trims made."""

    def __init__(self, enabled: bool = True, min_free_mib: float = 64.0):
        self._libc = _libc() if enabled else None
        self.min_free = int(min_free_mib * 2**20)
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._libc is not None

    def free_bytes(self) -> int:
        """Bytes of free chunks in malloc's heaps (mallinfo2().fordblks); 0 when not available."""
        return int(self._libc.mallinfo2().fordblks) if self._libc else 0

    def __call__(self) -> bool:
        """Whether it trimmed."""
        if self._libc is None or self.free_bytes() <= self.min_free:
            return False
        self._libc.malloc_trim(0)
        self.trims += 1
        return True
