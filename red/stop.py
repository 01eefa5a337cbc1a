"""Graceful stop: SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption) finish the current step, the loop writes
a checkpoint and the run exits with 128 + the signal (130 / 143) and one line saying where; a second signal
stops at once (StopNow, still without a traceback).

    with GracefulStop() as stop:     # red/train.py: around the run
        ... stop.signum ...          # red/loop.py: after each step, agreed over ranks (loop.step_flags)
"""

from __future__ import annotations

import signal
import threading

from . import parallel

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """The run stopped on a signal after its state was saved; `message` says where. Exit status 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message


class StopNow(BaseException):
    """A second signal: stop at once (the step in flight and anything since the last checkpoint are lost)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class GracefulStop:
    """Installs the handlers (main thread only; elsewhere a no-op) and restores the previous ones on exit."""

    def __init__(self):
        self.signum: int | None = None
        self.saved: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        if parallel.is_main():
            print(
                f"\n{name}: finishing the current step, then saving a checkpoint ({name} again stops at once)",
                flush=True,
            )

    def requested(self) -> int | None:
        """The signal that asked to stop (None: keep going), on this rank (red/loop.py agrees over ranks)."""
        return self.signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)
