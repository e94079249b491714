"""The small world's trained weights, shipped in the package: the base video model (a diffusers folder, float16
safetensors) and its M2V adapter (trained with ``train_lora.py``, negative memory RoPE).

``scripts/train_small_world.sh`` is how they were made; :func:`load_small_world_pipeline` is what
``infer_story.py --demo`` / ``--base toy`` runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

__all__ = ["WEIGHTS_DIR", "BASE_DIR", "ADAPTER_DIR", "SmallWorldWeightsError", "load_small_world_pipeline",
           "small_world_info"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASE_DIR = WEIGHTS_DIR / "base"
ADAPTER_DIR = WEIGHTS_DIR / "adapter"


class SmallWorldWeightsError(FileNotFoundError):
    """The package lacks (part of) the small world's weights."""


def _check(path: Path, marker: str):
    if not (path / marker).is_file():
        raise SmallWorldWeightsError(f"{path / marker} is missing: the small world's weights are not installed "
                                     "with this copy of storymem (reinstall it, or retrain them with "
                                     "scripts/train_small_world.sh)")


def small_world_info() -> dict:
    """What the shipped weights are: sizes of the base and the adapter's settings (``weights/info.json``)."""
    path = WEIGHTS_DIR / "info.json"
    if not path.is_file():
        raise SmallWorldWeightsError(f"{path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def load_small_world_pipeline(adapter: bool = True, dtype: torch.dtype = torch.float32,
                              device: Optional[str] = None):
    """The shipped base as a :class:`~storymem.StoryMemPipeline` (weights upcast to ``dtype``), with the M2V
    adapter loaded unless ``adapter=False``."""
    from ..pipeline import StoryMemPipeline

    from diffusers.pipelines import pipeline_utils

    _check(BASE_DIR, "model_index.json")
    # ``dtype`` where diffusers has it, ``torch_dtype`` before.
    key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    pipe = StoryMemPipeline.from_pretrained(BASE_DIR, **{key: dtype})
    if adapter:
        _check(ADAPTER_DIR, "storymem_adapter.json")
        pipe.load_storymem_lora(ADAPTER_DIR)
    if device is not None:
        pipe.to(device)
    return pipe
