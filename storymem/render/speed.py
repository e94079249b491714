"""The speed and memory options of a render (``--preset``, ``--distill-lora``, ``--fuse``, ``--compile``,
``--low-vram``), wired into it from :mod:`storymem.acceleration` and :mod:`storymem.distill`.

* before any model loads: the flags checked (:func:`check_speed`), the preset resolved with the sampling flags
  (:func:`sampling_values`), the distill LoRA files checked key by key against the experts' configs
  (:func:`prepare_speed`, which returns the :class:`RenderSpeed` the render carries);
* as a pipeline loads (:func:`setup_pipeline`): the distill LoRA beside the StoryMem adapter, each adapter's
  scale, the preset's scheduler and expert boundary, with ``--low-vram`` every prompt encoded once, fusing,
  placement, compilation;
* while rendering: the prompts' embeddings (:meth:`RenderSpeed.prompt_kwargs`), the StoryMem adapter off for a
  ``--first-shot base`` shot with the distill LoRA kept on (:func:`storymem_adapter_off`), the keyframe models
  on the GPU only while they select (:meth:`RenderSpeed.keyframes_on`), the compile time of the first shot;
* in the manifest: what changes the pixels among the settings (:func:`speed_settings`), the rest under runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..acceleration import (T2V_BOUNDARY_RATIO, CompileStats, LowVramConfig, PromptEmbeddings, SamplingPreset,
                            check_speed_options, compile_experts, compile_stats, enable_low_vram,
                            encode_story_prompts, keyframe_models_on, release_models, resolve_preset)
from ..defaults import BOUNDARY_RATIO, WAN_NEGATIVE_PROMPT
from ..lora_fusion import LoraFusionError
from ..distill import (DISTILL_ADAPTER, EXPERTS, DistillLoraError, DistillLoraFiles, fuse_loras, load_distill_lora,
                       read_expert_configs, resolve_distill_lora, set_lora_scales, validate_distill_lora)
from .models import adapter_disabled, place_pipeline
from .options import RenderError, RenderOptions

__all__ = ["RenderSpeed", "STORYMEM_ADAPTER", "sampling_preset", "sampling_values", "t2v_sampling",
           "fuse_enabled", "check_speed", "prepare_speed", "speed_settings", "fill_legacy_speed_settings",
           "setup_pipeline", "pipeline_record", "adapter_scales", "storymem_adapter_off", "check_given_pipeline",
           "release_t2v"]

STORYMEM_ADAPTER = "storymem"
# Per pipeline stage: the distill LoRA's flag, and the options' fields of its source and scale.
_DISTILL = {"i2v": ("--distill-lora", "distill_lora", "distill_lora_scale"),
            "t2v": ("--t2v-distill-lora", "t2v_distill_lora", "t2v_distill_lora_scale")}


# ---------------------------------------------------------------------------------------------- sampling
def sampling_preset(options: RenderOptions) -> SamplingPreset:
    """The ``--preset`` with the sampling flags given: ``--steps`` (both stages), ``--guidance``, ``--guidance-2``
    (default ``--guidance`` when that is given), ``--shift``, ``--sampler``, ``--boundary-ratio``, ``--t2v-*``.
    Built-in bases keep their own steps and shift under ``release``; other presets' values hold for every base."""
    from ..builtin import BUILTIN_SAMPLING, is_builtin

    o = options
    own = is_builtin(o.base) and o.preset == "release"
    steps = o.steps if o.steps is not None else (BUILTIN_SAMPLING["steps"] if own else None)
    shift = o.shift if o.shift is not None else (BUILTIN_SAMPLING["shift"] if own else None)
    try:
        return resolve_preset(o.preset, steps=steps, t2v_steps=steps, guidance=o.guidance,
                              guidance_2=o.guidance if o.guidance_2 is None else o.guidance_2, shift=shift,
                              sampler=o.sampler, boundary_ratio=o.boundary_ratio, t2v_shift=o.t2v_shift,
                              t2v_guidance=o.t2v_guidance, t2v_guidance_2=o.t2v_guidance_2)
    except ValueError as err:
        raise RenderError(str(err)) from None


