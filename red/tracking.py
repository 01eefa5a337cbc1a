"""Experiment trackers beside the JSONL metrics (which stay the source of truth): Weights & Biases for
`log.report_to: [wandb]` (TensorBoard is written by red.metrics.MetricsLogger). Rank 0 only.

W&B: `wandb.init(project=$WANDB_PROJECT or "red-kernels", name=output_dir, dir=output_dir, config=the run's
config)`; every numeric metric of a step is logged at that step, the dynamics plot at the end. Offline:
WANDB_MODE=offline writes the run under output_dir/wandb for a later `wandb sync`.
"""

from __future__ import annotations

import os

REPORT_TO = ("tensorboard", "wandb")


class WandbTracker:
    def __init__(self, root: str, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            from .config import ConfigError

            raise ConfigError(
                "config key 'log.report_to': wandb needs the `wandb` package: pip install 'red-kernels[tracking]'"
            ) from None
        self._wandb = wandb
        os.makedirs(root, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "red-kernels"), name=name, dir=root, config=config
        )

    def log(self, row: dict) -> None:
        """The row's numbers (bools and text left out) at its `step`."""
        data = {
            k: v
            for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        if data:
            self.run.log(data, step=int(row.get("step", 0)))

    def log_image(self, name: str, path: str) -> None:
        if os.path.isfile(path):
            self.run.log({name: self._wandb.Image(path)})

    def finish(self) -> None:
        self.run.finish()
