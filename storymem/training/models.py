"""Loading the parts of a Wan2.2-I2V base model that preparation and training need, one part at a time.

``base`` is a diffusers Wan2.2-I2V folder or hub id (:data:`storymem.defaults.WAN_I2V_BASE`), or a built-in
base of :mod:`storymem.builtin`: ``"toy"`` (the small world's trained base, a diffusers folder shipped with the
package) or ``"tiny"`` (random-weight components of the same classes, built in code from a fixed seed, so
``prepare`` and ``train`` see the same weights).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import torch

from ..builtin import builtin_base_folder, builtin_components, is_builtin
from ..devices import dtype_kwargs

__all__ = ["is_random_base", "resolve_base", "base_identity", "check_base_available", "base_rope_length",
           "check_sizes_fit_base", "load_encoders", "load_expert", "load_scheduler", "load_boundary_ratio"]

ENCODER_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler")  # what prepare loads
WAN_ROPE_LENGTH = 1024  # WanTransformer3DModel's rope_max_seq_len (the Wan2.2 bases' own)
SPATIAL_STRIDE = 16  # pixels per rope position in height and width: VAE stride 8 x patch 2


def is_random_base(base: str) -> bool:
    """``base`` is a built-in base of random weights built in code (``"tiny"``), not loaded from a folder."""
    return is_builtin(base) and builtin_base_folder(base) is None


def _components_in_code(base: str) -> Optional[dict]:
    """The components of a base built in code; None for every other base."""
    return builtin_components(base) if is_random_base(base) else None


def resolve_base(base: str) -> str:
    """Where a base is loaded from: a built-in base's folder (``"toy"``), else ``base`` unchanged."""
    base = str(base)
    folder = builtin_base_folder(base) if is_builtin(base) else None
    return str(folder) if folder is not None else base


def base_identity(base: str) -> str:
    """How the base is recorded in a prepared dataset and an adapter: a built-in base's name, a folder's
    absolute path, or the hub id."""
    base = str(base)
    if is_builtin(base):
        return base
    path = Path(base)
    return str(path.resolve()) if path.exists() else base


def _check_base(base: str):
    path = Path(base)
    if not is_builtin(base) and (path.is_absolute() or base.startswith(".")) and not path.is_dir():
        raise FileNotFoundError(f"{base}: base model folder not found")


def _how_to_get(base: str) -> str:
    return (f"download it once with `hf download {base}` (offline runs then find it in the Hugging Face cache), or "
            "give --base the folder of a local diffusers copy; --base toy or --base tiny runs a built-in model "
            "without downloads")


def _is_hub_id(base: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(base)
    except HFValidationError:
        return False
    return True


def check_base_available(base: str, parts=ENCODER_PARTS) -> None:
    """Fail early, in one line, when ``parts`` of a base cannot be loaded: a built-in base without its weights,
    a folder without them, or a hub id that is not in the local cache while the hub is out of reach (offline
    mode). A hub id that is not cached while online is left to download."""
    base = str(base)
    if is_builtin(base):
        builtin_base_folder(base)  # raises BuiltinWeightsError naming the missing file
        return
    _check_base(base)
    folder = Path(base)
    if folder.is_dir():
        missing = [part for part in parts if not (folder / part).is_dir()]
        if missing:
            raise FileNotFoundError(f"{base}: not a diffusers Wan2.2-I2V folder (no {', '.join(missing)} "
                                    "subfolder)")
        return
    if not _is_hub_id(base):
        raise FileNotFoundError(f"{base}: no such folder, and not a built-in base (toy, tiny) or a hub id")
    import huggingface_hub

    marker = {"tokenizer": "tokenizer/tokenizer_config.json", "scheduler": "scheduler/scheduler_config.json"}
    cached = all(isinstance(huggingface_hub.try_to_load_from_cache(base, marker.get(part, f"{part}/config.json")),
                            str) for part in parts)
    if not cached and huggingface_hub.is_offline_mode():
        raise FileNotFoundError(f"{base}: the base model is not in the local Hugging Face cache and downloads are "
                                f"off (HF_HUB_OFFLINE); {_how_to_get(base)}")


def base_rope_length(base: str) -> int:
    """Positions per axis of the base transformer's rope table (``rope_max_seq_len``): what bounds the latent
    frames, height and width it can take. Read from its config without loading weights; Wan's 1024 when the
    config is not at hand (a hub id not downloaded yet)."""
    base = str(base)
    if is_random_base(base):
        from ..builtin.tiny import TinyConfig

        return TinyConfig().rope_max_seq_len
    folder = Path(resolve_base(base))
    config_file = folder / "transformer" / "config.json"
    if not config_file.is_file() and not folder.is_dir() and _is_hub_id(base):
        import huggingface_hub

        cached = huggingface_hub.try_to_load_from_cache(base, "transformer/config.json")
        config_file = Path(cached) if isinstance(cached, str) else config_file
    try:
        return int(json.loads(config_file.read_text()).get("rope_max_seq_len", WAN_ROPE_LENGTH))
    except (OSError, ValueError, TypeError, AttributeError):
        return WAN_ROPE_LENGTH


def check_sizes_fit_base(base: str, height: int, width: int, num_frames: int, rope_length: Optional[int] = None):
    """Raise :class:`~storymem.training.errors.TrainingConfigError` naming the size that does not fit the base's
    rope table (each latent frame and each 16 pixels of height and width take one position)."""
    from .errors import TrainingConfigError

    rope = rope_length or base_rope_length(base)
    latent_frames = (num_frames - 1) // 4 + 1
    if latent_frames > rope:
        raise TrainingConfigError(f"{num_frames} frames are {latent_frames} latent frames; the rope table of {base} "
                                  f"holds {rope} (at most {4 * (rope - 1) + 1} frames)", option="num_frames")
    for name, size in (("height", height), ("width", width)):
        if size // SPATIAL_STRIDE > rope:
            raise TrainingConfigError(f"{size} pixels are {size // SPATIAL_STRIDE} rope positions; the rope table of "
                                      f"{base} holds {rope} (at most {SPATIAL_STRIDE * rope} pixels)", option=name)


def _from_pretrained(cls, base: str, subfolder: str, **kwargs):
    """``cls.from_pretrained(base, subfolder=...)``; a base that cannot be found (no such folder or hub id,
    or no network for a hub id not in the cache) raises a one-line FileNotFoundError naming it and how to get
    it."""
    try:
        return cls.from_pretrained(base, subfolder=subfolder, **kwargs)
    except OSError as e:  # diffusers, transformers and huggingface_hub report missing models as OSErrors
        if Path(base).is_dir():
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"{base}: cannot load the base model's {subfolder} ({first})") from None
        # From the hub, the libraries' reasons ("does not appear to have a file named config.json") mislead.
        raise FileNotFoundError(f"{base}: the base model's {subfolder} is not in the local Hugging Face cache and "
                                f"could not be downloaded (no network?); {_how_to_get(base)}") from None


