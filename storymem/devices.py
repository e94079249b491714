"""The one rule for where models run and in which dtype.

Device: the one asked for, else ``cuda`` when a GPU is present, else ``cpu``. Dtype names are torch's
(``float32``, ``bfloat16``, ``float16``); ``auto`` is bfloat16 for full-size models on a GPU and float32 on the
CPU and for the built-in small models (which are trained and shipped at those sizes in float16/float32). The
Wan VAE always runs in float32, as in diffusers' Wan examples.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["DTYPE_NAMES", "default_device", "resolve_device", "resolve_dtype_name", "torch_dtype", "dtype_kwargs"]

DTYPE_NAMES = ("float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Short names other tools use for the same dtypes (accelerate's mixed precision, evaluation flags).
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def default_device() -> torch.device:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """``device`` as a torch device, or :func:`default_device` when it is None."""
    return default_device() if device is None else torch.device(device)


def resolve_dtype_name(name: str, device: Union[str, torch.device, None] = None, builtin: bool = False) -> str:
    """A dtype name with ``auto`` decided: bfloat16 on a GPU for full-size models, float32 otherwise."""
    name = _ALIASES.get(name, name)
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected auto or one of {', '.join(DTYPE_NAMES)}")
        return name
    return "bfloat16" if not builtin and resolve_device(device).type == "cuda" else "float32"


def torch_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """The torch dtype of a name (``float32``/``bfloat16``/``float16`` or ``fp32``/``bf16``/``fp16``)."""
    if isinstance(name, torch.dtype):
        return name
    key = _ALIASES.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return _DTYPES[key]


def dtype_kwargs(dtype: Optional[torch.dtype]) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` where diffusers has it, ``torch_dtype`` before."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}
