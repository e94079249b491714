"""The models a render loads: the StoryMem pipeline of the base, its adapter, the T2V model of shot 1, their
placement (device or diffusers offload) and the keyframe selector.

Every function takes :class:`RenderOptions` as :meth:`~RenderOptions.resolved` returns them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from .options import RenderError, RenderOptions, looks_local

__all__ = ["load_pipeline", "load_render_pipeline", "load_t2v_pipeline", "load_adapter", "adapter_memory_rope",
           "place_pipeline", "set_adapter_scale", "adapter_disabled", "build_selector"]


def load_pipeline(options: RenderOptions, shared: Optional[dict] = None):
    """The StoryMem pipeline of ``options.base`` ("toy", "tiny", a Wan2.2-I2V diffusers folder or hub id) in the
    options' dtype (the VAE in float32, as diffusers' Wan examples), with its UniPC shift set. ``shared``:
    already loaded components (text encoder, tokenizer, VAE of the T2V model, which are the same models)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    from ..builtin import BuiltinWeightsError, load_builtin_pipeline
    from ..devices import dtype_kwargs, torch_dtype
    from ..pipeline import StoryMemPipeline

    dtype = torch_dtype(options.dtype)
    if options.is_builtin:
        try:
            pipe = load_builtin_pipeline(options.base)  # float32; the VAE stays so
        except BuiltinWeightsError as err:
            raise RenderError(str(err)) from None
        if dtype != torch.float32:
            for model in (pipe.transformer, pipe.transformer_2, pipe.text_encoder):
                if model is not None:
                    model.to(dtype)
    else:
        components = dict(shared or {})
        if "vae" not in components:
            components["vae"] = AutoencoderKLWan.from_pretrained(options.base, subfolder="vae",
                                                                 **dtype_kwargs(torch.float32))
        pipe = StoryMemPipeline.from_pretrained(options.base, **dtype_kwargs(dtype), **components)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=options.shift)
    return pipe


def load_render_pipeline(options: RenderOptions, shared: Optional[dict] = None, device: Optional[str] = None,
                         speed=None, prompts: Optional[list] = None):
    """The pipeline a render of ``options`` runs: :func:`load_pipeline`, the ``--lora`` adapter, the attention
    backend, then the speed options (distill LoRA, adapter scales, preset, fusing, low-VRAM placement or
    ``--offload``, compilation: :func:`storymem.render.speed.setup_pipeline`), on ``device`` (default: the
    options'). Load it once and hand it to several renders (``render_story(..., pipe=pipe)``) with the same
    adapter settings; context parallelism is left to the renderer. ``speed``: from
    :func:`~storymem.render.speed.prepare_speed` (default: prepared here); ``prompts``: with ``--low-vram``, every
    prompt it will render, encoded once before the text encoder is released (without them it stays, offloaded)."""
    from .speed import prepare_speed, setup_pipeline

    options = options.resolved()
    speed = speed if speed is not None else prepare_speed(options)
    pipe = load_pipeline(options, shared=shared)
    if options.lora:
        load_adapter(pipe, options.lora)
    if options.attention_backend and options.parallel == "none":
        for model in (pipe.transformer, pipe.transformer_2):
            if model is not None:
                model.set_attention_backend(options.attention_backend)
    return setup_pipeline(pipe, options, speed, device or options.device, "i2v", prompts)


