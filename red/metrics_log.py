"""Run observability: a JSONL metrics file (always), TensorBoard (optional, lazy import), sample completions."""
from __future__ import annotations

import json
import math
import os

from . import distributed as D


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class MetricsLogger:
    """Rank 0 appends one JSON object per step to `path`; on resume rows after `resume_step` are dropped first
    (they belong to the interrupted run past its last checkpoint)."""

    def __init__(self, path: str, tensorboard_dir: str | None = None, resume_step: int | None = None):
        self.path = path
        self.tb = None
        if not D.is_main():
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            keep = [ln for ln in open(path) if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(path, "w") as fh:
                fh.writelines(keep)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("log.tensorboard=true needs the `tensorboard` package "
                                   "(pip install tensorboard)") from e
            self.tb = SummaryWriter(tensorboard_dir)

    def log(self, row: dict) -> None:
        if not D.is_main():
            return
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=False) + "\n")
        if self.tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(ln) for ln in open(path) if ln.strip()]


def write_samples(path: str, step: int, samples: list[dict]) -> None:
    if not D.is_main() or not samples:
        return
    with open(path, "a") as fh:
        for s in samples:
            fh.write(json.dumps({"step": step, **s}) + "\n")
