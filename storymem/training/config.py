"""The settings of ``prepare`` and ``train``: one dataclass each, and the one description of every option.

Each field carries its help text and ``--help`` group (:func:`storymem.arguments.option`); the command line
(:mod:`storymem.training.cli`) is generated from them, and ``validate`` checks what a parser cannot: every
number against its real range (NaN and infinity never pass; a zero is never read as "use the default"). A
setting that is out of range raises :class:`~storymem.training.errors.TrainingConfigError` naming the field.
Limits that depend on the base model (its rope table) are checked where the base is known
(:func:`storymem.training.models.check_sizes_fit_base`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..arguments import option
from ..builtin import BUILTIN_SAMPLING, is_builtin
from ..defaults import BOUNDARY_RATIO, FPS, FRAMES, GUIDANCE, HEIGHT, MAX_MEMORY, WAN_I2V_BASE, WIDTH
from ..devices import DTYPE_NAMES
from .cache import CONTEXT_KINDS
from .errors import TrainingConfigError
from .flow import EXPERTS, TRAIN_FLOW_SHIFT

__all__ = ["PrepareConfig", "TrainConfig", "LR_SCHEDULERS", "SEED_MAX"]

BASE_HELP = ('Wan2.2-I2V diffusers folder or hub id; "toy": the small world\'s base shipped with storymem, '
             '"tiny": random-weight components (smoke runs in seconds on the CPU)')
# diffusers' get_scheduler names (piecewise_constant needs step rules this trainer does not take).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Latent cells: VAE stride 8 x patch 2 in space; 4 frames per latent frame after the first in time.
SIZE_MULTIPLE, TEMPORAL_SCALE = 16, 4
SEED_MAX = 2 ** 32 - 1  # numpy's seeds are 32-bit
MAX_FPS = 1000.0  # resampling to more would repeat every source frame many times over
MAX_TEXT_TOKENS = 512  # Wan's text encoder is trained on (and its pipelines pad to) 512 tokens
MAX_WORKERS = 256  # decoding threads / loader processes: each holds decoded videos in memory


def _check(condition: bool, option_name: str, detail: str):
    if not condition:
        raise TrainingConfigError(detail, option=option_name)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(obj, name: str, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, optional: bool = False):
    """Raise naming ``name`` unless ``obj.name`` is a finite number (a whole one with ``integer``) within the
    bounds (``None``: unbounded on that side; ``*_open``: the bound itself excluded; ``optional``: None passes)."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    typed = _is_number(value) and (not integer or isinstance(value, int))
    if typed and (low is None or (value > low if low_open else value >= low)) \
            and (high is None or (value < high if high_open else value <= high)):
        return
    if low is not None and high is not None:
        expected = f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    elif low is not None:
        expected = f"{'>' if low_open else '>='} {_fmt(low)}"
    elif high is not None:
        expected = f"{'<' if high_open else '<='} {_fmt(high)}"
    else:
        expected = "finite"
    kind = "" if typed else ("a whole number " if integer else "a finite number ")
    raise TrainingConfigError(f"must be {kind}{expected}, got {value!r}", option=name)


def _fmt(bound) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _contexts(value) -> tuple[str, ...]:
    """``("mi2v", "mm2v")`` from ``"mi2v,mm2v"``, ``["mi2v", "mm2v"]``, ``["mi2v,mm2v"]`` or ``"none"``."""
    items = [value] if isinstance(value, str) else list(value or ())
    names = [name.strip().lower() for item in items for name in str(item).split(",") if name.strip()]
    return () if names == ["none"] else tuple(names)


