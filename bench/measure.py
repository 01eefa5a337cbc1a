"""Peak memory beyond inputs and outputs, and GPU timing.

CPU: the process's peak resident set (VmHWM) is reset through /proc/self/clear_refs and glibc's free pages are
returned with malloc_trim before each measured call, so one process can measure case after case; `python -m
bench.measure ...` measures one case in a fresh process from ru_maxrss instead (a cross-check).
CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats; time with triton.testing.do_bench.

peak = peak during the call − memory before it (inputs included); extra = peak − bytes of what the call returns
(outputs and gradients). extra is a lower bound: it undercounts when the peak comes before an output exists.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import time

import torch

_libc = None


def _malloc_trim():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_resettable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (None entries ignored)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


class PeakMemory:
    """Context manager: .peak_bytes = peak memory during the block minus memory at its start."""

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes = None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif cpu_peak_resettable():  # resets VmHWM to the current RSS
            _malloc_trim()
            cpu_peak_resettable()
            self._base = _status_kib("VmRSS") * 1024
        else:
            self._base = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        elif self._base is not None:
            self.peak_bytes = _status_kib("VmHWM") * 1024 - self._base
        return False


class MeasuredRun:
    """Wraps run() for a timer that calls it repeatedly: call number `measure_call` (0-based) runs under
    PeakMemory and sets .peak_bytes (growth over the inputs) and .extra_bytes (that minus what run returns).
    .cpu_times: process CPU time (all threads) of each call from that one on."""

    def __init__(self, run, device: str, measure_call: int = 0):
        self.run, self.device, self.measure_call = run, device, measure_call
        self.calls, self.peak_bytes, self.extra_bytes = 0, None, None
        self.cpu_times = []  # process CPU seconds of calls from measure_call on (robust to a busy machine)

    def __call__(self):
        c0 = time.process_time()
        if self.calls == self.measure_call:
            if hasattr(self.run, "reset"):
                self.run.reset()  # free the previous call's gradients before taking the baseline
            with PeakMemory(self.device) as pm:
                out = self.run()
            if pm.peak_bytes is not None:
                self.peak_bytes = pm.peak_bytes
                self.extra_bytes = max(0, pm.peak_bytes - tensor_bytes(out))
        else:
            out = self.run()
        if self.calls >= self.measure_call:
            self.cpu_times.append(time.process_time() - c0)
        self.calls += 1
        del out


def time_cuda(run, warmup_ms: float = 25, rep_ms: float = 1000) -> list[float]:
    """Seconds per call of run(), every repetition, from triton.testing.do_bench (CUDA events, L2 flushed before
    each call; it picks the number of calls to fill about warmup_ms of warm-up and rep_ms of timing)."""
    from triton.testing import do_bench

    return [t / 1e3 for t in do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="all")]


def _main(argv=None):
    """Peak extra memory of one case in a fresh process, from ru_maxrss (CPU)."""
    import argparse
    import json

    from . import cases, impls

    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("--op", required=True, choices=list(cases.MODES))
    p.add_argument("--mode", required=True)
    p.add_argument("--model", required=True, choices=list(cases.MODELS))
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--impl", required=True, choices=cases.IMPLS)
    a = p.parse_args(argv)
    case = cases.Case(a.op, a.mode, a.model, a.tokens, a.impl, "cpu")
    ok, why = impls.available(case)
    if not ok:
        raise SystemExit(f"{case.id}: {why}")
    run = impls.build(case, cases.make_inputs(case))
    _malloc_trim()
    base = _status_kib("VmRSS") * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    out = run()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "case": case.id,
                "time_s": dt,
                "cpu_s": cpu,
                "peak_rss_mib": peak / 2**20,
                "peak_mib": (peak - base) / 2**20,
                "extra_mib": max(0, peak - base - tensor_bytes(out)) / 2**20,
            }
        )
    )


if __name__ == "__main__":
    _main()
