"""Errors of preparation and training: bad data, bad settings. Both are ``ValueError``s."""

from __future__ import annotations

from typing import Optional

__all__ = ["DataError", "TrainingConfigError"]


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