@dataclass(kw_only=True)
class PrepareConfig:
    """What :func:`~storymem.training.prepare_dataset` builds (``prepare``). Sizes must match what the adapter
    will be trained and used at."""

    clips_dir: Optional[Path] = option(
        None, flag="--clips", metavar="FOLDER", group="clips",
        help="folder of videos with sidecar captions (<name>.txt) and, optionally, subject masks (<name>.mask.mp4)")
    manifest: Optional[Path] = option(
        None, metavar="JSONL", group="clips",
        help='JSONL manifest, one {"file", "caption"[, "start", "end" (seconds), "group", "mask"]} per line')
    caption_ext: str = option(".txt", group="clips", help="extension of the sidecar caption files")
    split_shots: bool = option(False, group="clips",
                               help="cut videos into shots with PySceneDetect (pip install scenedetect[opencv])")
    shot_threshold: float = option(27.0, group="clips", help="ContentDetector threshold of --split-shots")
    min_shot_seconds: float = option(1.0, group="clips", help="shorter shots are dropped (--split-shots)")

    output_dir: Path = option(flag="--out", metavar="FOLDER", required=True, group="prepared dataset",
                              help="prepared dataset folder")
    base: str = option(WAN_I2V_BASE, group="prepared dataset", help=BASE_HELP)
    height: Optional[int] = option(
        None, group="prepared dataset",
        help=f"frame height, a multiple of 16 (default: {HEIGHT}; {BUILTIN_SAMPLING['height']} with a built-in "
             "--base)")
    width: Optional[int] = option(
        None, group="prepared dataset",
        help=f"frame width, a multiple of 16 (default: {WIDTH}; {BUILTIN_SAMPLING['width']} with a built-in --base)")
    num_frames: Optional[int] = option(
        None, group="prepared dataset",
        help=f"frames per clip, 4n+1 (default: {FRAMES}; {BUILTIN_SAMPLING['frames']} with a built-in --base)")
    fps: float = option(float(FPS), group="prepared dataset", help="clips are resampled to this frame rate")
    window: str = option("center", choices=("center", "start"), group="prepared dataset",
                         help="which --num-frames window of a longer clip to keep")
    memory_candidates: int = option(4, group="prepared dataset",
                                    help="frames per clip cached as memory images for the other clips of its cluster")
    contexts: tuple[str, ...] = option(
        ("mi2v",), metavar="NAME", group="prepared dataset",
        help="video conditions to cache: mi2v (first frame), mm2v (first 5 frames), comma or space separated, or "
             "none")
    cache_dtype: str = option("bfloat16", choices=DTYPE_NAMES, group="prepared dataset",
                              help="dtype of the cached tensors")
    shard_size: int = option(32, group="prepared dataset", help="clips per safetensors shard")
    max_sequence_length: int = option(512, group="prepared dataset", help="text tokens of a caption")
    overwrite: bool = option(False, group="prepared dataset", help="replace an existing prepared dataset")

    cluster_size: int = option(16, group="clusters", help="target clips per cluster")
    max_cluster_size: Optional[int] = option(None, group="clusters",
                                             help="largest cluster (default: 2 x --cluster-size)")
    embedder: Optional[str] = option(
        None, choices=("clip", "pixel"), group="clusters",
        help="clip: open_clip image embeddings (weights downloaded once); pixel: thumbnails (no weights) "
             "(default: clip; pixel with a built-in --base)")
    clip_model: str = option("ViT-B-32", group="clusters", help="open_clip model of --embedder clip")
    clip_pretrained: Optional[str] = option("openai", group="clusters", help="open_clip tag or checkpoint file")
    seed: int = option(0, group="clusters", help="seed of the clustering")

    device: Optional[str] = option(None, group="run",
                                   help="encoding device (default: cuda when a GPU is present, else cpu)")
    decode_workers: int = option(4, group="run", help="threads decoding videos (each an ffmpeg process)")
    encode_batch_size: int = option(
        1, group="run", help="clips per VAE / text-encoder call (small sizes encode much faster in batches)")
    progress: bool = option(True, group="run", help="progress bars (default: on)")

    def __post_init__(self):
        self.contexts = _contexts(self.contexts)

    def resolved(self) -> "PrepareConfig":
        """A copy with the settings left to the base filled in: sizes and embedder of the built-in models
        (:data:`storymem.builtin.BUILTIN_SAMPLING`) for ``toy``/``tiny``, the release's for any other base."""
        builtin = is_builtin(self.base)
        defaults = dict(height=BUILTIN_SAMPLING["height"] if builtin else HEIGHT,
                        width=BUILTIN_SAMPLING["width"] if builtin else WIDTH,
                        num_frames=BUILTIN_SAMPLING["frames"] if builtin else FRAMES,
                        embedder=BUILTIN_SAMPLING["embedder"] if builtin else "clip")
        return dataclasses.replace(self, **{name: value for name, value in defaults.items()
                                            if getattr(self, name) is None})

    def validate(self):
        """Raise :class:`TrainingConfigError` naming the first invalid setting (sizes left to the base are
        checked as :meth:`resolved` fills them in)."""
        config = self.resolved()
        _check(config.clips_dir is not None or config.manifest is not None, "clips_dir",
               "give a clips folder (--clips) or a manifest (--manifest)")
        _check(config.clips_dir is None or Path(config.clips_dir).is_dir(), "clips_dir",
               f"{config.clips_dir}: folder not found")
        _check(config.manifest is None or Path(config.manifest).is_file(), "manifest",
               f"{config.manifest}: file not found")
        _check(not Path(config.output_dir).exists() or Path(config.output_dir).is_dir(), "output_dir",
               f"{config.output_dir} is a file, not a folder")
        ext = config.caption_ext
        _check(isinstance(ext, str) and ext.startswith(".") and len(ext) > 1, "caption_ext",
               f"must be a file extension such as .txt, got {ext!r}")
        _check_range(config, "shot_threshold", 0, 255, low_open=True)  # ContentDetector's scores are 0..255
        _check_range(config, "min_shot_seconds", 0)
        for name in ("height", "width"):
            _check_range(config, name, 0, low_open=True, integer=True)
            _check(not getattr(config, name) % SIZE_MULTIPLE, name,
                   f"must be a multiple of {SIZE_MULTIPLE}, got {getattr(config, name)}")
        _check_range(config, "num_frames", 1, integer=True)
        _check(not (config.num_frames - 1) % TEMPORAL_SCALE, "num_frames",
               f"must be of the form {TEMPORAL_SCALE}n+1 (e.g. 81), got {config.num_frames}")
        _check_range(config, "fps", 0, MAX_FPS, low_open=True)
        _check_range(config, "memory_candidates", 1, config.num_frames, integer=True)
        _check_range(config, "cluster_size", 2, integer=True)
        _check_range(config, "max_cluster_size", config.cluster_size, integer=True, optional=True)
        _check_range(config, "seed", 0, SEED_MAX, integer=True)
        unknown = [c for c in config.contexts if c not in CONTEXT_KINDS]
        _check(not unknown, "contexts", f"unknown {unknown}; expected some of {', '.join(CONTEXT_KINDS)} or none")
        for context in config.contexts:
            _check(CONTEXT_KINDS[context] < config.num_frames, "contexts",
                   f"{context} needs more than {CONTEXT_KINDS[context]} frames, got {config.num_frames}")
        _check(config.cache_dtype in DTYPE_NAMES, "cache_dtype",
               f"must be one of {', '.join(DTYPE_NAMES)}, got {config.cache_dtype!r}")
        _check_range(config, "shard_size", 1, integer=True)
        _check_range(config, "max_sequence_length", 1, MAX_TEXT_TOKENS, integer=True)
        _check_range(config, "decode_workers", 1, MAX_WORKERS, integer=True)
        _check_range(config, "encode_batch_size", 1, integer=True)
        _check(config.embedder in ("clip", "pixel"), "embedder", f"must be clip or pixel, got {config.embedder!r}")
        _check(config.window in ("center", "start"), "window", f"must be center or start, got {config.window!r}")


