"""Stopping a training run on Ctrl-C (SIGINT) or SIGTERM (a job scheduler's "time is up") without losing it.

While :class:`StopRequest` is active the two signals only record that a stop was asked for: the training loop
finishes its step, saves a checkpoint and raises :class:`~storymem.training.errors.TrainingInterrupted`, which
the command line turns into one line and exit code 130 (SIGINT) or 143 (SIGTERM). A second Ctrl-C stops at
once. Outside the loop (loading models, say), :func:`terminate_as_interrupt` makes SIGTERM end the command as
Ctrl-C does, with its exit code, instead of killing it without a word.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Optional

from .errors import TrainingInterrupted

logger = logging.getLogger(__name__)

__all__ = ["StopRequest", "terminate_as_interrupt", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    # Python delivers signals to the main thread only, and only it may install handlers.
    return threading.current_thread() is threading.main_thread()


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signum` instead of stopping the process."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signum = signum
        logger.warning("%s: stopping after this step (saving a checkpoint first)%s", signal.Signals(signum).name,
                       "; Ctrl-C again to stop at once" if signum == signal.SIGINT else "")

    def __enter__(self) -> "StopRequest":
        if _in_main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) where the program is,
    as SIGINT raises ``KeyboardInterrupt``."""
    if not _in_main_thread():
        yield
        return

    def handle(signum, frame):
        raise TrainingInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
