"""Rendering faster and in less memory: few-step presets, regional compilation, low-VRAM placement, prompts
encoded once up front, and the checks that refuse flag combinations which cannot work.

* :data:`PRESETS` - ``"release"`` (the M2V release: 40 steps, guidance 3.5 on both experts, UniPC flow shift 4,
  boundary 0.9) and ``"lightning"`` (what Wan2.2-Lightning distill LoRAs are made for: 4 steps, guidance 1 on
  both experts - one forward per step -, Euler flow matching with shift 5 on Wan's timestep grid, boundary
  0.9); each also carries the T2V first shot's settings. Every value stays overridable
  (:func:`resolve_preset`, :meth:`SamplingPreset.override`).
* :func:`compile_experts` - regional compilation (diffusers' ``compile_repeated_blocks``) of each expert's
  transformer block, with dynamic shapes, so the sequence length changing with the memory count from shot to
  shot does not recompile; :func:`compile_stats` reads the compiles and the time they took.
* :func:`enable_low_vram` - fp8 storage of the experts (``enable_layerwise_casting``), block-level group
  offload on CUDA streams, tiled VAE, the text encoder offloaded leaf by leaf or released after
  :func:`encode_story_prompts` encoded every prompt once; :func:`release_models` (the T2V experts after shot 1)
  and :func:`keyframe_models_on` (the keyframe models on the GPU only while they select keyframes).
* :func:`check_speed_options` - refuses impossible combinations before any model loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .arguments import option
from .defaults import BOUNDARY_RATIO, FLOW_SHIFT, GUIDANCE, STEPS, T2V_FLOW_SHIFT, T2V_GUIDANCE, T2V_GUIDANCE_2

__all__ = [
    "SAMPLERS", "T2V_BOUNDARY_RATIO", "WanEulerScheduler", "SamplingPreset", "PRESETS", "resolve_preset",
    "compile_experts", "compile_stats", "CompileStats", "LowVramConfig", "enable_low_vram", "release_models",
    "release_text_encoder", "keyframe_models_on", "free_accelerator_memory", "PromptEmbeddings",
    "encode_story_prompts", "SpeedOptions", "check_speed_options",
]

SAMPLERS = ("unipc", "euler")
T2V_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's expert switch (its model_index boundary_ratio)
EXPERTS = ("transformer", "transformer_2")


# ---------------------------------------------------------------------------------------------- sampling
class WanEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """Euler flow matching on Wan's timestep grid: N steps at sigmas ``linspace(1, 0, N + 1)[:-1]``, shifted by
    ``shift * s / (1 + (shift - 1) * s)``, ending at 0 - the sampler Wan2.2-Lightning's LoRAs were distilled
    for (4 steps, shift 5: t = 1000, 937.5, 833.3, 625). diffusers' stock grid, ``linspace(1, 1/1000)`` shifted
    twice, puts 4 steps elsewhere (1000, 909.7, 717.3, 24.4)."""

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        if sigmas is None and timesteps is None and num_inference_steps is not None:
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)


@dataclass(frozen=True)
class SamplingPreset:
    """Sampling settings of the I2V shots and of the T2V first shot (``t2v_*``)."""

    name: str
    steps: int
    guidance: float
    guidance_2: float
    sampler: str
    shift: float
    boundary_ratio: float
    t2v_steps: int
    t2v_guidance: float
    t2v_guidance_2: float
    t2v_sampler: str
    t2v_shift: float
    t2v_boundary_ratio: float

    def __post_init__(self):
        for stage in ("", "t2v_"):
            steps, g, g2 = (getattr(self, stage + n) for n in ("steps", "guidance", "guidance_2"))
            flag = f"--{stage.replace('_', '-')}"
            if not isinstance(steps, int) or steps < 1:
                raise ValueError(f"{flag}steps must be an integer >= 1, got {steps!r}")
            for name, value in (("guidance", g), ("guidance-2", g2)):
                if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise ValueError(f"{flag}{name} must be a finite number >= 0, got {value!r}")
            if g <= 1 < g2:
                # Wan's pipelines decide classifier-free guidance from the high-noise scale alone.
                raise ValueError(f"{flag}guidance-2 {g2} needs {flag}guidance > 1: the pipelines run classifier-free "
                                 f"guidance only when the high-noise guidance exceeds 1 (it is {g})")
            sampler, shift, boundary = (getattr(self, stage + n) for n in ("sampler", "shift", "boundary_ratio"))
            if sampler not in SAMPLERS:
                raise ValueError(f"{flag}sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
            if not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
                raise ValueError(f"{flag}shift must be > 0, got {shift!r}")
            if not isinstance(boundary, (int, float)) or not 0 <= boundary <= 1:
                raise ValueError(f"{flag}boundary-ratio must lie in [0, 1], got {boundary!r}")

    def override(self, **values) -> "SamplingPreset":
        """A copy with the given fields replaced; ``None`` values keep the preset's (flags left unset)."""
        names = {f.name for f in dataclasses.fields(self)} - {"name"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}; known: {sorted(names)}")
        changed = {k: v for k, v in values.items() if v is not None and v != getattr(self, k)}
        if not changed:
            return self
        return dataclasses.replace(self, name=f"{self.name}+overrides", **changed)

    def _stage(self, stage: str) -> str:
        if stage not in ("i2v", "t2v"):
            raise ValueError(f"stage must be 'i2v' or 't2v', got {stage!r}")
        return "t2v_" if stage == "t2v" else ""

    def scheduler(self, stage: str = "i2v", current=None):
        """A fresh scheduler for ``stage``; a UniPC ``current`` scheduler keeps its config, shift replaced."""
        from diffusers import UniPCMultistepScheduler

        p = self._stage(stage)
        sampler, shift = getattr(self, p + "sampler"), float(getattr(self, p + "shift"))
        if sampler == "euler":
            return WanEulerScheduler(num_train_timesteps=1000, shift=shift)
        if isinstance(current, UniPCMultistepScheduler):
            return UniPCMultistepScheduler.from_config(current.config, flow_shift=shift)
        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift)

    def call_kwargs(self, stage: str = "i2v", two_experts: bool = True) -> dict:
        """The pipeline-call arguments of ``stage``: steps and guidance (``guidance_scale_2`` with two experts)."""
        p = self._stage(stage)
        kwargs = dict(num_inference_steps=getattr(self, p + "steps"), guidance_scale=getattr(self, p + "guidance"))
        if two_experts:
            kwargs["guidance_scale_2"] = getattr(self, p + "guidance_2")
        return kwargs

    def apply(self, pipe, stage: str = "i2v") -> dict:
        """Give ``pipe`` this preset's scheduler and expert boundary; returns :meth:`call_kwargs` for it."""
        p = self._stage(stage)
        pipe.scheduler = self.scheduler(stage, current=getattr(pipe, "scheduler", None))
        two_experts = pipe.config.get("boundary_ratio") is not None
        if two_experts:
            pipe.register_to_config(boundary_ratio=float(getattr(self, p + "boundary_ratio")))
        return self.call_kwargs(stage, two_experts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, SamplingPreset] = {
    "release": SamplingPreset(
        "release", steps=STEPS, guidance=GUIDANCE, guidance_2=GUIDANCE, sampler="unipc", shift=FLOW_SHIFT,
        boundary_ratio=BOUNDARY_RATIO, t2v_steps=STEPS, t2v_guidance=T2V_GUIDANCE, t2v_guidance_2=T2V_GUIDANCE_2,
        t2v_sampler="unipc", t2v_shift=T2V_FLOW_SHIFT, t2v_boundary_ratio=T2V_BOUNDARY_RATIO),
    "lightning": SamplingPreset(
        "lightning", steps=4, guidance=1.0, guidance_2=1.0, sampler="euler", shift=5.0, boundary_ratio=0.9,
        t2v_steps=4, t2v_guidance=1.0, t2v_guidance_2=1.0, t2v_sampler="euler", t2v_shift=5.0,
        t2v_boundary_ratio=T2V_BOUNDARY_RATIO),
}