def sampling_values(options: RenderOptions) -> dict:
    """The options' automatic sampling fields as the preset decides them (for :meth:`RenderOptions.resolved`)."""
    p = sampling_preset(options)
    return dict(steps=p.steps, guidance=p.guidance, guidance_2=p.guidance_2, shift=p.shift, sampler=p.sampler,
                boundary_ratio=p.boundary_ratio, t2v_shift=p.t2v_shift, t2v_guidance=p.t2v_guidance,
                t2v_guidance_2=p.t2v_guidance_2)


def t2v_sampling(options: RenderOptions) -> dict:
    """The T2V first shot's steps, sampler and expert boundary (the manifest's ``settings.t2v`` besides its
    shift and guidance)."""
    p = sampling_preset(options)
    return {"steps": p.t2v_steps, "sampler": p.t2v_sampler, "boundary_ratio": p.t2v_boundary_ratio}


# ---------------------------------------------------------------------------------------------- checks
def _adapter_switched_off(o: RenderOptions) -> Optional[str]:
    """The flag that switches the StoryMem adapter off for some shot (which merged weights cannot do)."""
    return "--first-shot base" if o.first_shot == "base" and o.lora else None


def fuse_enabled(options: RenderOptions) -> bool:
    """Whether the render merges its adapters into the weights: ``--fuse``/``--no-fuse``, by default wherever
    no adapter is switched off for a shot; False when there is nothing to merge."""
    o = options
    adapters = bool(o.lora or o.distill_lora or (o.t2v_model and o.t2v_distill_lora))
    wanted = _adapter_switched_off(o) is None if o.fuse is None else bool(o.fuse)
    return adapters and wanted


def check_speed(options: RenderOptions) -> list[str]:
    """Refuse speed flags that cannot work (resolved options, no file read); returns the warnings for
    combinations that work but are probably not meant."""
    o = options
    for flag, source, scale in _DISTILL.values():
        value = getattr(o, scale)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise RenderError(f"{flag}-scale {value}: must be a finite number >= 0")
        if value != 1.0 and not getattr(o, source):
            raise RenderError(f"{flag}-scale {value}: there is no {flag} to scale")
    if o.distill_lora_skip and not (o.distill_lora or o.t2v_distill_lora):
        raise RenderError("--distill-lora-skip: there is no --distill-lora or --t2v-distill-lora")
    try:
        return check_speed_options(device=o.device, preset=o.preset, compile=o.compile, low_vram=o.low_vram,
                                   offload=o.offload, parallel=o.parallel, fuse=bool(o.fuse),
                                   distill_lora=o.distill_lora, t2v_distill_lora=o.t2v_distill_lora,
                                   t2v_model=o.t2v_model, needs_adapter_off=_adapter_switched_off(o))
    except ValueError as err:
        raise RenderError(str(err)) from None


# ---------------------------------------------------------------------------------------------- distill files
_CONFIGS: dict[str, dict] = {}
_DIGESTS: dict[tuple, str] = {}
_VALIDATED: set[tuple] = set()  # distill LoRA files (path, size, mtime) found fit for configs and skip list


def _expert_configs(model: str, flag: str) -> dict:
    """The experts' configs of ``model`` (read once per process: a built-in base is built for them)."""
    if model not in _CONFIGS:
        try:
            _CONFIGS[model] = read_expert_configs(model)
        except DistillLoraError as err:
            raise RenderError(f"{flag}: {err}") from None
    return _CONFIGS[model]


