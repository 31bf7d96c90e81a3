"""SIGINT and SIGTERM on the driver: the run ends KILLED with its checkpoints, not RUNNING.

Python's default SIGTERM kills the driver on the spot and Ray's SIGINT handler calls `sys.exit`,
so without this a Ctrl-C or a scheduler's SIGTERM left the MLflow run RUNNING. Inside
`stop_on_signals()` the first of either raises `Interrupted` in the main thread (out of the
blocking `fit()`), for the caller to stop the workers and mark the run; a second exits at once.
A sweep passes `stop` instead: the first signal asks Tune to end its experiment (Tune saves its
state and stops every trial before `fit()` returns), and the driver marks the runs afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run. A KeyboardInterrupt, so no `except Exception` on its way swallows
    it; `exit_code` is the shell's 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {self.name(signum)}")
        self.signum, self.exit_code = signum, 128 + signum

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[int], bool] | None = None):
    """Turn the first SIGINT/SIGTERM into `Interrupted`, or into `stop(signum)` where given (it
    returns False where it could not stop anything yet: then `Interrupted` after all); a second
    one exits at once, also while the caller cleans up after the first (that handler stays).
    Yields the list the signal's number is put in: Ray's blocking calls turn any
    KeyboardInterrupt raised inside them into a plain one, losing which signal it was (and with
    `stop` nothing is raised). Only in the main thread (where Python runs signal handlers; a Tune
    trial's thread leaves them alone)."""
    fired: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return

    def again(signum, frame):
        os._exit(128 + signum)

    def first(signum, frame):
        fired.append(signum)
        # `stop` first: Tune's handler puts back the SIGINT handler it found (this one), and the
        # second signal must find `again`.
        stopping = stop is not None and stop(signum)
        for s in SIGNALS:
            signal.signal(s, again)
        if not stopping:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, first) for s in SIGNALS}
    try:
        yield fired
    finally:
        if not fired:
            for s, handler in previous.items():
                signal.signal(s, handler)