def resolve_preset(name: str = "release", **overrides) -> SamplingPreset:
    """``PRESETS[name]`` with ``overrides`` (None = keep the preset's value)."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name].override(**overrides)


# ---------------------------------------------------------------------------------------------- compile
@dataclass
class CompileStats:
    """Graphs torch.compile has built so far in this process (a recompile builds one more), and the seconds
    spent building them."""

    graphs: int
    seconds: float

    def __sub__(self, other: "CompileStats") -> "CompileStats":
        return CompileStats(self.graphs - other.graphs, self.seconds - other.seconds)


def compile_stats() -> CompileStats:
    """Snapshot of torch.compile's counters: subtract two to count (re)compiles and their time in between."""
    from torch._dynamo.utils import calculate_time_spent, counters

    return CompileStats(int(counters["stats"]["unique_graphs"]),
                        float(calculate_time_spent().get("entire_frame_compile", 0.0)))


def _experts(pipe_or_models) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(pipe_or_models, torch.nn.Module):
        return [("model", pipe_or_models)]
    if isinstance(pipe_or_models, (list, tuple)):
        return [(f"model_{i}", m) for i, m in enumerate(pipe_or_models) if m is not None]
    return [(n, getattr(pipe_or_models, n)) for n in EXPERTS if getattr(pipe_or_models, n, None) is not None]


