"""Graceful stop: the first SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 asks the run to stop after its
current step and write a checkpoint; a second one stops the process at once.

SIGTERM is what SLURM, Kubernetes and cloud preemption send (SLURM's ``--signal=USR1@120`` sends
SIGUSR1 ahead of the time limit). The handler only records the signal; the training loop looks
at it between steps, and under torchrun the ranks agree on it with one all-reduce so that all of
them stop after the same step. A second signal restores the default action and re-sends itself,
which ends the process immediately (checkpoints on disk are complete or absent, never partial).
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["GracefulStop", "STOP_SIGNALS", "STOPPED_EXIT_STATUS", "ignore_stop_signals"]

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None),
                                  getattr(signal, "SIGUSR1", None)) if s is not None)
# EX_TEMPFAIL from sysexits.h: "try again later", i.e. resume. Documented in docs/training.md.
STOPPED_EXIT_STATUS = 75


class GracefulStop:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing).

    ``signum`` is the first signal received, or None.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """For DataLoader workers: leave stopping to the main process.

    Ctrl-C reaches every process of the terminal's group and SLURM signals every process of the
    job; a worker that died of it would make the main process fail while it finishes its step.
    Workers still exit when the main process does (DataLoader watches its parent).
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
