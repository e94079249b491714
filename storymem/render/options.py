"""The options of a render: one dataclass whose fields carry their command-line help, the one method that decides
the automatic ones, the settings a resumed render must match, and their validation.

Fields of None are automatic and decided by :meth:`RenderOptions.resolved` from the base: the published
release's defaults (``storymem.defaults``) for Wan2.2, the built-in models' own (``BUILTIN_SAMPLING``) for
``toy``/``tiny``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..acceleration import SpeedOptions
from ..arguments import option
from ..defaults import (
    AREA,
    FLOW_SHIFT,
    FPS,
    FRAMES,
    GUIDANCE,
    HEIGHT,
    KEYFRAME_THRESHOLD,
    MAX_MEMORY,
    MOTION_FRAMES,
    SINK,
    STEPS,
    T2V_FLOW_SHIFT,
    T2V_GUIDANCE,
    T2V_GUIDANCE_2,
    WAN_I2V_BASE,
    WIDTH,
)

__all__ = ["RenderError", "RenderOptions", "GROUP_TITLES", "FIRST_SHOTS", "MEMORY_SOURCES", "CONTINUATIONS",
           "shot_seed", "file_record", "looks_local", "latent_frames", "check_model_capacity"]

# How shot 1 starts when no T2V model, first image or reference images are given: M2V on an empty memory
# (through the adapter), or the base alone with the adapter switched off ("base": for bases that generate from
# text themselves, like the small world's, it plays the part Wan2.2-T2V-A14B plays for the real model).
FIRST_SHOTS = ("m2v", "base")
# What the memory bank receives after each shot: the selected keyframes (the release), the shot's first frame
# only, or nothing (every shot is generated without memory).
MEMORY_SOURCES = ("keyframes", "first-frame", "none")
# How a cut:false shot continues the previous one; "none": it does not (it starts from text and memory).
CONTINUATIONS = ("auto", "mi2v", "mm2v", "none")

# Defaults that depend on the base: the release's for Wan2.2 (negative prompt None = Wan's). Steps, guidance,
# shift and sampler come from --preset (storymem.render.speed.sampling_preset).
_RELEASE_SAMPLING = dict(area=AREA, frames=FRAMES, embedder="ViT-B-32:openai", aesthetic="hpsv3",
                         negative_prompt=None)

GROUP_TITLES = {"output": "output and resume", "models": "models", "first": "shot 1", "sampling": "sampling",
                "memory": "memory", "speed": "speed and memory"}


def _speed_option(name: str, **changes):
    """The field ``name`` of :class:`storymem.acceleration.SpeedOptions` (its default, help and choices: one source
    of truth) as a field of the render's options; ``changes`` replace some of it."""
    field = SpeedOptions.__dataclass_fields__[name]
    meta = field.metadata
    kwargs = dict(help=meta["help"], group=meta["group"], choices=meta["choices"], metavar=meta["metavar"])
    if field.default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = field.default_factory
    else:
        kwargs["default"] = field.default
    kwargs.update(changes)
    default = kwargs.pop("default", dataclasses.MISSING)
    return option(default, **kwargs)


class RenderError(ValueError):
    """Bad render input (story, images, flags, output folder) or an output folder that cannot be resumed."""


