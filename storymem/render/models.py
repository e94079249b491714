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

__all__ = ["load_pipeline", "load_render_pipeline", "load_t2v_pipeline", "load_adapter",
           "place_pipeline", "set_adapter_scale", "adapter_disabled", "build_selector", "base_transformer_configs",
           "check_adapter", "check_downloads", "loading_bars", "load_selector"]


@contextlib.contextmanager
def loading_bars(enabled: bool):
    """diffusers', transformers' and huggingface_hub's loading and download bars on (as they were) or off."""
    if enabled:
        yield
        return
    import huggingface_hub.utils as hub_utils
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled(),
           hub_utils.are_progress_bars_disabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()
        if not was[2]:
            hub_utils.enable_progress_bars()


def _load_error(flag: str, name: str, err: Exception, needs: tuple[str, ...] = ("model_index.json",)) -> RenderError:
    """One line for a model that did not load: the weights missing offline, or the loader's own reason."""
    from ..hub import cached_file, is_hub_id, missing_weights

    if is_hub_id(name) and cached_file(name, needs) is None:
        return RenderError(str(missing_weights(f"{flag} {name}", [name], instead=f"pass a local folder to {flag}")))
    reason = " ".join(str(err).split()) or type(err).__name__
    return RenderError(f"{flag} {name}: cannot load it as a diffusers Wan2.2 pipeline ({reason})")


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
            with loading_bars(options.progress):
                pipe = load_builtin_pipeline(options.base)  # float32; the VAE stays so
        except BuiltinWeightsError as err:
            raise RenderError(str(err)) from None
        if dtype != torch.float32:
            for model in (pipe.transformer, pipe.transformer_2, pipe.text_encoder):
                if model is not None:
                    model.to(dtype)
    else:
        components = dict(shared or {})
        try:
            with loading_bars(options.progress):
                if "vae" not in components:
                    components["vae"] = AutoencoderKLWan.from_pretrained(options.base, subfolder="vae",
                                                                         **dtype_kwargs(torch.float32))
                pipe = StoryMemPipeline.from_pretrained(options.base, **dtype_kwargs(dtype), **components)
        except (OSError, ValueError, KeyError, TypeError) as err:  # no network, not a diffusers folder, ...
            raise _load_error("--base", options.base, err) from None
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
        with loading_bars(options.progress):
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

    try:
        with loading_bars(options.progress):
            vae = AutoencoderKLWan.from_pretrained(options.t2v_model, subfolder="vae", **dtype_kwargs(torch.float32))
            pipe = WanPipeline.from_pretrained(options.t2v_model, vae=vae, **dtype_kwargs(torch_dtype(options.dtype)))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _load_error("--t2v-model", options.t2v_model, err) from None
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
    from ..lora import AdapterError

    source, subfolder = _adapter_source(value)
    try:
        return pipe.load_storymem_lora(source, subfolder=subfolder)
    except AdapterError as err:
        raise RenderError(f"--lora {value}: {err}") from None


def base_transformer_configs(base: str) -> Optional[dict]:
    """``{"transformer": config, "transformer_2": config or None}`` of ``base`` where they can be read without
    loading weights: the built-in models', a local diffusers folder's, or a hub id's already in the local cache;
    None where they cannot."""
    import json

    from ..builtin import builtin_base_folder, is_builtin

    if base == "tiny":
        from ..builtin.tiny import TinyConfig

        tiny = TinyConfig()
        config = {"patch_size": [1, 2, 2], "num_attention_heads": tiny.heads, "attention_head_dim": tiny.head_dim,
                  "ffn_dim": tiny.ffn_dim, "num_layers": tiny.layers, "rope_max_seq_len": tiny.rope_max_seq_len}
        return {"transformer": config, "transformer_2": config if tiny.two_experts else None}
    folder = builtin_base_folder(base) if is_builtin(base) else Path(base)
    if not (folder / "model_index.json").is_file():
        from ..hub import cached_file, is_hub_id

        index = cached_file(base, ["model_index.json"]) if is_hub_id(base) else None
        if index is None:
            return None
        folder = index.parent
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        configs = {}
        for expert in ("transformer", "transformer_2"):
            entry = index.get(expert)
            listed = isinstance(entry, list) and entry and entry[0] is not None
            configs[expert] = json.loads((folder / expert / "config.json").read_text(encoding="utf-8")) \
                if listed else None
        return configs
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable folder: the loader will say what is wrong with it


