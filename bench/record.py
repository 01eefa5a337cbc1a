"""Results rows and the results file bench/results/<device>.json.

File schema: {"runs": [run, ...]}, one run appended per recorded session:
  run = {"timestamp", "device", "machine": {...}, "versions": {...}, "git": {"commit", "dirty"}, "note",
         "results": [row, ...]}
  row = {"id", "op", "mode", "model", "tokens", "hidden", "vocab", "dtype", "impl", "device", "gemms", "tflop",
         "time_s": {"min", "median", "mean", "rounds", "cpu_median"}, "tflops", "frac_peak", "peak_mib", "extra_mib",
         "error"}
cpu_median: process CPU seconds (all threads) per call, CPU runs only: less sensitive than wall time to other
jobs on a shared machine. peak_mib: memory growth during the call over the inputs; extra_mib: peak_mib minus the outputs and gradients
the call returns (a lower bound when the peak comes before an output exists). tflops uses the median time; frac_peak = tflops / 800 (H100-class GPUs; None on CPU).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

import torch

from .cases import PEAK_TFLOPS, Case

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def make_row(
    case: Case,
    times: list[float] | None,
    extra_bytes: int | None,
    error: str | None = None,
    peak_bytes: int | None = None,
    cpu_times: list[float] | None = None,
) -> dict:
    row = {
        "id": case.id,
        "op": case.op,
        "mode": case.mode,
        "model": case.model,
        "tokens": case.tokens,
        "hidden": case.hidden,
        "vocab": case.vocab,
        "dtype": str(case.dtype).replace("torch.", ""),
        "impl": case.impl,
        "device": case.device,
        "gemms": case.gemms,
        "tflop": case.flop / 1e12,
        "time_s": None,
        "tflops": None,
        "frac_peak": None,
        "peak_mib": None if peak_bytes is None else peak_bytes / 2**20,
        "extra_mib": None if extra_bytes is None else extra_bytes / 2**20,
        "error": error,
    }
    if times:
        med = statistics.median(times)
        row["time_s"] = {
            "min": min(times),
            "median": med,
            "mean": statistics.fmean(times),
            "rounds": len(times),
            "cpu_median": statistics.median(cpu_times) if cpu_times else None,
        }
        row["tflops"] = case.flop / med / 1e12
        if case.device == "cuda":
            row["frac_peak"] = row["tflops"] / PEAK_TFLOPS
    return row


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """File stem for the results: 'cpu-<model>-<n>c' or the GPU's name, e.g. 'nvidia-h100-80gb-hbm3'."""
    if device == "cuda":
        return _slug(torch.cuda.get_device_name())
    return f"cpu-{_slug(cpu_model())}-{os.cpu_count()}c"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(device: str, note: str = "") -> dict:
    """Machine, device, package versions and git commit of this run."""
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        machine["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        machine["load_avg"] = os.getloadavg()
    except (OSError, ValueError, AttributeError):
        pass
    dev = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    versions = {
        name: _version(dist)
        for name, dist in (
            ("torch", "torch"),
            ("triton", "triton"),
            ("liger_kernel", "liger_kernel"),
            ("trl", "trl"),
            ("transformers", "transformers"),
            ("pytest_benchmark", "pytest-benchmark"),
            ("numpy", "numpy"),
        )
    }
    versions["torch"] = torch.__version__
    versions["cuda"] = torch.version.cuda
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev,
        "machine": machine,
        "versions": versions,
        "git": _git(),
        "note": note,
    }


def append_run(path: Path, env: dict, rows: list[dict]) -> Path:
    """Append one run (env + rows) to the results file at `path` (created if missing)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"runs": []}
    data["runs"].append({**env, "results": rows})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
