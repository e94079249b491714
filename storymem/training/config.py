"""The settings of ``prepare`` and ``train``: one dataclass each, and the one description of every option.

Each field carries its help text and ``--help`` group (:func:`storymem.arguments.option`); the command line
(:mod:`storymem.training.cli`) is generated from them, and ``validate`` checks what a parser cannot. A setting
that is out of range raises :class:`~storymem.training.errors.TrainingConfigError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..arguments import option
from ..defaults import BOUNDARY_RATIO, FPS, FRAMES, GUIDANCE, HEIGHT, MAX_MEMORY, WAN_I2V_BASE, WIDTH
from ..devices import DTYPE_NAMES
from .cache import CONTEXT_KINDS
from .errors import TrainingConfigError
from .flow import EXPERTS, TRAIN_FLOW_SHIFT

__all__ = ["PrepareConfig", "TrainConfig", "LR_SCHEDULERS"]

BASE_HELP = ('Wan2.2-I2V diffusers folder or hub id; "toy": the small world\'s base shipped with storymem, '
             '"tiny": random-weight components (smoke runs in seconds on the CPU)')
# diffusers' get_scheduler names (piecewise_constant needs step rules this trainer does not take).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Latent cells: VAE stride 8 x patch 2 in space; 4 frames per latent frame after the first in time.
SIZE_MULTIPLE, TEMPORAL_SCALE = 16, 4


def _check(condition: bool, option_name: str, detail: str):
    if not condition:
        raise TrainingConfigError(detail, option=option_name)


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
    height: int = option(HEIGHT, group="prepared dataset", help="frame height, a multiple of 16")
    width: int = option(WIDTH, group="prepared dataset", help="frame width, a multiple of 16")
    num_frames: int = option(FRAMES, group="prepared dataset", help="frames per clip, 4n+1")
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
    embedder: str = option("clip", choices=("clip", "pixel"), group="clusters",
                           help="clip: open_clip image embeddings; pixel: thumbnails (no weights)")
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

    def validate(self):
        """Raise :class:`TrainingConfigError` naming the first invalid setting."""
        _check(self.clips_dir is not None or self.manifest is not None, "clips_dir",
               "give a clips folder (--clips) or a manifest (--manifest)")
        _check(self.height > 0 and self.width > 0 and not self.height % SIZE_MULTIPLE
               and not self.width % SIZE_MULTIPLE, "height",
               f"height and width must be positive multiples of {SIZE_MULTIPLE}, got {self.height}x{self.width}")
        _check(self.num_frames >= 1 and not (self.num_frames - 1) % TEMPORAL_SCALE, "num_frames",
               f"must be of the form {TEMPORAL_SCALE}n+1 (e.g. 81), got {self.num_frames}")
        _check(self.fps > 0, "fps", f"must be > 0, got {self.fps}")
        _check(self.memory_candidates >= 1, "memory_candidates", f"must be >= 1, got {self.memory_candidates}")
        _check(self.cluster_size >= 2, "cluster_size",
               f"must be >= 2 (memory comes from other clips), got {self.cluster_size}")
        _check(self.max_cluster_size is None or self.max_cluster_size >= self.cluster_size, "max_cluster_size",
               f"must be >= the cluster size ({self.cluster_size}), got {self.max_cluster_size}")
        unknown = [c for c in self.contexts if c not in CONTEXT_KINDS]
        _check(not unknown, "contexts", f"unknown {unknown}; expected some of {', '.join(CONTEXT_KINDS)} or none")
        for context in self.contexts:
            _check(CONTEXT_KINDS[context] < self.num_frames, "contexts",
                   f"{context} needs more than {CONTEXT_KINDS[context]} frames, got {self.num_frames}")
        _check(self.cache_dtype in DTYPE_NAMES, "cache_dtype",
               f"must be one of {', '.join(DTYPE_NAMES)}, got {self.cache_dtype!r}")
        for name in ("encode_batch_size", "decode_workers", "shard_size", "max_sequence_length"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.embedder in ("clip", "pixel"), "embedder", f"must be clip or pixel, got {self.embedder!r}")
        _check(self.window in ("center", "start"), "window", f"must be center or start, got {self.window!r}")


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
    resume_from_checkpoint: Optional[str] = option(None, flag="--resume", metavar="CHECKPOINT", group="run",
                                                   help='"latest" or a checkpoint-N folder to continue from')

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
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(0 <= self.min_memory <= self.max_memory, "min_memory",
               f"need 0 <= min_memory <= max_memory, got {self.min_memory}, {self.max_memory}")
        _check(self.mi2v_prob is None or 0 <= self.mi2v_prob <= 1, "mi2v_prob",
               f"must be in [0, 1], got {self.mi2v_prob}")
        for name in ("caption_dropout", "no_memory_prob", "distractor_prob"):
            _check(0 <= getattr(self, name) <= 1, name, f"must be in [0, 1], got {getattr(self, name)}")
        _check(self.preserve_base_weight >= 0, "preserve_base_weight",
               f"must be >= 0, got {self.preserve_base_weight}")
        _check(self.preserve_base_weight == 0 or self.no_memory_prob > 0 or self.min_memory == 0,
               "preserve_base_weight", "acts on batches without memory frames; give them a share with "
               "no_memory_prob (or min_memory 0)")
        _check(self.subject_loss_weight > 0, "subject_loss_weight", f"must be > 0, got {self.subject_loss_weight}")
        _check(self.flow_shift > 0, "flow_shift", f"must be > 0, got {self.flow_shift}")
        _check(0 < self.boundary_ratio < 1, "boundary_ratio", f"must be in (0, 1), got {self.boundary_ratio}")
        _check(self.mixed_precision in (None, "no", "bf16", "fp16"), "mixed_precision",
               f"must be no, bf16 or fp16, got {self.mixed_precision!r}")
        _check(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler",
               f"must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        _check(self.validation_other_expert in ("base", "none"), "validation_other_expert",
               f"must be base or none, got {self.validation_other_expert!r}")
        _check(self.max_train_minutes is None or self.max_train_minutes > 0, "max_train_minutes",
               f"must be > 0, got {self.max_train_minutes}")
        _check(self.validation_steps >= 0, "validation_steps", f"must be >= 0, got {self.validation_steps}")