@dataclass(kw_only=True)
class TrainConfig:
    """Hyperparameters of a training run (``train``)."""

    lora_config: str = option(flag="--config", metavar="JSON", required=True, group="run",
                              help="adapter config (lora_configs/*.json)")
    data_dir: str = option(flag="--data", metavar="FOLDER", required=True, group="run",
                           help="prepared dataset folder (prepare)")
    output_dir: str = option(flag="--output", metavar="FOLDER", required=True, group="run",
                             help="run folder (adapters, checkpoints, logs)")
    base: str = option(WAN_I2V_BASE, group="run", help=BASE_HELP)
    expert: str = option("high", choices=tuple(EXPERTS), group="run",
                         help="high: transformer (t >= boundary); low: transformer_2 (t < boundary); all: the "
                              "transformer of a single-expert base, every t")
    seed: int = option(0, group="run", help="seed of the LoRA initialisation, the sampler and the noise")
    resume_from_checkpoint: Optional[str] = option(
        None, flag="--resume", metavar="CHECKPOINT", group="run",
        help='"latest" (the newest complete checkpoint of --output) or a checkpoint-N folder to continue from')
    overwrite: bool = option(False, group="run",
                             help="start clean in an --output that holds an earlier run: delete its checkpoints, "
                                  "adapter, logs and validation renders first (without it, such a folder is "
                                  "refused unless --resume continues it)")

    train_batch_size: int = option(1, group="optimisation", help="samples per device and step")
    gradient_accumulation_steps: int = option(1, group="optimisation", help="batches per optimizer step")
    max_train_steps: int = option(2000, group="optimisation", help="optimizer steps of the run")
    max_train_minutes: Optional[float] = option(
        None, group="optimisation",
        help="stop after this much wall time, saving a checkpoint and the adapter (e.g. to fit a job's time "
             "limit); --resume latest continues")
    learning_rate: float = option(1e-4, group="optimisation", help="peak learning rate of the LoRA weights")
    lr_scheduler: str = option("constant", choices=LR_SCHEDULERS, group="optimisation",
                               help="learning-rate schedule")
    lr_warmup_steps: int = option(0, group="optimisation", help="warm-up steps of the schedule")
    lr_num_cycles: int = option(1, group="optimisation", help="cycles of cosine_with_restarts")
    lr_power: float = option(1.0, group="optimisation", help="power of the polynomial schedule")
    adam_beta1: float = option(0.9, group="optimisation", help="AdamW beta1")
    adam_beta2: float = option(0.999, group="optimisation", help="AdamW beta2")
    adam_weight_decay: float = option(1e-4, group="optimisation", help="AdamW weight decay")
    adam_epsilon: float = option(1e-8, group="optimisation", help="AdamW epsilon")
    use_8bit_adam: bool = option(False, group="optimisation", help="bitsandbytes AdamW8bit")
    max_grad_norm: float = option(1.0, group="optimisation", help="gradient clipping norm (0: off)")
    mixed_precision: Optional[str] = option(
        None, choices=("no", "bf16", "fp16"), group="optimisation",
        help="compute precision (default: accelerate's config, else bf16 on a GPU and no on the CPU)")
    gradient_checkpointing: bool = option(True, group="optimisation",
                                          help="recompute activations in the backward pass, saving memory "
                                               "(default: on)")
    allow_tf32: bool = option(False, group="optimisation", help="TF32 matmuls on GPUs that have them")
    dataloader_num_workers: int = option(0, group="optimisation", help="processes loading batches")

    flow_shift: float = option(TRAIN_FLOW_SHIFT, group="recipe", help="Wan's timestep shift of the noise levels")
    boundary_ratio: float = option(BOUNDARY_RATIO, group="recipe",
                                   help="the experts' boundary: the high-noise expert takes t >= ratio x 1000")
    min_memory: int = option(1, group="recipe", help="fewest memory frames of a sample")
    max_memory: int = option(MAX_MEMORY, group="recipe", help="most memory frames of a sample")
    mi2v_prob: Optional[float] = option(
        None, group="recipe",
        help="probability of also conditioning on the target's first frame (5 frames for mm2v adapters) "
             "(default: 0.5, 0 for m2v adapters)")
    loss_on_memory: bool = option(False, group="recipe", help="include the memory positions in the loss")
    subject_loss_weight: float = option(
        1.0, group="recipe",
        help="weight of the latent cells the subject masks cover (prepared from clips with mask videos), against "
             "1 for the rest; 1 is a plain mean")
    caption_dropout: float = option(0.0, group="recipe", help="probability of training a sample on the empty prompt")
    no_memory_prob: float = option(0.0, group="recipe",
                                   help="share of batches without memory frames, as a story's first shot")
    distractor_prob: float = option(
        0.0, group="recipe",
        help="share of samples with 3+ memory frames in which one frame comes from a clip of another cluster, as "
             "a story's bank holds other characters' shots")
    preserve_base_weight: float = option(
        0.0, group="recipe",
        help="on batches without memory, add this weight times the squared distance to the base's own prediction "
             "(adapter off), so the adapter leaves memory-free shots as the base draws them; needs "
             "--no-memory-prob; 0 is off")

    checkpointing_steps: int = option(500, group="checkpoints and logs", help="save a checkpoint every N steps")
    checkpoints_total_limit: Optional[int] = option(None, group="checkpoints and logs",
                                                    help="keep at most this many checkpoints (default: all)")
    report_to: Optional[str] = option("tensorboard", group="checkpoints and logs",
                                      help='"tensorboard", "none", or another tracker accelerate knows')
    validation_steps: int = option(0, group="checkpoints and logs",
                                   help="render a validation story every N steps (0: never)")
    validation_shots: int = option(3, group="checkpoints and logs", help="shots of the validation story")
    validation_inference_steps: int = option(30, group="checkpoints and logs",
                                             help="denoising steps of a validation shot")
    validation_guidance_scale: float = option(GUIDANCE, group="checkpoints and logs",
                                              help="guidance scale of the validation renders")
    validation_other_expert: str = option("base", choices=("base", "none"), group="checkpoints and logs",
                                          help="base: render with the base's other expert; none: the trained "
                                               "expert alone")
    validation_cluster: int = option(0, group="checkpoints and logs",
                                     help="cluster whose captions make the validation story")

    skip_bad_shards: bool = option(False, group="data checks",
                                   help="drop the clips of unreadable cache shards (counted) instead of stopping")
    verify_data: bool = option(False, group="data checks", help="check every shard's sha256 before training")

    def validate(self):
        """Raise :class:`TrainingConfigError` naming the first invalid setting."""
        _check(self.expert in EXPERTS, "expert", f"must be one of {', '.join(EXPERTS)}, got {self.expert!r}")
        output = Path(self.output_dir)
        _check(not output.exists() or output.is_dir(), "output_dir", f"{output} is a file, not a folder")
        _check(output.resolve() != Path(self.data_dir).resolve(), "output_dir",
               "is the prepared dataset folder; give the run a folder of its own")
        _check(not (self.overwrite and self.resume_from_checkpoint), "overwrite",
               "starts the run again, --resume continues it: give one of them")
        _check_range(self, "seed", 0, SEED_MAX, integer=True)
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
            _check_range(self, name, 1, integer=True)
        _check_range(self, "checkpoints_total_limit", 1, integer=True, optional=True)
        _check_range(self, "max_train_minutes", 0, low_open=True, optional=True)
        # Above 1 an AdamW step moves each LoRA weight by about the learning rate: the run diverges at once.
        _check_range(self, "learning_rate", 0, 1, low_open=True)
        _check(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler",
               f"must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        _check_range(self, "lr_warmup_steps", 0, integer=True)
        _check_range(self, "lr_num_cycles", 1, integer=True)
        _check_range(self, "lr_power", 0, low_open=True)
        for name in ("adam_beta1", "adam_beta2"):
            _check_range(self, name, 0, 1, high_open=True)
        _check_range(self, "adam_weight_decay", 0)
        _check_range(self, "adam_epsilon", 0, 1, low_open=True, high_open=True)
        _check_range(self, "max_grad_norm", 0)
        _check(self.mixed_precision in (None, "no", "bf16", "fp16"), "mixed_precision",
               f"must be no, bf16 or fp16, got {self.mixed_precision!r}")
        _check_range(self, "dataloader_num_workers", 0, MAX_WORKERS, integer=True)
        _check_range(self, "flow_shift", 0, low_open=True)
        _check_range(self, "boundary_ratio", 0, 1, low_open=True, high_open=True)
        _check_range(self, "min_memory", 0, integer=True)
        _check_range(self, "max_memory", self.min_memory, integer=True)
        _check_range(self, "mi2v_prob", 0, 1, optional=True)
        for name in ("caption_dropout", "no_memory_prob", "distractor_prob"):
            _check_range(self, name, 0, 1)
        _check_range(self, "subject_loss_weight", 0, low_open=True)
        _check_range(self, "preserve_base_weight", 0)
        _check(self.preserve_base_weight == 0 or self.no_memory_prob > 0 or self.min_memory == 0,
               "preserve_base_weight", "acts on batches without memory frames; give them a share with "
               "no_memory_prob (or min_memory 0)")
        _check_range(self, "validation_steps", 0, integer=True)
        _check_range(self, "validation_shots", 1, integer=True)
        _check_range(self, "validation_inference_steps", 1, 1000, integer=True)
        _check_range(self, "validation_guidance_scale", 0)
        _check(self.validation_other_expert in ("base", "none"), "validation_other_expert",
               f"must be base or none, got {self.validation_other_expert!r}")
        _check_range(self, "validation_cluster", 0, integer=True)


# ---------------------------------------------------------------------------------------------- adapter config
def _whole(low):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"a whole number >= {low}"


def _names(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)


# What each field of an adapter config (lora_configs/*.json) must hold: (check, what it should be).
_ADAPTER_FIELDS = {
    "rank": _whole(1),
    "alpha": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (_names, "a non-empty list of module names"),
    "memory_rope": (lambda v: v in ("negative", "contiguous"), '"negative" or "contiguous"'),
    "memory_rope_stride": _whole(1),
    "conditioning": (lambda v: v in ("m2v", "mi2v", "mm2v"), '"m2v", "mi2v" or "mm2v"'),
    "experts": (lambda v: _names(v) and set(v) <= {"transformer", "transformer_2"},
                'a list of "transformer" and/or "transformer_2"'),
    "base_model": (lambda v: v is None or isinstance(v, str), "a hub id, a folder or null"),
    "source": (lambda v: isinstance(v, str), "a string"),
}


def read_lora_config(path):
    """The :class:`~storymem.lora.StoryMemLoraConfig` of an adapter config file, each field checked for its type
    and range first: a bad value raises :class:`TrainingConfigError` naming the file and the field."""
    import json

    from ..lora import StoryMemLoraConfig

    path = Path(path)
    if not path.is_file():
        raise TrainingConfigError(f"{path}: adapter config not found" if not path.exists() else
                                  f"{path}: not a file", option="lora_config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TrainingConfigError(f"{path}: expected a JSON object of adapter settings")
    unknown = sorted(set(data) - set(_ADAPTER_FIELDS))
    if unknown:
        raise TrainingConfigError(f"{path}: unknown field {unknown[0]!r}; known: {', '.join(_ADAPTER_FIELDS)}")
    for name, value in data.items():
        valid, expected = _ADAPTER_FIELDS[name]
        if not valid(value):
            raise TrainingConfigError(f"{path}: field {name!r} must be {expected}, got {json.dumps(value)}")
    return StoryMemLoraConfig.from_dict(data, source=str(path))