@dataclass
class RenderOptions:
    """Everything a render needs besides the story; the command line is generated from these fields.

    Defaults are the M2V release's. Fields of None are decided by :meth:`resolved` (every render resolves its
    options first): ``height``/``width`` from ``area`` and the aspect ratio of the conditioning image (first
    image or first reference image; 480x832 landscape without one); sampling defaults from the base.
    """

    # ------------------------------------------------------------------ output and resume
    out_dir: Optional[Path] = option(
        None, flag="--out", group="output", metavar="DIR",
        help="output folder (default: outputs/<story file name>, or storymem_demo for --demo)")
    from_shot: Optional[str] = option(
        None, group="output", metavar="SHOT",
        help="re-render from this shot on (number 1..N or file stem like 02_01), restoring the memory saved after "
             "the previous shot")
    force: bool = option(False, group="output",
                         help="start over even if the folder holds a render with other settings")
    progress: bool = option(True, group="output", help="progress bars (--no-progress: none)")

    # ------------------------------------------------------------------ models
    base: Optional[str] = option(
        None, group="models",
        help=f"Wan2.2-I2V diffusers folder or hub id; 'toy' (the small world's trained model) or 'tiny' (random "
             f"weights, smoke runs) (default: {WAN_I2V_BASE}; toy with --demo)")
    lora: Optional[str] = option(
        None, group="models",
        help="StoryMem adapter: storymem adapter folder, published Wan2.2-MI2V-A14B / Wan2.2-MM2V-A14B folder, hub "
             "id, or 'toy' (the small world's adapter; the default with --demo)")
    lora_scale: float = option(1.0, group="models",
                               help="weight of the adapter's LoRA layers (1: as trained; 0: the base alone)")
    t2v_model: Optional[str] = option(None, group="models",
                                      help="Wan2.2-T2V-A14B diffusers folder or hub id for the first shot")
    dtype: str = option("auto", group="models", choices=("auto", "float32", "bfloat16", "float16"),
                        help="model dtype (auto: bfloat16 on a GPU, float32 on the CPU and for the built-in "
                             "models); the VAE runs in float32")
    device: Optional[str] = option(None, group="models",
                                   help="torch device (default: cuda if available, else cpu; cpu with --demo)")
    offload: str = option("none", group="models", choices=("none", "model", "sequential"),
                          help="diffusers CPU offload: model (enable_model_cpu_offload) or sequential")
    parallel: str = option("none", group="models", choices=("none", "ulysses", "ring"),
                           help="context parallelism over the GPUs of a torchrun launch")
    attention_backend: Optional[str] = option(
        None, group="models",
        help="diffusers attention backend (e.g. _native_cudnn, flash); ring attention defaults to _native_cudnn")

    # ------------------------------------------------------------------ shot 1
    first_shot: str = option(
        "m2v", group="first", choices=FIRST_SHOTS,
        help="without --t2v-model, --first-image or --reference-images: M2V on an empty memory, or 'base': the "
             "base alone, adapter off (for bases that draw from text, like --base toy)")
    first_image: Optional[Path] = option(None, group="first", help="start shot 1 from this image (plain I2V)")
    reference_images: list[Path] = option(default_factory=list, group="first", metavar="IMAGE",
                                          help="MR2V: images that seed the memory; shot 1 is M2V on them")

    # ------------------------------------------------------------------ sampling
    height: Optional[int] = option(
        None, group="sampling",
        help="frame height, multiple of 16 (default: from --area and the conditioning image's aspect ratio; "
             "64 for the built-in models)")
    width: Optional[int] = option(None, group="sampling", help="frame width, multiple of 16 (default: as --height)")
    area: Optional[int] = option(None, group="sampling",
                                 help=f"pixel area for the automatic size (default: {WIDTH}*{HEIGHT}; built-in models 64*64)")
    frames: Optional[int] = option(None, group="sampling",
                                   help=f"frames per shot, 4n+1 (default: {FRAMES}; built-in models 17)")
    fps: int = option(FPS, group="sampling", help="frame rate of the videos written")
    steps: Optional[int] = option(None, group="sampling",
                                  help=f"denoising steps, of the T2V first shot too (default: the --preset's: "
                                       f"{STEPS} release, 4 lightning; built-in models 8 with release)")
    guidance: Optional[float] = option(None, group="sampling",
                                       help=f"classifier-free guidance, high-noise expert (default: the --preset's: "
                                            f"{GUIDANCE} release, 1 lightning)")
    guidance_2: Optional[float] = option(None, group="sampling",
                                         help="guidance of the low-noise expert (default: --guidance if given, "
                                              "else the --preset's)")
    memory_guidance: float = option(
        1.0, group="sampling",
        help="guidance towards the memory frames (1 = off; above 1 one more model call per step)")
    shift: Optional[float] = option(None, group="sampling",
                                    help=f"flow shift of the sampler (default: the --preset's: {FLOW_SHIFT} release, "
                                         f"5.0 lightning; built-in models 3.0 with release)")
    negative_prompt: Optional[str] = option(
        None, group="sampling",
        help="negative prompt (default: Wan's; built-in models: the empty prompt); pass '' for none")
    t2v_shift: Optional[float] = option(None, group="sampling",
                                        help=f"flow shift of the T2V model (default: the --preset's: "
                                             f"{T2V_FLOW_SHIFT} release, 5.0 lightning)")
    t2v_guidance: Optional[float] = option(None, group="sampling",
                                           help=f"T2V guidance, high-noise expert (default: the --preset's: "
                                                f"{T2V_GUIDANCE} release, 1 lightning)")
    t2v_guidance_2: Optional[float] = option(None, group="sampling",
                                             help=f"T2V guidance, low-noise expert (default: the --preset's: "
                                                  f"{T2V_GUIDANCE_2} release, 1 lightning)")
    seed: int = option(0, group="sampling", help="base seed; a shot's seed is derived from it (see --seed-mode)")
    seed_mode: str = option(
        "global", group="sampling", choices=("global", "scene"),
        help="shot seed = seed + global shot index, or + index within the scene (the release's quirk)")

    # ------------------------------------------------------------------ memory
    max_memory: int = option(MAX_MEMORY, group="memory", help="memory frames a shot sees at most")
    sink: int = option(SINK, group="memory", help="oldest memory frames always kept")
    memory_rope: Optional[str] = option(
        None, group="memory", choices=("negative", "contiguous"),
        help="time positions of the memory frames (default: the adapter's, recorded in its metadata)")
    continuation: str = option(
        "auto", group="memory", choices=CONTINUATIONS,
        help="how a cut:false shot continues the previous one (auto: the adapter's conditioning; none: it starts "
             "from its prompt and the memory, like a cut)")
    memory_source: str = option(
        "keyframes", group="memory", choices=MEMORY_SOURCES,
        help="what the memory bank receives after each shot: the selected keyframes, only the shot's first "
             "frame, or nothing (every shot without memory)")
    memory_retrieval: str = option(
        "window", group="memory", choices=("window", "prompt"),
        help="which remembered frames a shot sees: the sink + sliding window (the release), or 'prompt': the "
             "frames whose take (shot + the shots it continues) reads most like the shot's text (TF-IDF over the "
             "story's prompts)")
    memory_min_relevance: float = option(
        0.0, group="memory",
        help="with --memory-retrieval prompt: leave out takes whose relevance (cosine) is below this")
    memory_relative_relevance: float = option(
        0.0, group="memory",
        help="with --memory-retrieval prompt: leave out takes below this share of the best take's relevance "
             "(e.g. 0.8 keeps another character's shots out of memory)")
    embedder: Optional[str] = option(
        None, group="memory",
        help="keyframe similarity: open_clip 'MODEL:TAG' or 'MODEL:CHECKPOINT', a local checkpoint (ViT-B-32), "
             "'hf-hub:...', or 'pixel' (default: ViT-B-32:openai; built-in models: pixel)")
    aesthetic: Optional[str] = option(
        None, group="memory", choices=("hpsv3", "none"),
        help="keyframe quality filter (default: hpsv3; built-in models: none)")
    hpsv3_checkpoint: Optional[str] = option(
        None, group="memory", help="HPSv3.safetensors file/folder or hub id (default: MizzenAI/HPSv3)")
    hpsv3_base: Optional[str] = option(None, group="memory",
                                       help="Qwen2-VL-7B-Instruct folder or hub id for HPSv3")
    keyframe_threshold: float = option(KEYFRAME_THRESHOLD, group="memory",
                                       help="initial CLIP similarity threshold of the keyframe rule")

    # ------------------------------------------------------------------ speed and memory (storymem.render.speed)
    preset: str = _speed_option("preset")
    sampler: Optional[str] = _speed_option("sampler")
    boundary_ratio: Optional[float] = _speed_option("boundary_ratio")
    distill_lora: Optional[str] = _speed_option("distill_lora")
    distill_lora_scale: float = _speed_option("distill_lora_scale")
    distill_lora_skip: list[str] = _speed_option("distill_lora_skip")
    t2v_distill_lora: Optional[str] = _speed_option("t2v_distill_lora")
    t2v_distill_lora_scale: float = _speed_option("t2v_distill_lora_scale")
    fuse: Optional[bool] = _speed_option(
        "fuse", default=None,
        help=SpeedOptions.__dataclass_fields__["fuse"].metadata["help"] + " (default: fused, except with "
             "--first-shot base and an adapter, which is switched off for shot 1)")
    compile: bool = _speed_option("compile")
    low_vram: bool = _speed_option("low_vram")

    # ------------------------------------------------------------------ automatic fields
    @property
    def is_builtin(self) -> bool:
        """A built-in CPU-sized model: the small world's trained base ("toy") or random weights ("tiny")."""
        from ..builtin import is_builtin

        return is_builtin(self.base)

    def resolved(self) -> "RenderOptions":
        """A copy with every automatic field decided (idempotent): the base, the sampling defaults of the base
        (built-in models: ``BUILTIN_SAMPLING``, a 64x64 square unless a size or area is given), the device, the
        dtype, the low-noise guidance and the output folder. The size from a conditioning image's aspect ratio is
        left to :func:`~storymem.render.prepare`, which reads the image. Steps, guidance, shift and sampler are
        the ``--preset``'s unless given (:func:`~storymem.render.speed.sampling_values`)."""
        from ..builtin import BUILTIN_SAMPLING, is_builtin
        from .speed import sampling_values

        self._check_texts()  # before None means "automatic": an empty name must not become the default
        self._check_numbers()  # before the preset fills in what was not given
        base = WAN_I2V_BASE if self.base is None else self.base
        builtin = is_builtin(base)
        auto = BUILTIN_SAMPLING if builtin else _RELEASE_SAMPLING
        changes = {k: auto[k] for k in _RELEASE_SAMPLING if getattr(self, k) is None}
        if builtin and self.height is None and self.width is None and self.area is None:
            changes.update(height=BUILTIN_SAMPLING["height"], width=BUILTIN_SAMPLING["width"])
        device = self._resolved_device()
        changes.update(base=base, device=device, dtype=self._resolved_dtype(device, builtin),
                       out_dir=Path(self.out_dir) if self.out_dir is not None else Path("outputs") / "story")
        changes.update(sampling_values(dataclasses.replace(self, base=base)))
        resolved = dataclasses.replace(self, **changes)
        # numpy's numbers (a sweep's values) as Python's, so the settings record as JSON; others stay for validate().
        for names, kind, cast in ((_INTEGER_RANGES, numbers.Integral, int), (_REAL_RANGES, numbers.Real, float)):
            for name in names:
                value = getattr(resolved, name)
                if isinstance(value, kind) and not isinstance(value, bool):
                    setattr(resolved, name, cast(value))
        return resolved

    def _resolved_device(self) -> str:
        from ..devices import resolve_device

        try:
            return str(resolve_device(self.device))
        except (RuntimeError, ValueError):
            raise RenderError(f"--device {self.device!r}: not a torch device") from None

    def _resolved_dtype(self, device: str, builtin: bool) -> str:
        from ..devices import resolve_dtype_name

        try:
            return resolve_dtype_name(self.dtype, device, builtin=builtin)
        except ValueError as err:
            raise RenderError(f"--dtype: {err}") from None

    # ------------------------------------------------------------------ recorded settings
    def settings(self) -> dict:
        """The options that decide the pixels, as JSON values: what a resumed render must match. Every field
        is recorded (automatic ones as decided). The memory RoPE mode is recorded per shot, not here: it
        may come from the adapter, known only once it loads. The speed options that change the pixels are recorded
        (preset, sampler, distill LoRAs by content, fusing, ``--low-vram``'s fp8 storage); ``--compile`` is not."""
        from .speed import speed_settings, t2v_sampling

        o = self.resolved()
        return {
            "base": o.base,
            "lora": o.lora,
            "lora_scale": o.lora_scale,
            "t2v_model": o.t2v_model,
            "first_image": file_record(o.first_image),
            "reference_images": [file_record(p) for p in o.reference_images],
            "first_shot": o.first_shot,
            "dtype": o.dtype,
            "height": o.height,
            "width": o.width,
            "frames": o.frames,
            "fps": o.fps,
            "steps": o.steps,
            "guidance": o.guidance,
            "guidance_2": o.guidance_2,
            "shift": o.shift,
            "memory_guidance": o.memory_guidance,
            "negative_prompt": o.negative_prompt,
            "t2v": None if not o.t2v_model else {
                "shift": o.t2v_shift, "guidance": o.t2v_guidance, "guidance_2": o.t2v_guidance_2, **t2v_sampling(o)},
            "seed": o.seed,
            "seed_mode": o.seed_mode,
            "max_memory": o.max_memory,
            "sink": o.sink,
            "continuation": o.continuation,
            "memory_source": o.memory_source,
            "memory_retrieval": {"mode": o.memory_retrieval, "min_relevance": o.memory_min_relevance,
                                 "relative_relevance": o.memory_relative_relevance},
            "embedder": o.embedder,
            "aesthetic": o.aesthetic,
            "hpsv3_checkpoint": o.hpsv3_checkpoint if o.aesthetic == "hpsv3" else None,
            "keyframe_threshold": o.keyframe_threshold,
            **speed_settings(o),
        }

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check flag values and combinations of resolved options (no file is read, nothing loads); a bad one
        is a :class:`RenderError` naming the flag. Every number is checked against its real range: nothing out
        of range is replaced by a default. What depends on the model (the RoPE table) is checked by
        :func:`check_model_capacity`."""
        self._check_texts()
        self._check_numbers()
        self._check_choices()
        self._check_sampling()
        self._check_memory()
        self._check_sources()
        self._check_speed()
        self._check_placement()

    def _check_texts(self) -> None:
        for name in _NAMES:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise RenderError(f"{_flag(name)} {value!r}: must be a non-empty name (leave the flag out for "
                                  "the default)")
        shot = self.from_shot
        if shot is not None and (isinstance(shot, bool) or not isinstance(shot, (str, int))
                                 or isinstance(shot, str) and not shot.strip()):
            raise RenderError(f"--from-shot {shot!r}: expected a shot number or a file stem such as 02_01")

    def _check_numbers(self) -> None:
        """Types and ranges of the numeric options that do not depend on each other or on the model."""
        for name, (low, high, hint) in _INTEGER_RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise RenderError(f"{_flag(name)} {value!r}: must be a whole number")
            if value < low or (high is not None and value > high):
                upper = f" and at most {high}" if high is not None else ""
                raise RenderError(f"{_flag(name)} {value}: must be at least {low}{upper}{hint}")
        for name, (low, high, hint) in _REAL_RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RenderError(f"{_flag(name)} {value!r}: must be a finite number")
            if (low is not None and value < low) or (high is not None and value > high) or \
                    (name in _POSITIVE and value <= 0):
                raise RenderError(f"{_flag(name)} {value}: must be {hint}")

    def _check_choices(self) -> None:
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            for item in (value if isinstance(value, (list, tuple)) else [value]):
                if choices and item is not None and item not in choices:
                    raise RenderError(f"{_flag(f.name)} {item!r}: must be one of {', '.join(choices)}")

    def _check_sampling(self) -> None:
        o = self
        if (o.frames - 1) % 4:
            raise RenderError(f"--frames {o.frames}: must be of the form 4n+1 and at least 5 (e.g. {FRAMES})")
        for name in ("height", "width"):
            value = getattr(o, name)
            if value is not None and value % 16:
                raise RenderError(f"--{name} {value}: must be a positive multiple of 16")
        if (o.height is None) != (o.width is None):
            raise RenderError("give both --height and --width, or neither (then the size comes from the area and "
                              "the conditioning image's aspect ratio)")
        # The pipelines guide by the text only above 1 (diffusers' rule): a scale in [0, 1) would silently
        # be 1, and a second expert's scale is then ignored.
        for first, second in (("guidance", "guidance_2"), ("t2v_guidance", "t2v_guidance_2")):
            if getattr(o, first) == 1.0 and getattr(o, second) not in (None, 1.0):
                raise RenderError(f"{_flag(second)} {getattr(o, second)}: ignored when {_flag(first)} is 1 (no "
                                  f"classifier-free guidance at all); give {_flag(first)} above 1 too, or drop "
                                  f"{_flag(second)}")

    def _check_memory(self) -> None:
        o = self
        if o.sink > o.max_memory:
            raise RenderError(f"--sink {o.sink}: must be between 0 and --max-memory ({o.max_memory})")
        if o.continuation == "mm2v" and o.frames < MOTION_FRAMES + 4:
            raise RenderError(f"--frames {o.frames}: MM2V continuations drop {MOTION_FRAMES} frames; use at least "
                              f"{MOTION_FRAMES + 4}")
        for name in ("memory_min_relevance", "memory_relative_relevance"):
            value = getattr(o, name)
            if value and o.memory_retrieval != "prompt":
                raise RenderError(f"{_flag(name)} {value}: only applies with --memory-retrieval prompt")
        if o.memory_retrieval != "window" and o.memory_source == "none":
            raise RenderError(f"--memory-retrieval {o.memory_retrieval} picks memory frames, but --memory-source "
                              "none renders without memory; drop one of them")

    def _check_sources(self) -> None:
        o = self
        starts = [name for name, value in (("--first-shot base", o.first_shot == "base"),
                                           ("--t2v-model", o.t2v_model), ("--first-image", o.first_image),
                                           ("--reference-images", o.reference_images)) if value]
        if len(starts) > 1:
            raise RenderError(f"{' and '.join(starts)} both decide how shot 1 starts; pass only one")
        if o.reference_images and o.memory_source == "none":
            raise RenderError("--reference-images seed the memory, but --memory-source none renders without "
                              "memory; drop one of them")
        if len(o.reference_images) > o.max_memory:
            raise RenderError(f"--reference-images: {len(o.reference_images)} images do not fit --max-memory "
                              f"{o.max_memory}")
        from ..builtin import is_builtin

        for flag, value in (("--base", o.base), ("--lora", o.lora), ("--t2v-model", o.t2v_model)):
            if value and not is_builtin(value) and looks_local(value) and not Path(value).exists():
                raise RenderError(f"{flag} {value}: not found")
        if o.lora == "tiny":
            raise RenderError("--lora tiny: there is no random adapter; --lora toy is the small world's adapter")
        if o.lora_scale != 1.0 and not o.lora:
            raise RenderError(f"--lora-scale {o.lora_scale}: there is no --lora to scale")
        if o.is_builtin and o.t2v_model:
            raise RenderError("--t2v-model needs a real --base (the built-in models have no T2V counterpart)")

    def _check_speed(self) -> None:
        from .speed import check_speed

        check_speed(self)

    def _check_placement(self) -> None:
        import torch

        from .parallel import check_parallel

        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RenderError(f"--device {self.device}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise RenderError(f"--device {self.device}: this machine has {torch.cuda.device_count()} CUDA "
                              "device(s), numbered from 0")
        if self.offload != "none" and device.type == "cpu":
            raise RenderError(f"--offload {self.offload}: offloading moves models to an accelerator; --device is "
                              "cpu")
        check_parallel(self)


def _flag(name: str) -> str:
    return {"out_dir": "--out"}.get(name, "--" + name.replace("_", "-"))


# Options that name something (a model, a folder, a device): None is the default, an empty name is a mistake.
_NAMES = ("base", "lora", "t2v_model", "device", "attention_backend", "embedder", "hpsv3_checkpoint",
          "hpsv3_base")
# Whole-number options: (lowest, highest or None, what the bound is).
_INTEGER_RANGES = {
    "height": (16, None, ""),
    "width": (16, None, ""),
    "area": (256, None, " pixels"),
    "frames": (5, None, " (4n+1)"),
    "fps": (1, 240, " frames per second"),
    # UniPC draws its steps from the 1000 timesteps the models were trained on.
    "steps": (1, 1000, " (the models' 1000 training timesteps)"),
    # torch generators take 64-bit seeds; a shot's seed is the base seed plus its index.
    "seed": (0, 2 ** 63 - 1, ""),
    "max_memory": (1, None, ""),
    "sink": (0, None, ""),
}
# Real-valued options: (lowest or None, highest or None, the range in words); all must be finite.
_REAL_RANGES = {
    "lora_scale": (0.0, None, "a number >= 0 (1: as trained, 0: the base alone)"),
    "guidance": (1.0, None, "at least 1 (1: no classifier-free guidance)"),
    "guidance_2": (1.0, None, "at least 1 (1: no classifier-free guidance)"),
    "t2v_guidance": (1.0, None, "at least 1 (1: no classifier-free guidance)"),
    "t2v_guidance_2": (1.0, None, "at least 1 (1: no classifier-free guidance)"),
    "memory_guidance": (0.0, None, "a number >= 0 (1: off)"),
    "shift": (None, None, "a number > 0"),
    "t2v_shift": (None, None, "a number > 0"),
    "memory_min_relevance": (0.0, 1.0, "in [0, 1]"),
    "memory_relative_relevance": (0.0, 1.0, "in [0, 1]"),
    "keyframe_threshold": (-1.0, 1.0, "a cosine in [-1, 1]"),
}
_POSITIVE = ("shift", "t2v_shift")


def latent_frames(frames: int) -> int:
    """Latent frames of a shot of ``frames`` frames (the VAE keeps the first and packs 4 into one after it)."""
    return (frames - 1) // 4 + 1


def check_model_capacity(options: "RenderOptions", rope_max_seq_len: int, patch_size=(1, 2, 2),
                         memory_rope: Optional[str] = None, vae_stride: int = 8, model: str = "the model",
                         size_from: Optional[str] = None, memory_stride: Optional[int] = None) -> None:
    """Refuse sizes the transformer's RoPE table cannot hold: each axis of the latent grid (time, height,
    width, in patches) indexes one table of ``rope_max_seq_len`` rows. Time holds the ``--max-memory`` memory
    frames and the shot's latent frames: side by side (``contiguous``), or the memory at negative positions
    ``-(fm - j) * memory_stride`` (``negative``, the default; the table is read at ``|position|``).
    ``size_from``: the flag the size came from when it was not given (``--area N``)."""
    from ..defaults import ROPE_STRIDE

    stride = memory_stride or ROPE_STRIDE
    n = int(rope_max_seq_len)
    p_t, p_h, p_w = patch_size
    f = latent_frames(options.frames) // p_t
    fm = 0 if options.memory_source == "none" else options.max_memory
    where = f"the RoPE table of {model} has {n} positions per axis"
    if f > n:
        raise RenderError(f"--frames {options.frames}: {f} latent frames do not fit; {where}")
    if memory_rope == "contiguous" and fm + f > n:
        raise RenderError(f"--max-memory {fm} with --frames {options.frames}: {fm} memory + {f} shot latent frames "
                          f"do not fit side by side (contiguous memory RoPE); {where}")
    if memory_rope != "contiguous" and fm * stride >= n:
        raise RenderError(f"--max-memory {fm}: memory frames sit {stride} positions apart before the shot "
                          f"(negative memory RoPE), so at most {(n - 1) // stride} fit; {where}")
    for name, value, patch in (("height", options.height, p_h), ("width", options.width, p_w)):
        if value is not None and value // (vae_stride * patch) > n:
            flag = f"{size_from}: a {name} of {value}" if size_from else f"--{name} {value}"
            raise RenderError(f"{flag}: {value // (vae_stride * patch)} patches do not fit; {where} (at most "
                              f"{n * vae_stride * patch} pixels)")


def shot_seed(shot, base_seed: int, seed_mode: str = "global") -> int:
    """Seed of a shot: base seed + global shot index, or (``"scene"``, the release's quirk) + index in scene."""
    if seed_mode == "global":
        return base_seed + shot.index
    if seed_mode == "scene":
        return base_seed + shot.shot_in_scene
    raise RenderError(f"--seed-mode must be 'global' or 'scene', got {seed_mode!r}")


def file_record(path: Optional[Path]) -> Optional[dict]:
    """A conditioning image as the manifest records it: path and content hash (a changed file is a change)."""
    if path is None:
        return None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"path": str(Path(path).resolve()), "sha256": digest}


def looks_local(value: str) -> bool:
    """A path rather than a hub id (hub ids are 'name' or 'org/name[/subfolder]')."""
    return value.startswith((".", "/", "~")) or "\\" in value or Path(value.split("/")[0]).is_dir()