def load_t2v_pipeline(options: RenderOptions):
    """diffusers' ``WanPipeline`` of ``options.t2v_model`` (Wan2.2-T2V-A14B), VAE in float32."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from ..devices import dtype_kwargs, torch_dtype

    vae = AutoencoderKLWan.from_pretrained(options.t2v_model, subfolder="vae", **dtype_kwargs(torch.float32))
    pipe = WanPipeline.from_pretrained(options.t2v_model, vae=vae, **dtype_kwargs(torch_dtype(options.dtype)))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=options.t2v_shift)
    return pipe


def place_pipeline(pipe, options: RenderOptions, device: str):
    """Move a pipeline to its device, or let diffusers offload it there (``--offload``)."""
    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def _adapter_source(value: str) -> tuple[str, Optional[str]]:
    """(folder or hub id, subfolder) of a --lora value: a local folder, a hub id, 'org/name/subfolder' for one
    variant of a hub repository, or "toy" (the small world's adapter)."""
    if value == "toy":
        from ..builtin import BuiltinWeightsError, builtin_adapter_folder

        try:
            return str(builtin_adapter_folder("toy")), None
        except BuiltinWeightsError as err:
            raise RenderError(str(err)) from None
    parts = value.split("/")
    if Path(value).exists() or looks_local(value) or len(parts) <= 2:
        return value, None
    return "/".join(parts[:2]), "/".join(parts[2:])


def load_adapter(pipe, value: str):
    """Load the ``--lora`` adapter into ``pipe`` (see :func:`_adapter_source` for the forms it takes)."""
    source, subfolder = _adapter_source(value)
    return pipe.load_storymem_lora(source, subfolder=subfolder)


def adapter_memory_rope(value: Optional[str]) -> Optional[str]:
    """The memory RoPE mode the ``--lora`` adapter records, read from its folder's metadata without loading its
    weights; None where that needs the adapter loaded (hub ids, published folders, which carry no metadata)."""
    if not value:
        return None
    from ..lora import ADAPTER_CONFIG_NAME, AdapterError, StoryMemLoraConfig

    source, subfolder = _adapter_source(value)
    config = Path(source) / (subfolder or "") / ADAPTER_CONFIG_NAME
    if not config.is_file():
        return None
    try:
        return StoryMemLoraConfig.from_file(config).memory_rope
    except AdapterError as err:
        raise RenderError(f"--lora {value}: {err}") from None


def set_adapter_scale(pipe, scale: float, adapter_name: str = "storymem") -> None:
    """Weigh the loaded StoryMem adapter by ``scale`` in every expert that has it (diffusers' ``set_adapters``,
    as for any LoRA): 0 is the base alone, 1 the adapter as trained."""
    for model in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if model is not None and adapter_name in (getattr(model, "peft_config", None) or {}):
            model.set_adapters(adapter_name, weights=scale)


@contextlib.contextmanager
def adapter_disabled(pipe):
    """The pipeline with its LoRA layers switched off (diffusers' ``disable_lora``), on again afterwards."""
    loaded = [getattr(pipe, n, None) for n in pipe._lora_loadable_modules]
    if not any(getattr(m, "_hf_peft_config_loaded", False) for m in loaded if m is not None):
        yield pipe  # no adapter: the base already
        return
    pipe.disable_lora()
    try:
        yield pipe
    finally:
        pipe.enable_lora()


def build_selector(options: RenderOptions, device: Optional[str] = None):
    """KeyframeSelector from --embedder / --aesthetic / --keyframe-threshold. Its models load lazily, on the
    first selection, and stay with the selector: hand one selector to several renders to load them once."""
    options = options.resolved()
    device = device or options.device
    from ..memory import KeyframeSelector, NullScorer, OpenCLIPEmbedder, PixelEmbedder

    spec = options.embedder
    try:
        if spec == "pixel":
            embedder = PixelEmbedder()
        elif spec.startswith(("hf-hub:", "local-dir:")):
            embedder = OpenCLIPEmbedder(model_name=spec, pretrained=None, device=device)
        elif os.path.isfile(spec):
            embedder = OpenCLIPEmbedder("ViT-B-32", pretrained=spec, device=device)
        else:
            name, _, tag = spec.partition(":")
            embedder = OpenCLIPEmbedder(name, pretrained=tag or "openai", device=device)
    except (ValueError, OSError) as err:
        raise RenderError(f"--embedder {spec!r}: {err}") from None
    if options.aesthetic == "none":
        scorer = NullScorer()
    else:
        from ..memory.hpsv3 import HPSV3_BASE, HPSV3_HUB_ID, HPSv3Scorer

        try:
            scorer = HPSv3Scorer(checkpoint=options.hpsv3_checkpoint or HPSV3_HUB_ID,
                                 base=options.hpsv3_base or HPSV3_BASE, device=device)
        except (ValueError, OSError) as err:
            raise RenderError(f"--hpsv3-checkpoint / --hpsv3-base: {err}") from None
    return KeyframeSelector(embedder=embedder, scorer=scorer, threshold=options.keyframe_threshold)