def _digest(path: Path) -> str:
    """sha256 of a file, computed once per version of it (distill LoRAs weigh gigabytes)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _validate(files: DistillLoraFiles, configs: dict, skip, flag: str):
    """The cleaned distill LoRA of ``files`` (every key checked); a RenderError naming flag, file and key."""
    try:
        lora = validate_distill_lora(files, configs, skip)
    except DistillLoraError as err:
        raise RenderError(f"{flag}: {err}") from None
    _VALIDATED.add(_validation_key(files, configs, skip))
    return lora


def _validation_key(files: DistillLoraFiles, configs: dict, skip) -> tuple:
    stats = tuple((e, str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns)
                  for e, p in sorted(files.files.items()))
    return stats, json.dumps(configs, sort_keys=True, default=str), tuple(sorted(skip))


def _distill_record(o: RenderOptions, stage: str) -> Optional[dict]:
    flag, source_field, scale_field = _DISTILL[stage]
    source = getattr(o, source_field)
    if not source:
        return None
    model = o.base if stage == "i2v" else o.t2v_model
    try:
        files = resolve_distill_lora(source, tuple(_expert_configs(model, flag))).files
    except DistillLoraError as err:
        raise RenderError(f"{flag}: {err}") from None
    return {"source": str(source), "scale": getattr(o, scale_field), "skip": sorted(o.distill_lora_skip),
            "files": {e: {"path": str(Path(p).resolve()), "sha256": _digest(Path(p))} for e, p in files.items()}}


def speed_settings(options: RenderOptions) -> dict:
    """The speed settings that change the pixels, as the manifest records them (compared on resume): the
    preset and its sampler and boundary, each distill LoRA by its files' content with scale and skipped keys,
    whether the adapters are fused, and ``--low-vram``, whose fp8 weight storage and tiled VAE decoding change
    the pixels a little (a story half rendered so would not say which half). Steps, guidance and shift are
    recorded with the other settings; ``--compile`` is not (its kernels round like another attention backend)."""
    o = options
    return {"preset": o.preset, "sampler": o.sampler, "boundary_ratio": o.boundary_ratio,
            "distill_lora": _distill_record(o, "i2v"), "t2v_distill_lora": _distill_record(o, "t2v"),
            "fuse": fuse_enabled(o), "low_vram": o.low_vram}


def fill_legacy_speed_settings(manifest: dict) -> dict:
    """A manifest written before the speed settings were recorded, given the values its render had: the release's
    sampling (UniPC, the Wan2.2 expert boundaries), no distill LoRA, adapters unfused, no fp8 storage. Changed in
    place."""
    settings = manifest.get("settings")
    if not isinstance(settings, dict) or "preset" in settings:
        return manifest
    settings.update(preset="release", sampler="unipc", boundary_ratio=BOUNDARY_RATIO, distill_lora=None,
                    t2v_distill_lora=None, fuse=False, low_vram=False)
    t2v = settings.get("t2v")
    if isinstance(t2v, dict):
        t2v.setdefault("steps", settings.get("steps"))
        t2v.setdefault("sampler", "unipc")
        t2v.setdefault("boundary_ratio", T2V_BOUNDARY_RATIO)
    return manifest


# ---------------------------------------------------------------------------------------------- the render's state
@dataclass
class RenderSpeed:
    """A render's speed options, worked out before any model loads, and what they did since."""

    preset: SamplingPreset
    fuse: bool
    # Per stage ("i2v", "t2v"): the distill LoRA's files (validated) and its experts' configs. The tensors are
    # read again when it loads, so plans (a batch prepares many) hold no gigabytes.
    distill: dict[str, tuple[DistillLoraFiles, dict]]
    warnings: list[str] = field(default_factory=list)
    embeddings: dict[str, PromptEmbeddings] = field(default_factory=dict)  # --low-vram: prompt -> embeddings
    report: dict = field(default_factory=dict)  # per stage: what setup_pipeline did
    compiled: dict = field(default_factory=dict)  # per stage: compile seconds and graphs of its first call
    _after_first_calls: Optional[CompileStats] = None

    def prompt_kwargs(self, prompt: str, negative_prompt: Optional[str]) -> dict:
        """The prompt arguments of a pipeline call: the embeddings encoded up front, else the text."""
        embeddings = self.embeddings.get(prompt)
        if embeddings is None:
            return {"prompt": prompt, "negative_prompt": negative_prompt}
        return embeddings.call_kwargs()

    def keyframes_on(self, selector, options: RenderOptions, device):
        """With ``--low-vram`` the keyframe models on ``device`` only inside the block."""
        return keyframe_models_on(selector, device) if options.low_vram and selector is not None \
            else contextlib.nullcontext(selector)

    @contextlib.contextmanager
    def compile_clock(self, stage: str, options: RenderOptions):
        """With ``--compile``: the compile time and graphs of the first call of ``stage``'s pipeline."""
        if not options.compile or stage in self.compiled:
            yield
            return
        before = compile_stats()
        yield
        self._after_first_calls = compile_stats()
        spent = self._after_first_calls - before
        self.compiled[stage] = {"s": round(spent.seconds, 3), "graphs": spent.graphs}

    def timings(self) -> dict:
        """For the manifest's timings: compile seconds of the first calls, graphs compiled since (recompiles)."""
        if not self.compiled:
            return {}
        return {"compile_s": round(sum(c["s"] for c in self.compiled.values()), 3),
                "recompiles": (compile_stats() - self._after_first_calls).graphs}

    def runtime_record(self, options: RenderOptions, pipe=None) -> dict:
        """For the manifest's runtime (not compared on resume)."""
        return {"preset": self.preset.to_dict(), "compile": options.compile, "low_vram": options.low_vram,
                "fuse": self.fuse, "stages": self.report, "compiled": self.compiled,
                "pipeline": getattr(pipe, "storymem_speed", None), "warnings": self.warnings}


