"""RolloutSession: a rollout engine's lifecycle over one run, so the trainer only says what happened.

The trainer tells the session `weights_changed()` after an optimizer step, asks it to `generate` (rollouts or
evaluation), to `sleep` before the update and to `close` at the end. The session syncs the engine's weights
lazily — right before the first generate after an optimizer step, or after the engine dropped them (a level-2
sleep, even in a step whose groups were all dropped) — wakes it, and refuses to generate from weights the engine
says are invalid. SFT steps never sync (they never generate). The engine contract is red/rollout/base.py's
RolloutEngine.
"""

from __future__ import annotations

from contextlib import nullcontext

from .. import parallel
from .base import Rollout, RolloutEngine, SamplingConfig, contract
from .weight_sync import engine_weights


class RolloutSession:
    """Owns `engine` (a RolloutEngine) for a run whose trained module is `model`. Usable as a context manager
    (closes the engine on exit)."""

    def __init__(self, engine: RolloutEngine, model):
        missing = [m for m in contract() if not hasattr(engine, m)]
        if missing:
            raise TypeError(
                f"rollout engine {type(engine).__name__} lacks {', '.join(missing)} of the RolloutEngine "
                "contract (red/rollout/base.py)"
            )
        self.engine, self.model = engine, model
        self.stale = False  # an optimizer step changed the weights since the engine last got them
        self.closed = False

    def weights_changed(self) -> None:
        """The trainer's weights moved (an optimizer step): the engine gets them before its next generate."""
        self.stale = True

    def sync(self) -> None:
        """Bring the engine's weights up to date when stale or dropped; a no-op otherwise."""
        if not self.stale and self.engine.weights_valid:
            return
        if not self.engine.colocated:
            self.engine.load_weights(engine_weights(self.model))
        self.stale = False
        if not self.engine.weights_valid:
            what = (
                "a colocated engine's weights must always be valid"
                if self.engine.colocated
                else "after a full load"
            )
            raise RuntimeError(
                f"rollout engine {type(self.engine).__name__} reports invalid weights ({what})"
            )

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        """engine.generate with the trainer's current weights (see the module docstring)."""
        if self.closed:
            raise RuntimeError("rollout session used after close()")
        self.sync()
        self.engine.wake()
        with parallel.gathered(self.model) if self.engine.colocated else nullcontext():
            return self.engine.generate(prompt_ids, n, sampling)

    def sleep(self) -> None:
        """Rollouts of this step are done: free the engine's memory for the update."""
        self.engine.sleep()

    def close(self) -> None:
        """Close the engine (once; later calls do nothing)."""
        if not self.closed:
            self.closed = True
            self.engine.close()

    def __enter__(self) -> RolloutSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
