"""SIGTERM handling: Kubernetes sends SIGTERM on preemption/eviction and SIGKILLs
after terminationGracePeriodSeconds; the loop polls the flag between steps,
saves a checkpoint and exits instead of dying mid-write."""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any


class StopSignal:
    """Set when SIGTERM (or SIGINT) arrives; install once in the main thread."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            print(
                f"kubetune-trainer: received {signal.Signals(signum).name}; "
                "saving a checkpoint and stopping after this step",
                file=sys.stderr,
                flush=True,
            )
        self.received = signum

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to stop as if the signal had arrived (used by step-limit hooks)."""
        self.received = signum

    @classmethod
    def install(cls, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> StopSignal:
        stop = cls()
        for signum in signals:
            stop._previous[signum] = signal.signal(signum, stop._handle)
        return stop

    def restore(self) -> None:
        """Put back the handlers that were there before install() (the loop may run in-process in tests)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
