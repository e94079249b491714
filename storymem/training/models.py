"""Loading the parts of a Wan2.2-I2V base model that preparation and training need, one part at a time.

``base`` is a diffusers Wan2.2-I2V folder or hub id (``Wan-AI/Wan2.2-I2V-A14B-Diffusers``), ``"toy"``: the small
world's trained base shipped with the package (:mod:`storymem.builtin`), or ``"tiny"``: random-weight
components of the same classes, CPU-sized and built from a fixed seed (so ``prepare`` and ``train`` see the same
weights), for tests and smoke runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["TINY_BASE", "TOY_BASE", "is_toy", "load_encoders", "load_expert", "load_scheduler", "base_identity",
           "resolve_base"]

TOY_BASE = "toy"
TINY_BASE = "tiny"


def is_toy(base: str) -> bool:
    """The random-weight tiny base (built in code, not loaded from a folder)."""
    return str(base) == TINY_BASE


def resolve_base(base: str) -> str:
    """``"toy"`` -> the folder of the shipped small-world base; anything else unchanged."""
    if str(base) == TOY_BASE:
        from ..builtin import builtin_base_folder

        return str(builtin_base_folder("toy"))
    return str(base)


def _toy_components() -> dict:
    from ..builtin import builtin_components

    return builtin_components("tiny")


def base_identity(base: str) -> str:
    """How the base is recorded in a prepared dataset (absolute path for folders)."""
    if is_toy(base) or str(base) == TOY_BASE:
        return str(base)
    path = Path(base)
    return str(path.resolve()) if path.exists() else str(base)


def _check_base(base: str):
    if str(base) == TOY_BASE:
        return
    path = Path(base)
    if not is_toy(base) and (path.is_absolute() or str(base).startswith(".")) and not path.is_dir():
        raise FileNotFoundError(f"{base}: base model folder not found")


def load_encoders(base: str, device=None, text_dtype: torch.dtype = torch.bfloat16,
                  vae_dtype: torch.dtype = torch.float32):
    """A :class:`~storymem.StoryMemPipeline` holding tokenizer, text encoder, VAE and scheduler (no
    transformers): what :func:`~storymem.training.cache.prepare_dataset` encodes with."""
    from ..pipeline import StoryMemPipeline

    _check_base(base)
    base = resolve_base(base)
    if is_toy(base):
        parts = _toy_components()
        parts.update(transformer=None, transformer_2=None)
    else:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        parts = dict(
            tokenizer=AutoTokenizer.from_pretrained(base, subfolder="tokenizer"),
            text_encoder=UMT5EncoderModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=text_dtype),
            vae=AutoencoderKLWan.from_pretrained(base, subfolder="vae", torch_dtype=vae_dtype),
            scheduler=load_scheduler(base),
            transformer=None, transformer_2=None, boundary_ratio=None,
        )
    pipe = StoryMemPipeline(**parts)
    pipe.text_encoder.eval().requires_grad_(False)
    pipe.vae.eval().requires_grad_(False)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_scheduler(base: str):
    base = resolve_base(base)
    if is_toy(base):
        return _toy_components()["scheduler"]
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_pretrained(base, subfolder="scheduler")


def load_expert(base: str, expert: str, dtype: torch.dtype = torch.bfloat16, device=None):
    """One expert's transformer (``"transformer"`` high-noise, ``"transformer_2"`` low-noise)."""
    _check_base(base)
    base = resolve_base(base)
    if is_toy(base):
        model = _toy_components()[expert]
        if model is None:
            raise ValueError(f"the toy base has no {expert}")
        if model.dtype != dtype:
            model = model.to(dtype=dtype)
    else:
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel.from_pretrained(base, subfolder=expert, torch_dtype=dtype)
    if device is not None:
        model.to(device)
    return model


def load_vae(base: str, dtype: torch.dtype = torch.float32, device=None):
    base = resolve_base(base)
    if is_toy(base):
        vae = _toy_components()["vae"]
    else:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(base, subfolder="vae", torch_dtype=dtype)
    vae = vae.to(dtype=dtype).eval().requires_grad_(False)
    return vae.to(device) if device is not None else vae


def load_boundary_ratio(base: str) -> Optional[float]:
    """The pipeline's ``boundary_ratio`` from ``model_index.json`` (0.9 for Wan2.2-A14B)."""
    base = resolve_base(base)
    if is_toy(base):
        return _toy_components()["boundary_ratio"]
    import json

    path = Path(base) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text()).get("boundary_ratio")
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(base, "model_index.json")).read_text()).get("boundary_ratio")