def compile_experts(pipe_or_models, dynamic: bool = True, fullgraph: bool = True, mode: Optional[str] = None,
                    backend: Optional[str] = None) -> list[str]:
    """Compile each expert's repeated transformer block (regional compilation), lazily on the first forward.

    ``dynamic=True`` compiles the blocks for symbolic sequence lengths, so a shot with another memory count (a
    longer sequence) reuses the compiled code instead of recompiling. Adapters should be fused first (peft's
    LoRA layers cost time in every forward, compiled or not). Works on a pipeline (both experts; the T2V
    pipeline's too) or on models. Returns the names compiled; :func:`compile_stats` measures the compile time.
    """
    if dynamic:
        # Without this, sizes equal by chance at the first compile are assumed equal for good (e.g. 30 latent
        # frames = 30 latent rows at 9 memory frames and 480p), and the next memory count recompiles.
        # Process-wide, and it only matters for dynamic shapes.
        from torch.fx.experimental import _config as fx_config

        if hasattr(fx_config, "use_duck_shape"):
            fx_config.use_duck_shape = False
    kwargs = dict(fullgraph=fullgraph, dynamic=dynamic)
    if mode:
        kwargs["mode"] = mode
    if backend:
        kwargs["backend"] = backend
    names = []
    for name, model in _experts(pipe_or_models):
        model.compile_repeated_blocks(**kwargs)
        names.append(name)
    if not names:
        raise ValueError("no transformer to compile")
    return names


# ---------------------------------------------------------------------------------------------- placement
def free_accelerator_memory() -> None:
    """Collect garbage and hand cached accelerator memory back, so the next model finds it free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class LowVramConfig:
    """What :func:`enable_low_vram` does. ``text_encoder``: ``"release"`` (moved to the CPU and detached from
    the pipeline: encode every prompt first with :func:`encode_story_prompts`), ``"leaf"`` (leaf-level group
    offload; block-level finds no block list in UMT5) or ``"keep"`` (left as it is)."""

    fp8_storage: bool = True
    group_offload: bool = True
    use_stream: bool = True
    record_stream: bool = False
    low_cpu_mem_usage: bool = False
    text_encoder: str = "release"
    vae_tiling: bool = True

    def __post_init__(self):
        if self.text_encoder not in ("release", "leaf", "keep"):
            raise ValueError(f"text_encoder must be release, leaf or keep, got {self.text_encoder!r}")


def release_text_encoder(pipe):
    """Detach the text encoder from ``pipe`` (which then needs ``prompt_embeds``) and move it to the CPU; returns
    it. Detached rather than left on the CPU: the pipeline's execution device would follow it there."""
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is None:
        return None
    _remove_hooks(encoder)
    encoder.to("cpu")
    pipe.text_encoder = None
    free_accelerator_memory()
    return encoder


