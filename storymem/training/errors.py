"""Errors of preparation and training: bad data, bad settings (both ``ValueError``s), a run that diverged, and
a run stopped by a signal."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

__all__ = ["DataError", "TrainingConfigError", "TrainingDivergedError", "TrainingInterrupted"]


class DataError(ValueError):
    """Training data (clips, captions, manifest, prepared cache) is missing or malformed; the message names
    the file, line, field or shard at fault."""


class TrainingConfigError(ValueError):
    """A training or preparation setting is invalid or does not fit the adapter config or the data.

    ``option`` is the :class:`~storymem.training.PrepareConfig` / :class:`~storymem.training.TrainConfig` field at
    fault, when one is (the command line names its flag instead); ``str(error)`` reads ``"option: detail"``.
    """

    def __init__(self, detail: str, option: Optional[str] = None):
        self.detail, self.option = detail, option
        super().__init__(f"{option}: {detail}" if option else detail)


class TrainingDivergedError(ValueError):
    """The loss or the adapter weights stopped being finite numbers; nothing from that step on was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM. ``checkpoint`` is where it saved (None if nothing was saved),
    ``exit_code`` the shell's convention for the signal (130, 143)."""

    def __init__(self, signum: int, step: Optional[int] = None, checkpoint: Optional[Path] = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    @property
    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is not None:
            return (f"stopped by {name} at step {self.step}: saved {self.checkpoint}; continue with the same command "
                    "and --resume latest")
        return f"stopped by {name}" + (f" at step {self.step}" if self.step is not None else "") + "; nothing saved"