def prepare_speed(options: RenderOptions) -> RenderSpeed:
    """Everything the speed options need before a model loads: the flags checked (warnings issued), the preset
    resolved, each distill LoRA's files found and checked key by key against its experts' configs. A bad one is
    a :class:`RenderError` naming flag, file and key."""
    o = options.resolved()
    notes = check_speed(o)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    distill = {}
    for stage, (flag, source_field, _) in _DISTILL.items():
        source = getattr(o, source_field)
        if source:
            configs = _expert_configs(o.base if stage == "i2v" else o.t2v_model, flag)
            try:
                files = resolve_distill_lora(source, tuple(configs))
            except DistillLoraError as err:
                raise RenderError(f"{flag}: {err}") from None
            if _validation_key(files, configs, o.distill_lora_skip) not in _VALIDATED:  # read once per version
                _validate(files, configs, o.distill_lora_skip, flag)
            distill[stage] = (files, configs)
    return RenderSpeed(preset=sampling_preset(o), fuse=fuse_enabled(o), distill=distill, warnings=notes)


# ---------------------------------------------------------------------------------------------- pipelines
def _loaded_adapters(pipe) -> set[str]:
    names = set()
    for expert in EXPERTS:
        names |= set(getattr(getattr(pipe, expert, None), "peft_config", None) or {})
    return names


def adapter_scales(pipe, options: RenderOptions, stage: str = "i2v") -> dict[str, float]:
    """The scale of each adapter loaded into ``pipe``: ``--lora-scale`` for the StoryMem adapter, the distill
    LoRA's scale for it."""
    loaded, scales = _loaded_adapters(pipe), {}
    if stage == "i2v" and STORYMEM_ADAPTER in loaded:
        scales[STORYMEM_ADAPTER] = options.lora_scale
    if DISTILL_ADAPTER in loaded:
        scales[DISTILL_ADAPTER] = getattr(options, _DISTILL[stage][2])
    return scales


def pipeline_record(o: RenderOptions) -> dict:
    """The adapter settings :func:`setup_pipeline` builds into an I2V pipeline (kept on it as ``storymem_speed``):
    a pipeline handed to a render must have the render's; callers caching pipelines can key them by it."""
    return {"lora": o.lora, "lora_scale": o.lora_scale, "distill_lora": o.distill_lora,
            "distill_lora_scale": o.distill_lora_scale, "distill_lora_skip": sorted(o.distill_lora_skip),
            "fuse": fuse_enabled(o)}


def _encode_prompts(pipe, o: RenderOptions, speed: RenderSpeed, prompts, device) -> None:
    todo = list(dict.fromkeys(p for p in prompts if p not in speed.embeddings))
    if not todo:
        return
    negative = WAN_NEGATIVE_PROMPT if o.negative_prompt is None else o.negative_prompt
    # Wan's pipelines guide (and need the negative prompt) when the high-noise guidance exceeds 1.
    guidance = speed.preset.guidance > 1 or bool(o.t2v_model and speed.preset.t2v_guidance > 1)
    encoded = encode_story_prompts(pipe, todo, negative, guidance=guidance, device=device, encode_device=device)
    speed.embeddings.update(zip(todo, encoded))


def _low_vram_config(device, stage: str, encoded: bool) -> LowVramConfig:
    # The T2V pipeline hands its text encoder on to the I2V one; a pipeline loaded without the story's prompts
    # keeps it, offloaded leaf by leaf, for whatever it is asked to render.
    text_encoder = "keep" if stage == "t2v" else ("release" if encoded else "leaf")
    return LowVramConfig(use_stream=device.type == "cuda", text_encoder=text_encoder)


