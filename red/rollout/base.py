"""The interface every rollout engine implements (RolloutEngine) and the records it takes and returns. The trainer
reaches an engine only through a RolloutSession (red/rollout/session.py), which drives this contract."""

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
    """Everything the trainer relies on. A new engine implements every member below; the rollout session
    (red/rollout/session.py) checks that they exist when it is built, and calls them in this order:

        wake, generate            rollouts of a step, held-out evaluation (repeated, no sync in between)
        sleep                     after the rollouts of an RL step, before its update
        load_weights              before the first generate after an update, or whenever weights_valid is
                                  False (never for a colocated engine); it may come while the engine sleeps
        close                     once, when the run ends or fails
    """

    colocated: bool
    """True when the engine samples from the trainer's own module (HF `generate`): an optimizer step is
    visible to it at once and `load_weights` is never called by the trainer. Such an engine sees FSDP2-sharded
    parameters gathered around each `generate`. False: a separate copy of the weights (vLLM), synced by
    `load_weights` before the first `generate` after an optimizer step."""

    @property
    def weights_valid(self) -> bool:
        """False when the engine holds no usable weights (a level-2 sleep or a dummy start discards them), until
        a full `load_weights`; `generate` must not be called then. A colocated engine's weights are always valid."""

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        """n completions for each prompt; result[i][j] is the j-th completion of prompt i. Deterministic for a
        given `sampling.seed`; must not disturb the trainer's global RNG streams."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Make the engine generate with these (trainer) weights from now on: (HF parameter name, full tensor
        in the trainer's dtype) for every parameter, in named_parameters order. Valid in any sleep state."""

    def sleep(self) -> None:
        """Free engine memory for the update (no-op where unsupported). May drop the weights: see
        `weights_valid`."""

    def wake(self) -> None:
        """Undo sleep() before the next generate() (idempotent)."""

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """[len(token_ids) − 1] float32: the engine's temperature-1 log-prob of token t given tokens < t, from
        its own prefill (to check a weight sync against the trainer, red/rollout/weight_sync.py)."""

    def close(self) -> None:
        """Release everything the engine holds (memory, temporary files, process groups it created). Called
        once, when the run ends or fails; the engine is not used after."""


def contract() -> tuple[str, ...]:
    """The member names of RolloutEngine (attributes, properties and methods), sorted."""
    members = set(RolloutEngine.__annotations__) | {n for n in vars(RolloutEngine) if not n.startswith("_")}
    return tuple(sorted(members))
