"""Render a story shot by shot with visual memory: ``python -m storymem render`` / ``infer_story.py``.

The loop (DESIGN §2):

* shot 1 comes from Wan2.2-T2V-A14B (``--t2v-model``), or from ``--first-image`` (plain I2V), or from
  ``--reference-images`` (MR2V: the images seed the memory and shot 1 is M2V on them); with none of these
  it is M2V with an empty memory (text only);
* every later shot is M2V on the memory bank's frames; a shot whose ``cut`` is false continues the
  previous one (MI2V from its last frame, or MM2V from its last 5 frames when the adapter was trained so;
  ``--continuation none`` starts every shot afresh instead);
* after each shot :class:`~storymem.memory.KeyframeSelector` picks keyframes (deduplicated against the
  whole memory history) and they join the bank. ``--memory-source first-frame`` puts only each shot's first
  frame into the bank instead (same sink + window), ``--memory-source none`` uses no memory at all
  (independent shots); both are ablations;
* which of the bank's frames a shot sees: the sink + sliding window (the release), or with
  ``--memory-retrieval prompt`` the frames whose take (the shot and the shots it continues) reads most like the
  shot's own text (:mod:`storymem.memory.retrieval`; ``--memory-min-relevance`` and
  ``--memory-relative-relevance`` leave out takes unlike it, e.g. another character's).

Outputs in ``--out``: ``shots/SS_NN.mp4``, ``story.mp4``, ``keyframes/SS_NN/fFFF.png``, the bank after each
shot (``memory/after_SS_NN/``), sample thumbnails, ``manifest.json``, ``contact_sheet.png`` and
``index.html``. The manifest lists finished shots only and is replaced (atomically) after a shot's files
are complete, so an interrupted render resumes with the same command; ``--from-shot K`` re-renders from
shot K on, restoring the memory saved after shot K-1.

Several stories with one loaded model (experiments)::

    pipe = load_render_pipeline(options)          # base + adapter, placed on the device
    selector = build_selector(options)            # keyframe embedder / aesthetic scorer
    for story, out in jobs:
        render_story(story, dataclasses.replace(options, out_dir=out), pipe=pipe, selector=selector)

Every input is checked before any model loads and before the output folder is touched; a bad input is a
:class:`RenderError` (exit code 2) naming the file, shot or flag at fault.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .atomic import atomic_write_json

__all__ = [
    "RenderError",
    "RenderOptions",
    "StoryRenderer",
    "TOY_DEFAULTS",
    "DEMO_STORY",
    "MEMORY_SOURCES",
    "CONTINUATIONS",
    "build_parser",
    "build_selector",
    "enable_context_parallel",
    "load_pipeline",
    "load_render_pipeline",
    "load_t2v_pipeline",
    "load_toy_pipeline",
    "main",
    "render_story",
    "shot_seed",
]

from .builtin import BUILTIN_BASES, DEMO_STORY  # noqa: E402
DEFAULT_BASE = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "storymem-render"
MANIFEST_VERSION = 1
SAMPLES_PER_SHOT = 6
SAMPLE_HEIGHT = 144

# The built-in tiny model renders at CPU-friendly sizes; these replace the release defaults when --base toy.
# Toy models learn the empty prompt as the unconditional one (Wan's negative prompt is all unknown words to
# the toy tokenizer).
TOY_SIZE = 64  # the small world's model is trained on 64x64 clips
TOY_DEFAULTS = dict(area=64 * 64, frames=17, steps=8, shift=3.0, embedder="pixel", aesthetic="none",
                    negative_prompt="")
# Wan2.2-T2V-A14B's own sampling defaults (its config: shift 12, guidance 4.0 high-noise / 3.0 low-noise).
T2V_DEFAULTS = dict(shift=12.0, guidance=4.0, guidance_2=3.0)

SHOT_MODES = ("t2v", "base", "i2v", "m2v", "mi2v", "mm2v")
# How shot 1 starts when no T2V model, first image or reference images are given: M2V on an empty memory
# (through the adapter), or the base alone with the adapter switched off ("base": for bases that generate from
# text themselves, like the small world's, it plays the part Wan2.2-T2V-A14B plays for the real model).
FIRST_SHOTS = ("m2v", "base")
# What the memory bank receives after each shot: the selected keyframes (the release), the shot's first frame
# only, or nothing (every shot is generated without memory).
MEMORY_SOURCES = ("keyframes", "first-frame", "none")
# How a cut:false shot continues the previous one; "none": it does not (it starts from text and memory).
CONTINUATIONS = ("auto", "mi2v", "mm2v", "none")


class RenderError(ValueError):
    """Bad render input (story, images, flags, output folder) or an output folder that cannot be resumed."""


# ---------------------------------------------------------------------------------------------- options
@dataclass
class RenderOptions:
    """Everything a render needs besides the story. Defaults are the M2V release's (DESIGN §1).

    Fields that change the pixels (see :meth:`settings`) are recorded in the manifest; a resumed render
    must use the same values. ``height``/``width`` of None: from ``area`` and the aspect ratio of the
    conditioning image (first image or first reference image; 480x832 landscape without one).
    ``negative_prompt`` of None: Wan's (an empty string is used as given). ``memory_source``: one of
    :data:`MEMORY_SOURCES`; ``continuation``: one of :data:`CONTINUATIONS`.
    """

    out_dir: Path = Path("outputs/story")
    base: str = DEFAULT_BASE
    lora: Optional[str] = None
    lora_scale: float = 1.0
    t2v_model: Optional[str] = None
    first_image: Optional[Path] = None
    reference_images: list[Path] = field(default_factory=list)
    first_shot: str = "m2v"
    dtype: str = "auto"
    height: Optional[int] = None
    width: Optional[int] = None
    area: int = 832 * 480
    frames: int = 81
    fps: int = 16
    steps: int = 40
    guidance: float = 3.5
    guidance_2: Optional[float] = None
    memory_guidance: float = 1.0
    shift: float = 4.0
    negative_prompt: Optional[str] = None
    t2v_shift: float = T2V_DEFAULTS["shift"]
    t2v_guidance: float = T2V_DEFAULTS["guidance"]
    t2v_guidance_2: float = T2V_DEFAULTS["guidance_2"]
    seed: int = 0
    seed_mode: str = "global"
    max_memory: int = 10
    sink: int = 3
    memory_rope: Optional[str] = None
    continuation: str = "auto"
    memory_source: str = "keyframes"
    memory_retrieval: str = "window"
    memory_min_relevance: float = 0.0
    memory_relative_relevance: float = 0.0
    embedder: str = "ViT-B-32:openai"
    aesthetic: str = "hpsv3"
    hpsv3_checkpoint: Optional[str] = None
    hpsv3_base: Optional[str] = None
    keyframe_threshold: float = 0.9
    offload: str = "none"
    device: Optional[str] = None
    parallel: str = "none"
    attention_backend: Optional[str] = None
    from_shot: Optional[str] = None
    force: bool = False
    progress: bool = True

    @property
    def is_toy(self) -> bool:
        """A built-in CPU-sized model: the small world's trained base ("toy") or random weights ("tiny")."""
        return self.base in BUILTIN_BASES

    def settings(self) -> dict:
        """The options that decide the pixels, as JSON values (what a resumed render must match)."""
        return {
            "base": self.base,
            "lora": self.lora,
            # Only when set, so renders made before the option existed still resume.
            **({"lora_scale": self.lora_scale} if self.lora_scale != 1.0 else {}),
            "t2v_model": self.t2v_model,
            "first_image": _file_record(self.first_image),
            "reference_images": [_file_record(p) for p in self.reference_images],
            # Only when set, so renders made before the option existed still resume.
            **({"first_shot": self.first_shot} if self.first_shot != "m2v" else {}),
            "dtype": self.resolved_dtype(),
            "height": self.height,
            "width": self.width,
            "frames": self.frames,
            "fps": self.fps,
            "steps": self.steps,
            "guidance": self.guidance,
            "guidance_2": self.guidance_2 if self.guidance_2 is not None else self.guidance,
            "shift": self.shift,
            # Only when set, so renders made before the option existed still resume.
            **({"memory_guidance": self.memory_guidance} if self.memory_guidance != 1.0 else {}),
            "negative_prompt": self.negative_prompt,
            "t2v": None if not self.t2v_model else {
                "shift": self.t2v_shift, "guidance": self.t2v_guidance, "guidance_2": self.t2v_guidance_2},
            "seed": self.seed,
            "seed_mode": self.seed_mode,
            "max_memory": self.max_memory,
            "sink": self.sink,
            "memory_rope": self.memory_rope,
            "continuation": self.continuation,
            "memory_source": self.memory_source,
            # Only when set, so renders made before the option existed still resume.
            **({"memory_retrieval": {"mode": self.memory_retrieval, "min_relevance": self.memory_min_relevance,
                                     "relative_relevance": self.memory_relative_relevance}}
               if self.memory_retrieval != "window" else {}),
            "embedder": self.embedder,
            "aesthetic": self.aesthetic,
            "hpsv3_checkpoint": self.hpsv3_checkpoint if self.aesthetic == "hpsv3" else None,
            "keyframe_threshold": self.keyframe_threshold,
        }

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if not self.is_toy and self.resolved_device().startswith("cuda") else "float32"


