"""The interface every rollout engine implements. The trainer only talks to this."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SamplingConfig:
    """How to sample. temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Rollout:
    """One completion. `logprobs[i]` is the engine's log-prob of `token_ids[i]` at the sampling temperature
    (None when the engine cannot report it). finish_reason: 'stop' (EOS or a stop token) or 'length'."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        """n completions for each prompt; result[i][j] is the j-th completion of prompt i."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Make the engine generate with these (trainer) weights from now on."""

    def sleep(self) -> None:
        """Free engine memory during the update (no-op where unsupported)."""

    def wake(self) -> None:
        """Undo sleep() before the next generate()."""
