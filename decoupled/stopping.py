"""Stopping a run on request: Ctrl-C (SIGINT) or SIGTERM ends it cleanly with a checkpoint.

The first signal only sets a flag, which the training loops read between steps, so no
stage is stopped halfway through an update; the run then writes a checkpoint, stops its
workers and raises ``RunStopped``. A second signal raises ``KeyboardInterrupt`` at once
(the runtime still stops every worker and Ray process it started on the way out).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path


class RunStopped(KeyboardInterrupt):
    """The run stopped on request after writing a checkpoint; ``decoupled train --resume`` continues it."""

    def __init__(self, run_dir: Path, steps_done: int | None) -> None:
        where = f"after step {steps_done}" if steps_done is not None else "before its first checkpoint"
        super().__init__(f"stopped {where}; continue with: decoupled train --resume {run_dir}")
        self.run_dir, self.steps_done = run_dir, steps_done


class RunFailed(RuntimeError):
    """A stage kept failing (more than ``recovery.max_restarts``): the run stops, naming stage, step and cause."""


class StopRequest:
    """``with StopRequest() as stop: ... if stop.requested: ...`` (handlers only in the main thread)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after the current step and writing a checkpoint "
              "(again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