def _remove_hooks(module) -> None:
    """Remove diffusers' (group offload, layerwise casting) and accelerate's hooks from a module tree."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None:
            for name in list(registry.hooks):
                registry.remove_hook(name, recurse=False)
    if any(hasattr(sub, "_hf_hook") for sub in module.modules()):
        import accelerate

        accelerate.hooks.remove_hook_from_module(module, recurse=True)


def enable_low_vram(pipe, device: Union[str, torch.device] = "cuda", config: Optional[LowVramConfig] = None) -> dict:
    """Place ``pipe`` for a small GPU: experts stored in fp8 (computed in their own dtype, layer by layer) and
    offloaded block by block on CUDA streams (the next block loads while one computes), VAE on ``device`` with
    tiled decoding, text encoder released or offloaded leaf by leaf (see :class:`LowVramConfig`).

    Call it on a pipeline whose adapters are loaded, scaled and preferably fused (:func:`storymem.distill.fuse_loras`,
    ``device=`` to merge on the GPU), and, with ``text_encoder="release"``, after the prompts are encoded.
    Returns what was done, e.g. for the manifest.
    """
    from diffusers.hooks import apply_group_offloading

    config = config or LowVramConfig()
    device = torch.device(device)
    done: dict = {"device": str(device), "experts": []}
    for name, model in _experts(pipe):
        compute = model.dtype  # the weights' own dtype (bfloat16 for A14B), not the fp32-kept modules'
        if config.fp8_storage:
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
        if config.group_offload:
            model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1,
                                       use_stream=config.use_stream, record_stream=config.record_stream,
                                       low_cpu_mem_usage=config.low_cpu_mem_usage)
        else:
            model.to(device)
        done["experts"].append(name)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        vae.to(device)
        if config.vae_tiling:
            vae.enable_tiling()
    done["vae_tiling"] = bool(vae is not None and config.vae_tiling)
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is not None and config.text_encoder == "leaf":
        apply_group_offloading(encoder, onload_device=device, offload_type="leaf_level",
                               use_stream=config.use_stream, record_stream=config.record_stream,
                               low_cpu_mem_usage=config.low_cpu_mem_usage)
    elif encoder is not None and config.text_encoder == "release":
        release_text_encoder(pipe)  # to keep it (another story), call release_text_encoder first
    done.update(fp8_storage=config.fp8_storage, group_offload=config.group_offload, text_encoder=config.text_encoder)
    free_accelerator_memory()
    return done


def release_models(pipe, names: Sequence[str] = EXPERTS) -> list[str]:
    """Drop the named components from ``pipe`` (e.g. the T2V experts after shot 1), hooks included, and hand
    their accelerator memory back. Returns the names released."""
    released = []
    for name in names:
        model = getattr(pipe, name, None)
        if model is None:
            continue
        _remove_hooks(model)
        setattr(pipe, name, None)
        del model
        released.append(name)
    free_accelerator_memory()
    return released


def _selector_models(selector) -> list[torch.nn.Module]:
    """The keyframe selector's models that are built (lazy ones are skipped)."""
    models = []
    for part in (getattr(selector, "embedder", None), getattr(selector, "scorer", None)):
        for attr in ("_model", "model"):
            model = vars(part).get(attr) if part is not None and hasattr(part, "__dict__") else None
            if isinstance(model, torch.nn.Module):
                models.append(model)
                break
    return models


@contextlib.contextmanager
def keyframe_models_on(selector, device: Union[str, torch.device] = "cuda",
                       offload_device: Union[str, torch.device] = "cpu") -> Iterator:
    """The keyframe selector's models (CLIP, HPSv3) on ``device`` inside the block and on ``offload_device``
    outside, with cached accelerator memory handed back on both sides, so they never sit beside the video
    models. Models the selector builds lazily inside the block are moved out with the others."""
    free_accelerator_memory()
    for model in _selector_models(selector):
        model.to(device)
    try:
        yield selector
    finally:
        for model in _selector_models(selector):
            model.to(offload_device)
        free_accelerator_memory()


