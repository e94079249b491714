"""Errors of the training data pipeline."""

from __future__ import annotations

__all__ = ["DataError", "TrainingConfigError"]


class DataError(ValueError):
    """Training data (clips, captions, manifest, prepared cache) is missing or malformed; the message names
    the file, line, field or shard at fault."""


class TrainingConfigError(ValueError):
    """A training or preparation setting is invalid or does not fit the adapter config or the data."""