def _fuse(pipe, device, stage: str) -> dict:
    try:
        report = fuse_loras(pipe, device=device)
    except LoraFusionError as err:
        raise RenderError(f"--fuse ({stage}): {err}; --no-fuse renders with the adapters unmerged") from None
    return {"adapters": report.adapters, "relative_error": report.relative_error, "tolerance": report.tolerance}


def setup_pipeline(pipe, options: RenderOptions, speed: RenderSpeed, device, stage: str = "i2v",
                   prompts: Optional[list[str]] = None):
    """Apply the speed options to a freshly loaded pipeline of ``stage`` ("i2v", or "t2v" for the first shot's
    Wan2.2-T2V), whose StoryMem adapter (if any) is loaded, and place it on ``device``. In this order: the
    distill LoRA beside the adapter, every adapter's scale, the preset's scheduler and expert boundary, with
    ``--low-vram`` the ``prompts`` encoded once (the text encoder is then released), fusing, placement (low-VRAM,
    ``--offload`` or moved), compilation. Returns the pipeline."""
    import torch

    o, device = options, torch.device(device)
    report = speed.report.setdefault(stage, {})
    if stage in speed.distill:
        files, configs = speed.distill[stage]
        lora = _validate(files, configs, o.distill_lora_skip, _DISTILL[stage][0])  # the tensors, checked again
        try:
            load_distill_lora(pipe, lora)
        except DistillLoraError as err:
            raise RenderError(f"{_DISTILL[stage][0]}: {err}") from None
        report["distill_lora"] = lora.summary()
    scales = adapter_scales(pipe, o, stage)
    if scales:
        set_lora_scales(pipe, scales)  # replaces set_adapter_scale, which would switch a distill LoRA off
    report["scales"] = scales
    speed.preset.apply(pipe, stage)
    if o.low_vram and prompts is not None:
        _encode_prompts(pipe, o, speed, prompts, device)
    fuse = speed.fuse and bool(scales)
    # Weights that stay on the CPU are merged on the accelerator one layer at a time; placed ones where they are.
    fuse_first = o.low_vram or o.offload != "none"
    if fuse and fuse_first:
        report["fused"] = _fuse(pipe, device if device.type != "cpu" else None, stage)
    if o.low_vram:
        config = _low_vram_config(device, stage, encoded=prompts is not None)
        report["low_vram"] = enable_low_vram(pipe, device, config)
    else:
        place_pipeline(pipe, o, str(device))
    if fuse and not fuse_first:
        report["fused"] = _fuse(pipe, None, stage)
    if o.compile:
        report["compiled"] = compile_experts(pipe)
    if stage == "i2v":
        pipe.storymem_speed = pipeline_record(o)
    return pipe


@contextlib.contextmanager
def storymem_adapter_off(pipe, options: RenderOptions):
    """The StoryMem adapter switched off (shot 1 with ``--first-shot base``); a distill LoRA stays on at its
    scale, as the base it stands for is the distilled one."""
    scales = adapter_scales(pipe, options)
    if DISTILL_ADAPTER not in scales:
        with adapter_disabled(pipe):
            yield pipe
        return
    set_lora_scales(pipe, {n: s for n, s in scales.items() if n != STORYMEM_ADAPTER})
    try:
        yield pipe
    finally:
        set_lora_scales(pipe, scales)


def check_given_pipeline(pipe, options: RenderOptions) -> None:
    """Refuse a pipeline handed to a render that was loaded with other adapter settings than the options'
    (adapters, their scales, fusing): the manifest would record settings the pixels do not have."""
    record = getattr(pipe, "storymem_speed", None)
    if record is None:  # built by the caller: only a missing distill LoRA is certain
        if options.distill_lora and DISTILL_ADAPTER not in _loaded_adapters(pipe):
            raise RenderError("--distill-lora: the given pipeline has no distill LoRA; load it with "
                              "storymem.render.load_render_pipeline(options)")
        return
    wanted = pipeline_record(options)
    diffs = [f"{k}: {json.dumps(record.get(k))} -> {json.dumps(v)}" for k, v in wanted.items() if record.get(k) != v]
    if diffs:
        raise RenderError("the given pipeline was loaded with other settings (" + "; ".join(diffs) + "); load one "
                          "for these options with storymem.render.load_render_pipeline(options)")


def release_t2v(t2v) -> None:
    """Drop the T2V pipeline's experts after shot 1 (hooks too), handing their accelerator memory back."""
    release_models(t2v)