@contextlib.contextmanager
def _loading_bars(shown: bool):
    """transformers' and diffusers' weight-loading progress bars on or off for the duration."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    modules = [m for m in (transformers_logging, diffusers_logging) if m.is_progress_bar_enabled() != shown]
    for module in modules:
        (module.enable_progress_bar if shown else module.disable_progress_bar)()
    try:
        yield
    finally:
        for module in modules:
            (module.disable_progress_bar if shown else module.enable_progress_bar)()


def load_encoders(base: str, device=None, text_dtype: torch.dtype = torch.bfloat16,
                  vae_dtype: torch.dtype = torch.float32, progress: bool = True):
    """A :class:`~storymem.StoryMemPipeline` holding tokenizer, text encoder, VAE and scheduler (no
    transformers): what :func:`~storymem.training.prepare_dataset` encodes with."""
    from ..pipeline import StoryMemPipeline

    _check_base(str(base))
    parts = _components_in_code(base)
    if parts is not None:
        parts.update(transformer=None, transformer_2=None)
    else:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = resolve_base(base)
        with _loading_bars(progress):
            parts = dict(
                tokenizer=_from_pretrained(AutoTokenizer, folder, "tokenizer"),
                text_encoder=_from_pretrained(UMT5EncoderModel, folder, "text_encoder", torch_dtype=text_dtype),
                vae=_from_pretrained(AutoencoderKLWan, folder, "vae", **dtype_kwargs(vae_dtype)),
                scheduler=load_scheduler(folder),
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
    parts = _components_in_code(base)
    if parts is not None:
        return parts["scheduler"]
    from diffusers import UniPCMultistepScheduler

    return _from_pretrained(UniPCMultistepScheduler, resolve_base(base), "scheduler")


def load_expert(base: str, expert: str, dtype: torch.dtype = torch.bfloat16, device=None):
    """One expert's transformer (``"transformer"`` high-noise, ``"transformer_2"`` low-noise)."""
    _check_base(str(base))
    parts = _components_in_code(base)
    if parts is not None:
        model = parts[expert]
        if model is None:
            raise ValueError(f"the {base} base has no {expert}")
        if model.dtype != dtype:
            model = model.to(dtype=dtype)
    else:
        from diffusers import WanTransformer3DModel

        model = _from_pretrained(WanTransformer3DModel, resolve_base(base), expert, **dtype_kwargs(dtype))
    if device is not None:
        model.to(device)
    return model


def load_boundary_ratio(base: str) -> Optional[float]:
    """The pipeline's ``boundary_ratio`` from ``model_index.json`` (0.9 for Wan2.2-A14B)."""
    parts = _components_in_code(base)
    if parts is not None:
        return parts["boundary_ratio"]
    folder = resolve_base(base)
    path = Path(folder) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text()).get("boundary_ratio")
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(folder, "model_index.json")).read_text()).get("boundary_ratio")