def shot_seed(shot, base_seed: int, seed_mode: str = "global") -> int:
    """Seed of a shot: base seed + global shot index, or (``"scene"``, the release's quirk) + index in scene."""
    if seed_mode == "global":
        return base_seed + shot.index
    if seed_mode == "scene":
        return base_seed + shot.shot_in_scene
    raise RenderError(f"--seed-mode must be 'global' or 'scene', got {seed_mode!r}")


def _file_record(path: Optional[Path]) -> Optional[dict]:
    """A conditioning image as the manifest records it: path and content hash (a changed file is a change)."""
    if path is None:
        return None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"path": str(Path(path).resolve()), "sha256": digest}


# ---------------------------------------------------------------------------------------------- models
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _dtype_kwargs(dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` where diffusers has it, ``torch_dtype`` before."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_toy_pipeline(base: str = "toy"):
    """A built-in CPU-sized :class:`~storymem.StoryMemPipeline` without adapter: ``"toy"``, the small world's
    trained base (``--demo``), or ``"tiny"``, random weights of the same classes (tests, smoke runs). This is the
    one place that decides the built-in weights."""
    from .builtin import BuiltinWeightsError, load_builtin_pipeline

    try:
        return load_builtin_pipeline(base)
    except (BuiltinWeightsError, ValueError) as err:
        raise RenderError(str(err)) from None


def load_pipeline(options: RenderOptions, shared: Optional[dict] = None):
    """The StoryMem pipeline of ``options.base`` ("toy", "tiny", a Wan2.2-I2V diffusers folder or hub id) in the
    requested dtype (VAE in float32, as diffusers' Wan examples), with its UniPC shift set. ``shared``:
    already loaded components (text encoder, tokenizer, VAE of the T2V model, which are the same models)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    from .pipeline import StoryMemPipeline

    dtype = _torch_dtype(options.resolved_dtype())
    if options.is_toy:
        pipe = load_toy_pipeline(options.base)
        if dtype != torch.float32:
            for name in ("transformer", "transformer_2", "text_encoder"):
                model = getattr(pipe, name)
                if model is not None:
                    model.to(dtype)
    else:
        components = dict(shared or {})
        if "vae" not in components:
            components["vae"] = AutoencoderKLWan.from_pretrained(options.base, subfolder="vae",
                                                                 **_dtype_kwargs(torch.float32))
        pipe = StoryMemPipeline.from_pretrained(options.base, **_dtype_kwargs(dtype), **components)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=options.shift)
    return pipe


def load_render_pipeline(options: RenderOptions, shared: Optional[dict] = None, device: Optional[str] = None):
    """The pipeline a render of ``options`` runs: :func:`load_pipeline`, the ``--lora`` adapter, the attention
    backend, placed on ``device`` (default: the options') or offloaded there. Load it once and hand it to
    several renders (``render_story(..., pipe=pipe)``); context parallelism is left to the renderer."""
    pipe = load_pipeline(options, shared=shared)
    if options.lora:
        _load_adapter(pipe, options.lora)
        if options.lora_scale != 1.0:
            set_adapter_scale(pipe, options.lora_scale)
    if options.attention_backend and options.parallel == "none":
        for model in (pipe.transformer, pipe.transformer_2):
            if model is not None:
                model.set_attention_backend(options.attention_backend)
    return _place(pipe, options, device or options.resolved_device())


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


def load_t2v_pipeline(options: RenderOptions):
    """diffusers' ``WanPipeline`` of ``options.t2v_model`` (Wan2.2-T2V-A14B), VAE in float32."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    dtype = _torch_dtype(options.resolved_dtype())
    vae = AutoencoderKLWan.from_pretrained(options.t2v_model, subfolder="vae", **_dtype_kwargs(torch.float32))
    pipe = WanPipeline.from_pretrained(options.t2v_model, vae=vae, **_dtype_kwargs(dtype))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=options.t2v_shift)
    return pipe


def _place(pipe, options: RenderOptions, device: str):
    """Move a pipeline to its device, or let diffusers offload it."""
    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def enable_context_parallel(pipe, parallel: str = "ulysses", world_size: Optional[int] = None,
                            attention_backend: Optional[str] = None):
    """Split each expert's token sequence over the GPUs of the process group (diffusers' ``_cp_plan``).

    Call after ``torch.distributed`` is initialised and the pipeline is on its GPU; every rank then runs the same
    pipeline call. StoryMemPipeline installed its memory rope as ``transformer.rope`` when it was built, so the
    plan's "rope" entry splits the memory rope's output along the sequence exactly like the stock one's.
    Ulysses works with diffusers' default SDPA backend; ring attention needs a backend that returns the
    log-sum-exp, so it defaults to ``_native_cudnn``.
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from .rope import install_memory_rope

    if parallel not in ("ulysses", "ring"):
        raise ValueError(f"parallel must be 'ulysses' or 'ring', got {parallel!r}")
    world_size = world_size or dist.get_world_size()
    backend = attention_backend or ("_native_cudnn" if parallel == "ring" else None)
    for model in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if model is None:
            continue
        install_memory_rope(model)  # idempotent; before the plan hooks the module named "rope"
        if backend:
            model.set_attention_backend(backend)
        if parallel == "ulysses":
            config = ContextParallelConfig(ulysses_degree=world_size)
        else:
            config = ContextParallelConfig(ring_degree=world_size)
        model.enable_parallelism(config=config)
    return pipe


def build_selector(options: RenderOptions, device: Optional[str] = None):
    """KeyframeSelector from --embedder / --aesthetic / --keyframe-threshold. Its models load lazily, on the
    first selection, and stay with the selector: hand one selector to several renders to load them once."""
    device = device or options.resolved_device()
    from .memory import KeyframeSelector, NullScorer, OpenCLIPEmbedder, PixelEmbedder

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
        from .memory.hpsv3 import HPSV3_BASE, HPSV3_HUB_ID, HPSv3Scorer

        try:
            scorer = HPSv3Scorer(checkpoint=options.hpsv3_checkpoint or HPSV3_HUB_ID,
                                 base=options.hpsv3_base or HPSV3_BASE, device=device)
        except (ValueError, OSError) as err:
            raise RenderError(f"--hpsv3-checkpoint / --hpsv3-base: {err}") from None
    return KeyframeSelector(embedder=embedder, scorer=scorer, threshold=options.keyframe_threshold)


# ---------------------------------------------------------------------------------------------- files
def _write_json(path: Path, data: dict):
    atomic_write_json(path, data)


class _AtomicFolder:
    """Fill a temporary folder, then swap it in for ``target`` (the old one is removed after the swap)."""

    def __init__(self, target: Path):
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _save_png(path: Path, frame: np.ndarray):
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(frame)).save(path)


def _read_image(path: Path, what: str) -> np.ndarray:
    """An RGB uint8 image, or a RenderError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise RenderError(f"{path}: {what} not found")
    if not path.is_file():
        raise RenderError(f"{path}: {what} is not a file")
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise RenderError(f"{path}: cannot read {what} ({err})") from None


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("storymem", "torch", "diffusers", "transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if out["storymem"] is None:
        from . import __version__

        out["storymem"] = __version__
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class _Plan:
    """What a validated render will do (built before any model loads)."""

    story: Any
    options: RenderOptions
    start: int  # first shot to render (0-based)
    previous: Optional[dict]  # the existing manifest, when continuing one
    bank: Any  # the memory bank restored for `start` (None: build a fresh one)
    first_image: Optional[np.ndarray]
    references: list[np.ndarray]
    selector: Any


def _check_output_dir(out_dir: Path, force: bool) -> Optional[dict]:
    """Check the output folder can be written; return its manifest when it holds a render."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise RenderError(f"{out_dir}: output path exists and is not a folder")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise RenderError(f"{out_dir}: output folder is not writable")
        manifest_path = out_dir / MANIFEST_NAME
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
                if force:
                    return None
                raise RenderError(f"{manifest_path}: unreadable render manifest ({err}); pass --force to start "
                                  "over in this folder") from None
            if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
                if force:
                    return None
                raise RenderError(f"{manifest_path}: not a storymem render manifest; choose another --out or "
                                  "pass --force")
            return manifest
        if any(out_dir.iterdir()) and not force:
            raise RenderError(f"{out_dir}: folder is not empty and holds no {MANIFEST_NAME}; choose another --out "
                              "(or pass --force to render into it)")
        return None
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RenderError(f"{out_dir}: cannot create the output folder: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RenderError(f"{out_dir}: cannot create the output folder: {parent} is not writable")
    return None


def _resolve_from_shot(value: str, story) -> int:
    """--from-shot as a 0-based index: a 1-based shot number or a file stem like 02_01."""
    text = str(value).strip()
    stems = {shot.file_stem: shot.index for shot in story}
    if text in stems:
        return stems[text]
    try:
        number = int(text)
    except ValueError:
        raise RenderError(f"--from-shot {value!r}: expected a shot number 1..{len(story)} or a file stem "
                          f"such as {story[0].file_stem}") from None
    if not 1 <= number <= len(story):
        raise RenderError(f"--from-shot {number}: the story has shots 1..{len(story)}")
    return number - 1


def _diff_settings(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def _story_key(story_dict: dict) -> dict:
    return {k: v for k, v in story_dict.items() if k != "path"}


def _validate_options(options: RenderOptions, story) -> None:
    """Flag values and combinations (no file is read here)."""
    o = options
    if o.frames < 5 or (o.frames - 1) % 4:
        raise RenderError(f"--frames {o.frames}: must be of the form 4n+1 and at least 5 (e.g. 81)")
    for name in ("height", "width"):
        value = getattr(o, name)
        if value is not None and (value < 16 or value % 16):
            raise RenderError(f"--{name} {value}: must be a positive multiple of 16")
    if (o.height is None) != (o.width is None):
        raise RenderError("give both --height and --width, or neither (then the size comes from the area and "
                          "the conditioning image's aspect ratio)")
    if o.area < 256:
        raise RenderError(f"area {o.area}: too small")
    if o.steps < 1:
        raise RenderError(f"--steps {o.steps}: must be >= 1")
    if o.fps <= 0:
        raise RenderError(f"--fps {o.fps}: must be > 0")
    for name in ("guidance", "guidance_2", "memory_guidance", "t2v_guidance", "t2v_guidance_2"):
        value = getattr(o, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise RenderError(f"--{name.replace('_', '-')} {value}: must be a finite number >= 0")
    for name in ("shift", "t2v_shift"):
        if not (math.isfinite(getattr(o, name)) and getattr(o, name) > 0):
            raise RenderError(f"--{name.replace('_', '-')} {getattr(o, name)}: must be > 0")
    if o.seed < 0:
        raise RenderError(f"--seed {o.seed}: must be >= 0")
    if o.seed_mode not in ("global", "scene"):
        raise RenderError(f"--seed-mode {o.seed_mode!r}: must be 'global' or 'scene'")
    if o.max_memory < 1:
        raise RenderError(f"--max-memory {o.max_memory}: must be >= 1")
    if not 0 <= o.sink <= o.max_memory:
        raise RenderError(f"--sink {o.sink}: must be between 0 and --max-memory ({o.max_memory})")
    if o.memory_rope not in (None, "negative", "contiguous"):
        raise RenderError(f"--memory-rope {o.memory_rope!r}: must be 'negative' or 'contiguous'")
    if o.continuation not in CONTINUATIONS:
        raise RenderError(f"--continuation {o.continuation!r}: must be one of {', '.join(CONTINUATIONS)}")
    if o.memory_source not in MEMORY_SOURCES:
        raise RenderError(f"--memory-source {o.memory_source!r}: must be one of {', '.join(MEMORY_SOURCES)}")
    if o.continuation == "mm2v" and o.frames < 9:
        raise RenderError(f"--frames {o.frames}: MM2V continuations drop 5 frames; use at least 9")
    from .memory.retrieval import RETRIEVAL_MODES

    if o.memory_retrieval not in RETRIEVAL_MODES:
        raise RenderError(f"--memory-retrieval {o.memory_retrieval!r}: must be one of "
                          f"{', '.join(RETRIEVAL_MODES)}")
    for name in ("memory_min_relevance", "memory_relative_relevance"):
        value, flag = getattr(o, name), "--" + name.replace("_", "-")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise RenderError(f"{flag} {value}: must be in [0, 1]")
        if value and o.memory_retrieval != "prompt":
            raise RenderError(f"{flag} {value}: only applies with --memory-retrieval prompt")
    if o.memory_retrieval != "window" and o.memory_source == "none":
        raise RenderError(f"--memory-retrieval {o.memory_retrieval} picks memory frames, but --memory-source none "
                          "renders without memory; drop one of them")
    if o.aesthetic not in ("hpsv3", "none"):
        raise RenderError(f"--aesthetic {o.aesthetic!r}: must be 'hpsv3' or 'none'")
    if not -1.0 <= o.keyframe_threshold <= 1.0:
        raise RenderError(f"--keyframe-threshold {o.keyframe_threshold}: must be a cosine in [-1, 1]")
    if o.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise RenderError(f"--dtype {o.dtype!r}: must be auto, float32, bfloat16 or float16")
    if o.offload not in ("none", "model", "sequential"):
        raise RenderError(f"--offload {o.offload!r}: must be none, model or sequential")
    if o.parallel not in ("none", "ulysses", "ring"):
        raise RenderError(f"--parallel {o.parallel!r}: must be none, ulysses or ring")

    if o.first_shot not in FIRST_SHOTS:
        raise RenderError(f"--first-shot {o.first_shot!r}: must be one of {', '.join(FIRST_SHOTS)}")
    starts = [name for name, value in (("--first-shot base", o.first_shot == "base"),
                                       ("--t2v-model", o.t2v_model), ("--first-image", o.first_image),
                                       ("--reference-images", o.reference_images)) if value]
    if len(starts) > 1:
        raise RenderError(f"{' and '.join(starts)} both decide how shot 1 starts; pass only one")
    if o.reference_images and o.memory_source == "none":
        raise RenderError("--reference-images seed the memory, but --memory-source none renders without memory; "
                          "drop one of them")
    if len(o.reference_images) > o.max_memory:
        raise RenderError(f"--reference-images: {len(o.reference_images)} images do not fit --max-memory "
                          f"{o.max_memory}")
    for flag, value in (("--base", o.base), ("--lora", o.lora), ("--t2v-model", o.t2v_model)):
        if value and value not in BUILTIN_BASES and _looks_local(value) and not Path(value).exists():
            raise RenderError(f"{flag} {value}: not found")
    if o.lora == "tiny":
        raise RenderError("--lora tiny: there is no random adapter; --lora toy is the small world's adapter")
    if not (math.isfinite(o.lora_scale) and o.lora_scale >= 0):
        raise RenderError(f"--lora-scale {o.lora_scale}: must be a finite number >= 0")
    if o.lora_scale != 1.0 and not o.lora:
        raise RenderError(f"--lora-scale {o.lora_scale}: there is no --lora to scale")
    if o.is_toy and o.t2v_model:
        raise RenderError("--t2v-model needs a real --base (the toy model has no T2V counterpart)")

    import torch

    device = o.resolved_device()
    try:
        torch_device = torch.device(device)
    except (RuntimeError, ValueError):
        raise RenderError(f"--device {device!r}: not a torch device") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RenderError(f"--device {device}: CUDA is not available on this machine")
    if o.offload != "none" and torch_device.type == "cpu":
        raise RenderError(f"--offload {o.offload}: offloading moves models to an accelerator; --device is cpu")
    if o.parallel != "none":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2:
            raise RenderError(f"--parallel {o.parallel}: run under torchrun with 2 or more processes, e.g. "
                              "`torchrun --nproc-per-node 2 infer_story.py ...`")
        if not torch.cuda.is_available():
            raise RenderError(f"--parallel {o.parallel}: context parallelism needs CUDA GPUs")
        if o.offload != "none":
            raise RenderError(f"--parallel {o.parallel} keeps each expert on every GPU; use --offload none")
        if o.height is not None and ((o.height // 16) * (o.width // 16)) % world:
            raise RenderError(f"--parallel {o.parallel}: the {o.height // 16}x{o.width // 16} tokens of a latent "
                              f"frame must split evenly over {world} GPUs")


def _looks_local(value: str) -> bool:
    """A path rather than a hub id (hub ids are 'name' or 'org/name[/subfolder]')."""
    return value.startswith((".", "/", "~")) or "\\" in value or Path(value.split("/")[0]).is_dir()


def _load_adapter(pipe, value: str):
    """--lora: a local folder, a hub id, 'org/name/subfolder' for one variant of a hub repository, or "toy" (the
    small world's adapter)."""
    if value == "toy":
        from .builtin import BuiltinWeightsError, builtin_adapter_folder

        try:
            return pipe.load_storymem_lora(builtin_adapter_folder("toy"))
        except BuiltinWeightsError as err:
            raise RenderError(str(err)) from None
    parts = value.split("/")
    if Path(value).exists() or _looks_local(value) or len(parts) <= 2:
        return pipe.load_storymem_lora(value)
    return pipe.load_storymem_lora("/".join(parts[:2]), subfolder="/".join(parts[2:]))


def _default_size(options: RenderOptions, image: Optional[np.ndarray]) -> tuple[int, int]:
    from .pipeline import size_from_area

    aspect = image.shape[0] / image.shape[1] if image is not None else 480 / 832
    return size_from_area(aspect, area=options.area, multiple=16)


def prepare(story, options: RenderOptions, selector=None) -> _Plan:
    """Validate everything (no model loads, nothing written) and work out where the render starts.

    ``selector``: a :class:`~storymem.memory.KeyframeSelector` to use (e.g. one shared by several renders);
    default: built from the options when the memory takes keyframes."""
    _validate_options(options, story)
    first_image = _read_image(Path(options.first_image), "--first-image") if options.first_image else None
    references = [_read_image(Path(p), "--reference-images entry") for p in options.reference_images]
    if options.height is None:
        options.height, options.width = _default_size(options, first_image if first_image is not None else
                                                      (references[0] if references else None))
        if options.parallel != "none":
            _validate_options(options, story)  # the token split check needs the size
    if selector is None and options.memory_source == "keyframes":
        selector = build_selector(options)

    out_dir = Path(options.out_dir)
    previous = _check_output_dir(out_dir, options.force)
    from_index = _resolve_from_shot(options.from_shot, story) if options.from_shot is not None else None
    start, bank = 0, None
    if previous is not None:
        finished = _finished_shots(previous, out_dir, story)
        # Renders recorded before --memory-source existed took keyframes.
        diffs = _diff_settings({"memory_source": "keyframes", **previous.get("settings", {})}, options.settings())
        if _story_key(previous.get("story", {})) != _story_key(story.to_dict()):
            diffs.insert(0, "story: the shots (prompts, cuts or scenes) differ")
        if from_index is not None:
            if from_index > len(finished):
                raise RenderError(f"--from-shot {options.from_shot}: only {len(finished)} shot(s) of "
                                  f"{out_dir / MANIFEST_NAME} are finished; the render can restart at shot "
                                  f"{len(finished) + 1} at the latest")
            start = from_index
        elif options.force:
            start = 0
        elif diffs:
            raise RenderError(
                f"{out_dir / MANIFEST_NAME} was rendered with other settings:\n  " + "\n  ".join(diffs) +
                "\nrerun with the same options to resume, --from-shot K to re-render from shot K with these "
                "options, or --force to start over")
        else:
            start = len(finished)
        if start > 0:
            bank = _load_bank(out_dir, story[start - 1])
            if (bank.max_memory, bank.sink) != (options.max_memory, options.sink):
                # --from-shot with a new window: the restored history is viewed through it from here on.
                if bank.num_references > options.max_memory:
                    raise RenderError(f"--max-memory {options.max_memory}: the render's {bank.num_references} "
                                      "reference images do not fit")
                bank.max_memory, bank.sink = options.max_memory, options.sink
    elif from_index is not None and from_index > 0:
        raise RenderError(f"--from-shot {options.from_shot}: {out_dir} holds no finished render to continue")
    return _Plan(story=story, options=options, start=start, previous=previous, bank=bank,
                 first_image=first_image, references=references, selector=selector)


def _finished_shots(manifest: dict, out_dir: Path, story) -> list[dict]:
    """The manifest's finished shots whose videos are present: the longest such prefix of the story (a shot
    whose file has gone is rendered again, and so is everything after it)."""
    shots = manifest.get("shots", [])
    if not isinstance(shots, list):
        raise RenderError(f"{out_dir / MANIFEST_NAME}: field 'shots' is not a list; pass --force to start over")
    finished = []
    for position, entry in enumerate(shots):
        if not isinstance(entry, dict) or entry.get("index") != position or position >= len(story):
            raise RenderError(f"{out_dir / MANIFEST_NAME}: shots[{position}] is not shot {position + 1} of the "
                              "story; pass --force to start over")
        if not (out_dir / str(entry.get("file", ""))).is_file():
            break
        finished.append(entry)
    return finished


def _load_bank(out_dir: Path, shot):
    from .memory import MemoryBank, MemoryBankError

    folder = out_dir / "memory" / f"after_{shot.file_stem}"
    try:
        return MemoryBank.load(folder)
    except MemoryBankError as err:
        raise RenderError(f"cannot restore the memory saved after shot {shot.file_stem}: {err}") from None


# ---------------------------------------------------------------------------------------------- renderer
class StoryRenderer:
    """Runs a validated plan: loads the models, renders the remaining shots, writes the folder.

    Args:
        plan: from :func:`prepare`.
        pipe: an already loaded :class:`~storymem.StoryMemPipeline` (e.g. from :func:`load_render_pipeline`,
            shared by several renders; then ``--base``/``--lora``/placement are the caller's business). The
            render sets its UniPC scheduler's shift to ``options.shift`` and passes ``options.memory_rope`` with
            each call, so one render's options do not leak into the next. Default: loaded from the options.
    """

    def __init__(self, plan: _Plan, pipe=None):
        self.plan = plan
        self.options = plan.options
        self.story = plan.story
        self.out_dir = Path(plan.options.out_dir)
        self.pipe = pipe
        self.adapter = None
        self.rank, self.world_size = 0, 1
        self.device = self.options.resolved_device()
        self.manifest: dict = {}
        self.timings: dict = {}
        self._owns_process_group = False
        from .memory.retrieval import TextRelevance, story_take_texts

        # Every keyframe keeps its take's text, so a bank saved now can be retrieved by prompt later.
        self.take_texts = story_take_texts(self.story)
        self.relevance = TextRelevance(self.take_texts)

    # ------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _log(self, message: str):
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def _init_distributed(self):
        import torch
        import torch.distributed as dist

        if self.options.parallel == "none":
            return
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
            self._owns_process_group = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = f"cuda:{local_rank}"
        # Every rank has read (and validated) the folder in prepare(); only now may rank 0 write to it.
        dist.barrier()

    def _enable_context_parallel(self, pipe):
        enable_context_parallel(pipe, self.options.parallel, self.world_size, self.options.attention_backend)

    def _load_main_pipeline(self, shared: Optional[dict] = None):
        t0 = time.perf_counter()
        if self.pipe is None:
            self._log(f"loading {self.options.base}" + (f" + adapter {self.options.lora}" if self.options.lora else ""))
            self.pipe = load_render_pipeline(self.options, shared=shared, device=self.device)
            if self.options.parallel != "none":
                self._enable_context_parallel(self.pipe)
        else:
            from diffusers import UniPCMultistepScheduler

            # The shift is a render setting; another scheduler type is the caller's choice and stays.
            scheduler = self.pipe.scheduler
            if isinstance(scheduler, UniPCMultistepScheduler) and scheduler.config.flow_shift != self.options.shift:
                self.pipe.scheduler = UniPCMultistepScheduler.from_config(self.pipe.scheduler.config,
                                                                          flow_shift=self.options.shift)
        self.adapter = getattr(self.pipe, "storymem_adapter", None)
        self.pipe.set_progress_bar_config(desc="denoising", leave=False, disable=not (self.options.progress
                                                                                     and self.is_main))
        self.timings["load_s"] = self.timings.get("load_s", 0.0) + time.perf_counter() - t0
        if self.continuation_mode == "mm2v" and self.options.frames < 9:
            raise RenderError(f"--frames {self.options.frames}: the adapter continues shots with MM2V, which drops "
                              "5 frames; use at least 9")

    @property
    def continuation_mode(self) -> str:
        """How cut:false shots continue the previous one: mi2v, mm2v, or none (they start afresh)."""
        if self.options.continuation != "auto":
            return self.options.continuation
        conditioning = getattr(self.adapter, "conditioning", None)
        return "mm2v" if conditioning == "mm2v" else "mi2v"

    @property
    def memory_rope(self) -> Optional[str]:
        """Where memory frames sit in time: the option, else the loaded adapter's (the pipeline's default)."""
        return self.options.memory_rope or getattr(self.pipe, "memory_rope", None)

    # ------------------------------------------------------------------ per shot
    def mode_for(self, shot) -> str:
        """How a shot is generated (recorded in the manifest)."""
        if shot.index == 0:
            if self.options.t2v_model:
                return "t2v"
            if self.options.first_image:
                return "i2v"
            return "base" if self.options.first_shot == "base" else "m2v"
        if shot.cut or self.continuation_mode == "none":
            return "m2v"
        return self.continuation_mode

    def _generate(self, shot, mode: str, bank, seed: int, t2v=None) -> tuple[np.ndarray, list]:
        """Frames (uint8 [N, H, W, 3]) of one shot and the memory entries it was conditioned on."""
        import torch

        o = self.options
        generator = torch.Generator("cpu").manual_seed(seed)
        from .pipeline import WAN_NEGATIVE_PROMPT

        # An explicit empty negative prompt is a choice (the toy models' unconditional prompt), not a default.
        negative = WAN_NEGATIVE_PROMPT if o.negative_prompt is None else o.negative_prompt
        common = dict(prompt=shot.prompt, negative_prompt=negative,
                      height=o.height, width=o.width, num_frames=o.frames, num_inference_steps=o.steps,
                      generator=generator, output_type="np")
        entries: list = []
        if mode == "t2v":
            out = t2v(guidance_scale=o.t2v_guidance, guidance_scale_2=o.t2v_guidance_2, **common)
        elif mode == "base":
            kwargs = dict(guidance_scale=o.guidance, guidance_scale_2=o.guidance_2)
            if self.pipe.config.boundary_ratio is None:
                kwargs.pop("guidance_scale_2")
            with adapter_disabled(self.pipe):
                out = self.pipe(**common, **kwargs)
        else:
            kwargs = dict(guidance_scale=o.guidance, guidance_scale_2=o.guidance_2)
            if mode == "i2v":
                from PIL import Image

                kwargs.update(first_frame=Image.fromarray(self.plan.first_image), drop_context_frames=False)
            else:
                if o.memory_source != "none":
                    entries = self._memory_for(shot, bank)
                    kwargs["memory_images"] = [e.frame for e in entries]
                    if o.memory_guidance != 1.0 and entries:
                        kwargs["memory_guidance_scale"] = o.memory_guidance
                    if o.memory_rope:
                        kwargs["memory_rope"] = o.memory_rope
                if mode == "mi2v":
                    kwargs["first_frame"] = bank.last_frame
                elif mode == "mm2v":
                    kwargs["motion_frames"] = bank.last_frames(5)
            if self.pipe.config.boundary_ratio is None:
                kwargs.pop("guidance_scale_2")
            out = self.pipe(**common, **kwargs)
        frames = np.asarray(out.frames[0])
        frames = np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
        return frames, entries

    def _memory_for(self, shot, bank) -> list:
        """The bank entries shot ``shot`` is conditioned on: the sink + window, or retrieved by its take text."""
        o = self.options
        if o.memory_retrieval == "prompt":
            return bank.retrieve(self.take_texts[shot.index], self.relevance, o.memory_min_relevance,
                                 o.memory_relative_relevance)
        return bank.entries()

    def _select_keyframes(self, frames: np.ndarray, bank):
        """(indices, embeddings) of the frames the memory receives: the keyframes, chosen on rank 0 and shared,
        so every rank's memory (and with it every rank's sequence length) stays identical; or the first frame
        (``--memory-source first-frame``); or none."""
        source = self.options.memory_source
        if source == "none":
            return [], None
        if source == "first-frame":
            # No dedup: the bank's sink + window alone decide what a shot sees.
            return [0], None
        indices, embeddings = None, None
        if self.is_main:
            selection = self.plan.selector.extract(frames, memory=bank.history_embeddings(self.plan.selector.embedder))
            indices, embeddings = list(selection.indices), selection.embeddings
        if self.world_size > 1:
            import torch.distributed as dist

            box = [(indices, embeddings)]
            dist.broadcast_object_list(box, src=0)
            indices, embeddings = box[0]
        return indices, embeddings

    # ------------------------------------------------------------------ manifest & files
    def _memory_record(self, entry, position: dict, query: Optional[str] = None) -> dict:
        if entry.is_reference:
            i = position[id(entry)]
            return {"kind": "reference", "id": f"ref_{i:02d}", "shot": None, "frame": None,
                    "file": f"references/ref_{i:02d}.png"}
        stem = self.story[entry.shot].file_stem
        record = {"kind": "keyframe", "shot": entry.shot, "shot_stem": stem, "frame": entry.frame_index,
                  "file": None}
        if entry.frame_index is not None:
            record["file"] = f"keyframes/{stem}/f{entry.frame_index:03d}.png"
        if query is not None and entry.text is not None:
            record["relevance"] = round(float(self.relevance(query, [entry.text])[0]), 4)
        return record

    def _new_manifest(self) -> dict:
        o = self.options
        story = self.story.to_dict()
        story["path"] = str(Path(self.story.path).resolve()) if self.story.path else None
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "created": _now(),
            "updated": _now(),
            "story": story,
            "num_shots": len(self.story),
            "settings": o.settings(),
            "runtime": {},
            "versions": _versions(),
            "references": [{"id": f"ref_{i:02d}", "file": f"references/ref_{i:02d}.png", "source": str(p)}
                           for i, p in enumerate(o.reference_images)],
            "outputs": {"story_video": "story.mp4", "contact_sheet": "contact_sheet.png", "index": "index.html"},
            "shots": [],
            "finished": False,
            "timings": {},
        }
        return manifest

    def _start_manifest(self):
        """The manifest this run continues: the finished shots before ``start`` are kept."""
        previous = self.plan.previous
        if previous is not None and self.plan.start > 0:
            manifest = dict(previous)
            manifest["shots"] = list(previous["shots"][: self.plan.start])
            manifest["settings"] = self.options.settings()
            manifest["story"] = self._new_manifest()["story"]
            manifest["versions"] = _versions()
            manifest["finished"] = False
        else:
            manifest = self._new_manifest()
        manifest["runtime"] = {
            "device": self.device, "offload": self.options.offload, "parallel": self.options.parallel,
            "world_size": self.world_size, "memory_rope": self.memory_rope,
            "continuation": self.continuation_mode, "memory_source": self.options.memory_source,
            "adapter": None if self.adapter is None else {
                k: v for k, v in dataclasses.asdict(self.adapter).items() if k != "target_modules"},
        }
        manifest["timings"] = dict(manifest.get("timings", {}), load_s=round(self.timings.get("load_s", 0.0), 3))
        self.manifest = manifest
        if self.is_main:
            self._write_manifest()

    def _write_manifest(self):
        self.manifest["updated"] = _now()
        _write_json(self.out_dir / MANIFEST_NAME, self.manifest)

    def _write_shot_files(self, shot, frames: np.ndarray, keyframes: list[int], bank) -> dict:
        from PIL import Image

        from .video import write_video

        stem = shot.file_stem
        write_video(self.out_dir / "shots" / f"{stem}.mp4", frames, fps=self.options.fps)
        with _AtomicFolder(self.out_dir / "keyframes" / stem) as folder:
            for i in keyframes:
                _save_png(folder / f"f{i:03d}.png", frames[i])
        samples = sorted(set(np.linspace(0, len(frames) - 1, min(SAMPLES_PER_SHOT, len(frames))).round().astype(int)))
        with _AtomicFolder(self.out_dir / "samples" / stem) as folder:
            for i in samples:
                image = Image.fromarray(frames[i])
                if image.height > SAMPLE_HEIGHT:
                    image = image.resize((round(image.width * SAMPLE_HEIGHT / image.height), SAMPLE_HEIGHT),
                                         Image.BICUBIC)
                image.save(folder / f"f{i:03d}.jpg", quality=90)
        bank.save(self.out_dir / "memory" / f"after_{stem}")
        return {
            "file": f"shots/{stem}.mp4",
            "keyframes": [{"frame": int(i), "file": f"keyframes/{stem}/f{i:03d}.png"} for i in keyframes],
            "samples": [f"samples/{stem}/f{i:03d}.jpg" for i in samples],
            "memory_state": f"memory/after_{stem}",
        }

    def _write_story_outputs(self):
        """story.mp4 (stream copy), contact sheet and index.html from the finished shots."""
        from .report import write_report
        from .video import concat_videos

        shots = self.manifest["shots"]
        if shots:
            concat_videos([self.out_dir / s["file"] for s in shots], self.out_dir / "story.mp4")
        write_report(self.out_dir, self.manifest)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Render the remaining shots; returns the final manifest."""
        from tqdm.auto import tqdm

        from .memory import MemoryBank

        o = self.options
        t_run = time.perf_counter()
        start = self.plan.start
        if start >= len(self.story):
            # Everything is rendered already: refresh the derived outputs, load no model.
            self.manifest = self.plan.previous
            if self.is_main:
                self._write_story_outputs()
            return self.manifest

        self._init_distributed()
        bank = self.plan.bank
        if bank is None:
            bank = MemoryBank(max_memory=o.max_memory, sink=o.sink)
            if self.plan.references:
                bank.add_references(self.plan.references)
        else:  # a bank saved before take texts were kept
            bank.fill_texts(lambda index: self.take_texts[index])

        t2v_frames, shared = None, None
        if start == 0 and self.mode_for(self.story[0]) == "t2v":
            t2v_frames, shared = self._render_t2v_first_shot()
        self._load_main_pipeline(shared)
        if not o.is_toy and start == 0 and self.mode_for(self.story[0]) == "m2v" and not self.plan.references:
            warnings.warn("shot 1 is generated from text alone by the I2V model with an empty memory; "
                          "--t2v-model (Wan2.2-T2V-A14B) gives a better opening shot", stacklevel=2)
        # Nothing is written before this point: the folder gets its manifest first.
        self._start_manifest()
        if self.is_main and start == 0:
            from PIL import Image

            from .report import save_image_atomic

            for i, image in enumerate(self.plan.references):
                save_image_atomic(Image.fromarray(image), self.out_dir / "references" / f"ref_{i:02d}.png")

        bar = tqdm(total=len(self.story), initial=start, desc="shots", unit="shot",
                   disable=not (o.progress and self.is_main), file=sys.stderr)
        try:
            for shot in self.story.shots[start:]:
                self._render_shot(shot, bank, t2v_frames)
                bar.update(1)
        finally:
            bar.close()
        self.manifest["finished"] = len(self.manifest["shots"]) == len(self.story)
        self.manifest["timings"]["render_s"] = round(time.perf_counter() - t_run, 3)
        if self.is_main:
            self._write_manifest()
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
            if self._owns_process_group:
                dist.destroy_process_group()
        return self.manifest

    def _render_shot(self, shot, bank, t2v_frames=None):
        """Generate one shot, pick its keyframes into ``bank``, write its files, then list it as finished."""
        o = self.options
        mode = self.mode_for(shot)
        seed = shot_seed(shot, o.seed, o.seed_mode)
        t0 = time.perf_counter()
        if mode == "t2v":  # rendered before the I2V model loaded
            frames, entries = t2v_frames, []
            t_generate = self.timings.get("t2v_generate_s", 0.0)
            memory_used = []
        else:
            position = {id(e): i for i, e in enumerate(bank.history())}
            frames, entries = self._generate(shot, mode, bank, seed)
            t_generate = time.perf_counter() - t0
            query = self.take_texts[shot.index] if o.memory_retrieval == "prompt" else None
            memory_used = [self._memory_record(e, position, query) for e in entries]
        t1 = time.perf_counter()
        indices, embeddings = self._select_keyframes(frames, bank)
        if indices:
            bank.add(frames[indices], shot=shot.index, embeddings=embeddings, frame_indices=indices,
                     text=self.take_texts[shot.index])
        bank.set_last_frames(frames, shot=shot.index)
        t2 = time.perf_counter()
        if not self.is_main:
            return
        files = self._write_shot_files(shot, frames, indices, bank)
        t3 = time.perf_counter()
        entry = {
            "index": shot.index, "stem": shot.file_stem, "scene": shot.scene, "shot_in_scene": shot.shot_in_scene,
            "prompt": shot.prompt, "cut": shot.cut, "mode": mode, "seed": seed, "num_frames": int(len(frames)),
            "height": int(frames.shape[1]), "width": int(frames.shape[2]), "fps": o.fps,
            "memory": memory_used, **files,
            "timings": {"generate_s": round(t_generate, 3), "keyframes_s": round(t2 - t1, 3),
                        "write_s": round(t3 - t2, 3)},
            "finished": _now(),
        }
        # The manifest names the shot only now that all its files are complete.
        self.manifest["shots"].append(entry)
        self._write_manifest()
        self._write_story_outputs()

    def _render_t2v_first_shot(self):
        """Shot 1 with Wan2.2-T2V-A14B; its experts are freed before the I2V experts load, and its text
        encoder, tokenizer and VAE (the same models as Wan2.2-I2V's) are handed on."""
        import torch

        t0 = time.perf_counter()
        self._log(f"loading {self.options.t2v_model} for the first shot")
        t2v = load_t2v_pipeline(self.options)
        _place(t2v, self.options, self.device)
        if self.options.parallel != "none":
            self._enable_context_parallel(t2v)
        t2v.set_progress_bar_config(desc="denoising", leave=False,
                                    disable=not (self.options.progress and self.is_main))
        self.timings["load_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        shot = self.story[0]
        frames, _ = self._generate(shot, "t2v", None, shot_seed(shot, self.options.seed, self.options.seed_mode),
                                   t2v=t2v)
        self.timings["t2v_generate_s"] = time.perf_counter() - t1
        t2v.remove_all_hooks()  # offload hooks; the shared models are placed again with the I2V pipeline
        shared = {"text_encoder": t2v.text_encoder, "tokenizer": t2v.tokenizer, "vae": t2v.vae}
        del t2v
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return frames, shared


def render_story(story, options: RenderOptions, pipe=None, selector=None) -> dict:
    """Validate, then render ``story`` (a :class:`~storymem.story.Story` or a path) into ``options.out_dir``.

    Returns the manifest. ``pipe``: an already loaded StoryMemPipeline to use instead of loading one (see
    :func:`load_render_pipeline`); ``selector``: an already built keyframe selector (see
    :func:`build_selector`). Both let several renders share their models."""
    from .story import Story, load_story

    if not isinstance(story, Story):
        story = load_story(story)
    return StoryRenderer(prepare(story, options, selector=selector), pipe=pipe).run()


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m storymem render",
        description="Render a story script shot by shot with StoryMem's visual memory (Wan2.2-I2V-A14B + "
                    "M2V LoRA). Rerun the same command to resume an interrupted render.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("story and output")
    g.add_argument("--story", help="story script: ST-Bench JSON, a JSON list of prompts, or a .txt (one prompt a line)")
    g.add_argument("--demo", action="store_true",
                   help="render the bundled demo story with the small world's trained model and its M2V adapter on "
                        "the CPU (--base toy --lora toy)")
    g.add_argument("--out", help="output folder (default: outputs/<story file name>, or storymem_demo for --demo)")
    g.add_argument("--from-shot", help="re-render from this shot on (number 1..N or file stem like 02_01), "
                                       "restoring the memory saved after the previous shot")
    g.add_argument("--force", action="store_true", help="start over even if the folder holds a render with "
                                                        "other settings")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")

    g = p.add_argument_group("models")
    g.add_argument("--base", help="Wan2.2-I2V diffusers folder or hub id; 'toy' (the small world's trained model) or "
                                  f"'tiny' (random weights, smoke runs) (default: {DEFAULT_BASE})")
    g.add_argument("--lora", help="StoryMem adapter: storymem adapter folder, published Wan2.2-MI2V-A14B / "
                                  "Wan2.2-MM2V-A14B folder, hub id, or 'toy' (the small world's adapter)")
    g.add_argument("--lora-scale", type=float, default=1.0,
                   help="weight of the adapter's LoRA layers (1: as trained; 0: the base alone)")
    g.add_argument("--t2v-model", help="Wan2.2-T2V-A14B diffusers folder or hub id for the first shot")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on CUDA, float32 for the toy model or on CPU); the VAE "
                        "runs in float32")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                   help="diffusers CPU offload: model (enable_model_cpu_offload) or sequential")
    g.add_argument("--parallel", default="none", choices=["none", "ulysses", "ring"],
                   help="context parallelism over the GPUs of a torchrun launch")
    g.add_argument("--attention-backend", help="diffusers attention backend (e.g. _native_cudnn, flash); ring "
                                               "attention defaults to _native_cudnn")

    g = p.add_argument_group("shot 1")
    g.add_argument("--first-shot", default="m2v", choices=FIRST_SHOTS,
                   help="without --t2v-model, --first-image or --reference-images: M2V on an empty memory, or "
                        "'base': the base alone, adapter off (for bases that draw from text, like --base toy)")
    g.add_argument("--first-image", help="start shot 1 from this image (plain I2V)")
    g.add_argument("--reference-images", nargs="+", default=[], metavar="IMAGE",
                   help="MR2V: images that seed the memory; shot 1 is M2V on them")

    g = p.add_argument_group("sampling")
    g.add_argument("--height", type=int, help="frame height, multiple of 16 (default: from --area and the "
                                              "conditioning image's aspect ratio)")
    g.add_argument("--width", type=int, help="frame width, multiple of 16")
    g.add_argument("--area", type=int, help="pixel area for the default size (default 832*480; toy 64*64)")
    g.add_argument("--frames", type=int, help="frames per shot, 4n+1 (default 81; toy 17)")
    g.add_argument("--fps", type=int, default=16)
    g.add_argument("--steps", type=int, help="denoising steps (default 40; toy 8)")
    g.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance (high-noise expert)")
    g.add_argument("--guidance-2", type=float, help="guidance of the low-noise expert (default: --guidance)")
    g.add_argument("--memory-guidance", type=float, default=1.0,
                   help="guidance towards the memory frames (1 = off; above 1 one more model call per step)")
    g.add_argument("--shift", type=float, help="UniPC flow shift (default 4.0; toy 3.0)")
    g.add_argument("--negative-prompt", help="default: Wan's negative prompt (toy: the empty prompt); pass '' "
                                             "for none")
    g.add_argument("--t2v-shift", type=float, default=T2V_DEFAULTS["shift"], help="flow shift of the T2V model")
    g.add_argument("--t2v-guidance", type=float, default=T2V_DEFAULTS["guidance"],
                   help="T2V guidance, high-noise expert")
    g.add_argument("--t2v-guidance-2", type=float, default=T2V_DEFAULTS["guidance_2"],
                   help="T2V guidance, low-noise expert")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--seed-mode", default="global", choices=["global", "scene"],
                   help="shot seed = seed + global shot index, or + index within the scene (the release)")

    g = p.add_argument_group("memory")
    g.add_argument("--max-memory", type=int, default=10, help="memory frames a shot sees at most")
    g.add_argument("--sink", type=int, default=3, help="oldest memory frames always kept")
    g.add_argument("--memory-rope", choices=["negative", "contiguous"], help="default: the adapter's")
    g.add_argument("--continuation", default="auto", choices=list(CONTINUATIONS),
                   help="how a cut:false shot continues the previous one (auto: the adapter's conditioning; "
                        "none: it starts from its prompt and the memory, like a cut)")
    g.add_argument("--memory-source", default="keyframes", choices=list(MEMORY_SOURCES),
                   help="what the memory bank receives after each shot: the selected keyframes, only the "
                        "shot's first frame, or nothing (every shot without memory)")
    g.add_argument("--memory-retrieval", default="window", choices=["window", "prompt"],
                   help="which remembered frames a shot sees: the sink + sliding window (the release), or "
                        "'prompt': the frames whose take (shot + the shots it continues) reads most like the shot's "
                        "text (TF-IDF over the story's prompts)")
    g.add_argument("--memory-min-relevance", type=float, default=0.0,
                   help="with --memory-retrieval prompt: leave out takes whose relevance (cosine) is below this")
    g.add_argument("--memory-relative-relevance", type=float, default=0.0,
                   help="with --memory-retrieval prompt: leave out takes below this share of the best take's "
                        "relevance (e.g. 0.8 keeps another character's shots out of memory)")
    g.add_argument("--embedder", help="keyframe similarity: open_clip 'MODEL:TAG' or 'MODEL:CHECKPOINT', a "
                                      "local checkpoint (ViT-B-32), 'hf-hub:...', or 'pixel' (default "
                                      "ViT-B-32:openai; toy: pixel)")
    g.add_argument("--aesthetic", choices=["hpsv3", "none"], help="keyframe quality filter (default hpsv3; "
                                                                  "toy: none)")
    g.add_argument("--hpsv3-checkpoint", help="HPSv3.safetensors file/folder or hub id (default MizzenAI/HPSv3)")
    g.add_argument("--hpsv3-base", help="Qwen2-VL-7B-Instruct folder or hub id for HPSv3")
    g.add_argument("--keyframe-threshold", type=float, default=0.9, help="initial CLIP similarity threshold")
    return p


def options_from_args(args: argparse.Namespace) -> tuple[Any, RenderOptions]:
    """(story, options) from parsed flags; the story is loaded (and validated) here."""
    from .story import load_story

    if args.demo and args.story:
        raise RenderError("pass --story or --demo, not both")
    if not args.demo and not args.story:
        raise RenderError("no story: pass --story FILE (or --demo for the bundled demo)")
    if args.demo and args.base not in (None, *BUILTIN_BASES):
        raise RenderError("--demo renders with the small world's built-in model; drop --base or use --story")
    story_path = DEMO_STORY if args.demo else Path(args.story)
    story = load_story(story_path)

    base = (args.base or "toy") if args.demo else (args.base or DEFAULT_BASE)
    toy = base in BUILTIN_BASES
    # The demo is the small world's model with its M2V adapter; the toy model draws 64x64 squares.
    lora = args.lora or ("toy" if args.demo and base == "toy" else None)
    square = toy and args.height is None and args.width is None and args.area is None
    default_out = "storymem_demo" if args.demo else str(Path("outputs") / story_path.stem)
    options = RenderOptions(
        out_dir=Path(args.out or default_out),
        base=base,
        lora=lora,
        lora_scale=args.lora_scale,
        t2v_model=args.t2v_model,
        first_image=Path(args.first_image) if args.first_image else None,
        reference_images=[Path(p) for p in args.reference_images],
        first_shot=args.first_shot,
        dtype=args.dtype,
        height=TOY_SIZE if square else args.height,
        width=TOY_SIZE if square else args.width,
        area=args.area or (TOY_DEFAULTS["area"] if toy else 832 * 480),
        frames=args.frames or (TOY_DEFAULTS["frames"] if toy else 81),
        fps=args.fps,
        steps=args.steps or (TOY_DEFAULTS["steps"] if toy else 40),
        guidance=args.guidance,
        guidance_2=args.guidance_2,
        memory_guidance=args.memory_guidance,
        shift=args.shift if args.shift is not None else (TOY_DEFAULTS["shift"] if toy else 4.0),
        negative_prompt=args.negative_prompt if args.negative_prompt is not None else (
            TOY_DEFAULTS["negative_prompt"] if toy else None),
        t2v_shift=args.t2v_shift,
        t2v_guidance=args.t2v_guidance,
        t2v_guidance_2=args.t2v_guidance_2,
        seed=args.seed,
        seed_mode=args.seed_mode,
        max_memory=args.max_memory,
        sink=args.sink,
        memory_rope=args.memory_rope,
        continuation=args.continuation,
        memory_source=args.memory_source,
        memory_retrieval=args.memory_retrieval,
        memory_min_relevance=args.memory_min_relevance,
        memory_relative_relevance=args.memory_relative_relevance,
        embedder=args.embedder or (TOY_DEFAULTS["embedder"] if toy else "ViT-B-32:openai"),
        aesthetic=args.aesthetic or (TOY_DEFAULTS["aesthetic"] if toy else "hpsv3"),
        hpsv3_checkpoint=args.hpsv3_checkpoint,
        hpsv3_base=args.hpsv3_base,
        keyframe_threshold=args.keyframe_threshold,
        offload=args.offload,
        device=args.device or ("cpu" if args.demo else None),
        parallel=args.parallel,
        attention_backend=args.attention_backend,
        from_shot=args.from_shot,
        force=args.force,
        progress=not args.no_progress,
    )
    return story, options


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit code (2: bad input, nothing loaded or written; 130: interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)

    from .memory import MemoryBankError
    from .story import StoryError

    try:
        story, options = options_from_args(args)
        plan = prepare(story, options)
    except (RenderError, StoryError, MemoryBankError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    renderer = StoryRenderer(plan)
    try:
        manifest = renderer.run()
    except KeyboardInterrupt:
        done = len(renderer.manifest.get("shots", []))
        if renderer.is_main:
            print(f"\ninterrupted: {done} of {len(story)} shots are finished in {options.out_dir}; rerun the same "
                  "command to continue", file=sys.stderr)
        return 130
    except RenderError as err:  # found only once a model is loaded (e.g. the adapter's continuation mode)
        print(f"error: {err}", file=sys.stderr)
        return 2
    if renderer.is_main:
        out = Path(options.out_dir)
        done = len(manifest["shots"])
        print(f"{done} of {len(story)} shots of {story.name!r} rendered in {out}/")
        if done:
            print(f"  story video:   {out / 'story.mp4'}\n  page:          {out / 'index.html'}\n"
                  f"  contact sheet: {out / 'contact_sheet.png'}\n  shots:         {out / 'shots'}/\n"
                  f"  manifest:      {out / MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