def _local_adapter(value: str) -> Optional[tuple[str, Optional[str]]]:
    """(folder, subfolder) of a --lora value whose files are on this machine (a hub id only when cached)."""
    source, subfolder = _adapter_source(value)
    if Path(source).exists():
        return source, subfolder
    from ..hub import is_hub_id

    if not is_hub_id(source):
        return None
    from huggingface_hub import snapshot_download

    try:
        patterns = [f"{subfolder}/*"] if subfolder else None
        return snapshot_download(source, allow_patterns=patterns, local_files_only=True), subfolder
    except Exception:  # not (completely) in the cache: it downloads when the render loads it
        return None


def check_adapter(options: RenderOptions):
    """The ``--lora`` adapter's config after :func:`~storymem.lora.check_adapter_files` read and checked every
    tensor (against the base's transformer configs where they can be read); None without an adapter or for a hub
    id not yet downloaded (then loading checks it). Nothing loads."""
    if not options.lora:
        return None
    from ..lora import AdapterError, check_adapter_files

    local = _local_adapter(options.lora)
    if local is None:
        return None
    try:
        return check_adapter_files(local[0], subfolder=local[1],
                                   transformer_configs=base_transformer_configs(options.base))
    except AdapterError as err:
        raise RenderError(f"--lora {options.lora}: {err}") from None


def check_downloads(options: RenderOptions, selector=None, models_given: bool = False) -> None:
    """Offline (``HF_HUB_OFFLINE``), refuse at once - before anything loads - a render whose weights would have to
    be downloaded: the base, the T2V model, the adapter, the keyframe embedder and HPSv3, all named in one line
    (``models_given``: the caller loaded the pipeline; the base and the adapter are not looked at)."""
    from ..builtin import is_builtin
    from ..hub import cached_file, download_hint, hub_offline, is_hub_id

    if not hub_offline():
        return
    missing, repos = [], []
    names = (("--t2v-model", options.t2v_model),) if models_given else \
        (("--base", options.base), ("--t2v-model", options.t2v_model))
    for flag, value in names:
        if value and not is_builtin(value) and is_hub_id(value) and cached_file(value, ["model_index.json"]) is None:
            missing.append(f"{flag} {value}")
            repos.append(value)
    if options.lora and not models_given and options.lora != "toy" and _local_adapter(options.lora) is None:
        missing.append(f"--lora {options.lora}")
        repos.append(_adapter_source(options.lora)[0])
    for flag, model in (("--embedder", getattr(selector, "embedder", None)),
                        ("--aesthetic hpsv3", getattr(selector, "scorer", None))):
        absent = model.missing_repos() if callable(getattr(model, "missing_repos", None)) else []
        if absent:
            missing.append(flag)
            repos.extend(r for r in absent if r not in repos)
    if missing:
        raise RenderError(f"the hub is switched off (HF_HUB_OFFLINE) and these weights are not on this machine: "
                          f"{', '.join(missing)}; {download_hint(repos)}; or use local ones (a folder for --base / "
                          f"--lora, --embedder pixel, --aesthetic none)")


def load_selector(selector) -> None:
    """Load the keyframe selector's models now (they would load on the first selection, after a shot is drawn), so
    weights that cannot be had stop the render before it writes anything."""
    from ..hub import MissingWeightsError

    for part in (getattr(selector, "embedder", None), getattr(selector, "scorer", None)):
        if part is not None and callable(getattr(part, "load", None)):
            try:
                part.load()
            except MissingWeightsError as err:
                raise RenderError(str(err)) from None


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
            name, colon, tag = spec.partition(":")
            if colon and not tag.strip() or not name.strip():
                raise ValueError("expected MODEL:TAG or MODEL:CHECKPOINT (e.g. ViT-B-32:openai)")
            embedder = OpenCLIPEmbedder(name, pretrained=tag if colon else "openai", device=device)
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
