"""Weights named by a Hugging Face Hub id: whether they are on this machine, and the one message for weights that
are not while the hub cannot be reached.

Models named by a hub id (``Wan-AI/Wan2.2-I2V-A14B-Diffusers``, open_clip's ``ViT-B-32:openai``, HPSv3) are
downloaded into the Hugging Face cache the first time they are used. Offline - with ``HF_HUB_OFFLINE=1``, or
without a network - only what is already in that cache can load; everything else is a
:class:`MissingWeightsError` that says which weights are missing and how to get them, instead of the loaders'
own errors (diffusers, for one, reports a missing ``config.json``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["HUB_ID", "MissingWeightsError", "is_hub_id", "hub_offline", "cached_file", "missing_weights",
           "download_hint", "unreachable_reason"]

# "org/name"; a hub id never exists as a local path (then it is a folder).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class MissingWeightsError(FileNotFoundError):
    """Weights named by a hub id are not on this machine and cannot be downloaded now."""


def is_hub_id(value) -> bool:
    """``value`` names a hub repository (``org/name``) rather than a local file or folder."""
    return isinstance(value, str) and bool(HUB_ID.match(value)) and not Path(value).exists()


def hub_offline() -> bool:
    """Downloads are switched off (``HF_HUB_OFFLINE``): only the local cache is read."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return False
    return bool(constants.HF_HUB_OFFLINE)


def cached_file(repo_id: str, filenames: Sequence[str], cache_dir: Optional[str] = None) -> Optional[Path]:
    """The first of ``filenames`` of ``repo_id`` that is in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        except Exception:  # a malformed id: not in the cache
            return None
        if isinstance(found, str):
            return Path(found)
    return None


def download_hint(repos: Sequence[str]) -> str:
    """How to get ``repos`` onto this machine and run offline afterwards."""
    commands = " and ".join(f"`huggingface-cli download {repo}`" for repo in repos)
    return (f"download them once while online ({commands}; they go to the Hugging Face cache, "
            "~/.cache/huggingface), after which HF_HUB_OFFLINE=1 runs without a network")


def unreachable_reason() -> str:
    return "the hub is switched off (HF_HUB_OFFLINE)" if hub_offline() else "the hub cannot be reached"


def missing_weights(what: str, repos: Sequence[str], instead: Optional[str] = None) -> MissingWeightsError:
    """The error for weights (``what``, e.g. ``"--base Wan-AI/Wan2.2-I2V-A14B-Diffusers"``) whose hub
    repositories ``repos`` are not in the local cache while the hub cannot be reached; ``instead``: what to
    pass to do without them."""
    reason = unreachable_reason()
    names = ", ".join(repos)
    message = (f"{what}: the weights ({names}) are not on this machine and {reason}; {download_hint(repos)}"
               + (f"; or {instead}" if instead else ""))
    return MissingWeightsError(message)