# ---------------------------------------------------------------------------------------------- prompts
@dataclass
class PromptEmbeddings:
    """One shot's text embeddings, as the pipeline would have computed them from its prompt."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: Optional[torch.Tensor] = None

    def call_kwargs(self) -> dict:
        """Arguments for the pipeline call (pass them instead of ``prompt`` / ``negative_prompt``)."""
        kwargs = {"prompt_embeds": self.prompt_embeds}
        if self.negative_prompt_embeds is not None:
            kwargs["negative_prompt_embeds"] = self.negative_prompt_embeds
        return kwargs


@contextlib.contextmanager
def _encoder_on(encoder, device: Optional[torch.device]):
    from diffusers.hooks.group_offloading import _get_group_onload_device

    hooked = hasattr(encoder, "_hf_hook")
    try:
        _get_group_onload_device(encoder)
        hooked = True
    except ValueError:
        pass
    home = next(encoder.parameters()).device
    move = device is not None and not hooked and home != device
    if move:
        encoder.to(device)
    try:
        yield
    finally:
        if move:
            encoder.to(home)
            free_accelerator_memory()


@torch.no_grad()
def encode_story_prompts(pipe, prompts: Sequence[str], negative_prompt: Optional[str] = None,
                         guidance: bool = True, max_sequence_length: int = 512,
                         device: Union[str, torch.device, None] = None,
                         encode_device: Union[str, torch.device, None] = None) -> list[PromptEmbeddings]:
    """Encode every shot's prompt once, up front, with the pipeline's own ``encode_prompt``: the embeddings equal
    those the pipeline computes per shot, bit for bit (same function, one prompt at a time). Repeated prompts
    and the negative prompt are encoded once.

    Args:
        negative_prompt: default Wan's (the pipeline's default); only encoded with ``guidance`` (guidance > 1).
        device: where the embeddings go (default: the pipeline's execution device).
        encode_device: where the text encoder runs; moved there for the call and back afterwards (not when
            hooks place it), e.g. the GPU for an encoder kept on the CPU.
    """
    from .defaults import WAN_NEGATIVE_PROMPT

    encoder = getattr(pipe, "text_encoder", None)
    if encoder is None:
        raise ValueError("the pipeline has no text encoder (released?); encode the prompts before releasing it")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings, one per shot")
    device = torch.device(device) if device is not None else pipe._execution_device
    encode_device = torch.device(encode_device) if encode_device is not None else None
    cache: dict[str, torch.Tensor] = {}

    def encode(text: str) -> torch.Tensor:
        if text not in cache:
            cache[text] = pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False,
                                             num_videos_per_prompt=1, max_sequence_length=max_sequence_length,
                                             device=device)[0]
        return cache[text]

    with _encoder_on(encoder, encode_device):
        negative = encode(WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt) if guidance else None
        return [PromptEmbeddings(encode(p), negative) for p in prompts]


# ---------------------------------------------------------------------------------------------- options
@dataclass
class SpeedOptions:
    """The speed and memory options of ``storymem render`` (help text here, one source of truth)."""

    preset: str = option("release", group="speed", choices=tuple(PRESETS),
                         help="sampling preset: release (40 steps, guidance 3.5, UniPC shift 4) or lightning (4 "
                              "steps, guidance 1/1, Euler shift 5, boundary 0.9, for distilled LoRAs); --steps, "
                              "--guidance, --guidance-2, --shift, --sampler, --boundary-ratio override it")
    sampler: Optional[str] = option(None, group="speed", choices=SAMPLERS,
                                    help="sampler of the I2V shots (default: the preset's)")
    boundary_ratio: Optional[float] = option(None, group="speed",
                                             help="high-noise expert for t >= ratio * 1000 (default: the preset's)")
    distill_lora: Optional[str] = option(None, group="speed", metavar="PATH",
                                         help="distilled few-step LoRA for the I2V experts: a folder with "
                                              "high/low-noise .safetensors, HIGH,LOW files, or a hub id")
    distill_lora_scale: float = option(1.0, group="speed", help="scale of --distill-lora")
    distill_lora_skip: list[str] = option(default_factory=list, group="speed", choices=("image", "unapplied"),
                                          help="leave these keys of the distill LoRAs out instead of refusing the "
                                               "file (recorded in the manifest): image (image cross-attention "
                                               "keys, e.g. lightx2v's 1022 LoRAs), unapplied (non-zero diffs "
                                               "diffusers does not apply)")
    t2v_distill_lora: Optional[str] = option(None, group="speed", metavar="PATH",
                                             help="distilled LoRA for the T2V first shot's experts (same forms)")
    t2v_distill_lora_scale: float = option(1.0, group="speed", help="scale of --t2v-distill-lora")
    fuse: bool = option(True, group="speed",
                        help="merge the adapters into the weights at their fixed scales (checked against unfused "
                             "output); --no-fuse keeps them separate (switchable, slower per forward)")
    compile: bool = option(False, group="speed",
                           help="compile each expert's transformer block (dynamic shapes: no recompile when the "
                                "memory count changes); the compile time is reported")
    low_vram: bool = option(False, group="speed",
                            help="fp8 weight storage, block-level group offload on CUDA streams, prompts encoded "
                                 "up front and the text encoder released, tiled VAE, T2V experts released after "
                                 "shot 1, keyframe models on the GPU only while selecting")


def check_speed_options(*, device: Union[str, torch.device, None], preset: str = "release", compile: bool = False,
                        low_vram: bool = False, offload: str = "none", parallel: str = "none", fuse: bool = False,
                        distill_lora: Optional[str] = None, t2v_distill_lora: Optional[str] = None,
                        t2v_model: Optional[str] = None, needs_adapter_off: Optional[str] = None) -> list[str]:
    """Refuse combinations that cannot work, before any model loads: raises ValueError naming the flags.
    Returns warnings for combinations that work but are probably not meant.

    ``needs_adapter_off``: the flag of a setting that switches the adapters off for some shots (e.g.
    ``"--first-shot base"``), which fused adapters cannot do.
    """
    from .devices import resolve_device

    device = resolve_device(device)
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if low_vram and device.type != "cuda":
        raise ValueError(f"--low-vram (fp8 storage, group offload on CUDA streams) needs a CUDA device; --device is "
                         f"{device.type}")
    if low_vram and offload != "none":
        raise ValueError(f"--low-vram with --offload {offload}: two offloading schemes; use one")
    if low_vram and parallel != "none":
        raise ValueError(f"--low-vram with --parallel {parallel}: group offload and context parallelism both decide "
                         "where the experts' weights live; context parallelism keeps each expert whole on each GPU")
    if compile and low_vram:
        raise ValueError("--compile with --low-vram: the offload and fp8-casting hooks are excluded from "
                         "compilation, which breaks the full-graph block compile; use one of them")
    if compile and offload == "sequential":
        raise ValueError("--compile with --offload sequential: sequential offload moves every weight inside the "
                         "compiled blocks; use --offload model or none")
    if fuse and needs_adapter_off:
        raise ValueError(f"--fuse with {needs_adapter_off}: that switches the adapters off for some shots, which "
                         "merged weights cannot do; use --no-fuse")
    if t2v_distill_lora and not t2v_model:
        raise ValueError("--t2v-distill-lora needs --t2v-model (the first shot's T2V experts to load it into)")
    warnings = []
    if preset == "lightning" and not distill_lora:
        warnings.append("--preset lightning without --distill-lora: 4 steps at guidance 1 need a distilled model; "
                        "expect blurred shots")
    if preset == "release" and distill_lora:
        warnings.append("--distill-lora with --preset release: distilled LoRAs are made for few steps at guidance 1 "
                        "(--preset lightning)")
    if t2v_model and distill_lora and not t2v_distill_lora and preset == "lightning":
        warnings.append("--preset lightning with --t2v-model but no --t2v-distill-lora: the first shot runs the "
                        "plain T2V model at 4 steps")
    return warnings
