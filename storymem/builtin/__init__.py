"""The built-in models: the one registry of the bases and adapters named by a word instead of a folder.

* ``"toy"``: the small world's trained model, shipped with the package (``weights/base``, a diffusers folder in
  float16; 19.5 MB with its adapter): a video model trained from scratch on a procedural world of shape
  characters at 64x64, 17 frames. ``--lora toy`` is its M2V adapter (``weights/adapter``, negative memory RoPE).
  The demo (``storymem demo``) renders :data:`DEMO_STORY` with both on the CPU, offline.
* ``"tiny"``: random weights of the same classes at test sizes (:func:`~storymem.builtin.tiny.build_tiny_components`,
  fixed seed, so ``prepare`` and ``train`` see the same weights), for tests and smoke runs.

Both use the real Wan2.2 classes and code path (``AutoencoderKLWan``, ``WanTransformer3DModel``,
``UMT5EncoderModel``), so everything that runs on them runs on Wan2.2-I2V-A14B.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["BUILTIN_BASES", "BUILTIN_ADAPTERS", "TINY_SEED", "BUILTIN_SAMPLING", "DEMO_STORY", "WEIGHTS_DIR",
           "BASE_DIR", "ADAPTER_DIR", "BuiltinWeightsError", "is_builtin", "builtin_base_folder",
           "builtin_adapter_folder", "builtin_components", "load_builtin_pipeline", "builtin_info"]

BUILTIN_BASES = ("toy", "tiny")
BUILTIN_ADAPTERS = ("toy",)
TINY_SEED = 0  # weights of the random tiny model

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
BASE_DIR = WEIGHTS_DIR / "base"
ADAPTER_DIR = WEIGHTS_DIR / "adapter"
DEMO_STORY = PACKAGE_DIR / "demo_story.json"

# Sampling settings of the built-in models, in place of the release's (they are trained at 64x64, 17 frames;
# the toy tokenizer knows no word of Wan's negative prompt, so its unconditional prompt is the empty one).
BUILTIN_SAMPLING = dict(height=64, width=64, area=64 * 64, frames=17, steps=8, shift=3.0, embedder="pixel",
                        aesthetic="none", negative_prompt="")


class BuiltinWeightsError(FileNotFoundError):
    """This copy of storymem lacks (part of) the small world's shipped weights."""


def is_builtin(name: Optional[str]) -> bool:
    """``name`` is a built-in base ("toy", "tiny") rather than a folder or hub id."""
    return name in BUILTIN_BASES


def _check(path: Path, marker: str) -> Path:
    if not (path / marker).is_file():
        raise BuiltinWeightsError(f"{path / marker} is missing: the small world's weights are not installed with "
                                  "this copy of storymem (reinstall it)")
    return path


def builtin_base_folder(name: str) -> Optional[Path]:
    """The diffusers folder of a built-in base (``"toy"``); None for ``"tiny"``, which is built in code."""
    if name == "toy":
        return _check(BASE_DIR, "model_index.json")
    if name == "tiny":
        return None
    raise ValueError(f"unknown built-in base {name!r}; expected one of {', '.join(BUILTIN_BASES)}")


def builtin_adapter_folder(name: str) -> Path:
    """The storymem adapter folder of a built-in adapter (``"toy"``)."""
    if name != "toy":
        raise ValueError(f"unknown built-in adapter {name!r}; expected one of {', '.join(BUILTIN_ADAPTERS)}")
    return _check(ADAPTER_DIR, "storymem_adapter.json")


def builtin_components(name: str = "tiny") -> dict:
    """The components of a built-in base, as ``StoryMemPipeline(**components)`` takes them."""
    if name == "tiny":
        from .tiny import build_tiny_components

        return build_tiny_components(seed=TINY_SEED)
    pipe = load_builtin_pipeline(name)
    return dict(pipe.components)


def load_builtin_pipeline(name: str, adapter: bool = False, dtype=None, device: Optional[str] = None):
    """A built-in base as a :class:`~storymem.StoryMemPipeline` (float32 unless ``dtype``), with the toy adapter
    loaded when ``adapter`` is true."""
    import torch

    from ..devices import dtype_kwargs
    from ..pipeline import StoryMemPipeline

    dtype = dtype or torch.float32
    folder = builtin_base_folder(name)
    if folder is None:
        pipe = StoryMemPipeline(**builtin_components(name))
        if dtype != torch.float32:
            for part in (pipe.transformer, pipe.transformer_2, pipe.text_encoder):
                if part is not None:
                    part.to(dtype)
    else:
        pipe = StoryMemPipeline.from_pretrained(folder, **dtype_kwargs(dtype))
    if adapter:
        pipe.load_storymem_lora(builtin_adapter_folder("toy"))
    if device is not None:
        pipe.to(device)
    return pipe


def builtin_info() -> dict:
    """What the shipped weights are: sizes of the base and the adapter's settings (``weights/info.json``)."""
    path = WEIGHTS_DIR / "info.json"
    if not path.is_file():
        raise BuiltinWeightsError(f"{path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))
