"""Training a StoryMem adapter on one Wan2.2 expert with accelerate (single GPU, DDP or FSDP).

Each run trains one expert (``--expert high`` -> ``transformer``, ``low`` -> ``transformer_2``; ``all`` for a
base with a single transformer) on timesteps of
its side of the boundary, and writes adapters :meth:`StoryMemPipeline.load_storymem_lora` loads::

    OUTPUT/
      adapter/                        final adapter (storymem_adapter.json + high_noise/low_noise.safetensors)
      checkpoint-500/                 resumable state (optimizer, scheduler, RNG, sampler position) ...
        adapter/                      ... and the adapter as of step 500 (also the weights resumed from)
      validation/step-000500.mp4      validation stories (with --validation-steps)
      logs/                           tensorboard
      train_config.json

Precision: the frozen base weights are kept in the mixed-precision dtype (bf16), the LoRA weights in fp32
(diffusers' ``cast_training_params``), compute under autocast. Under FSDP2 (``configs/accelerate_fsdp.yaml``)
the base stays bf16 and sharded and accelerate keeps the LoRA weights in fp32. FSDP1 needs one dtype per
flattened block, so there everything is loaded in fp32 (no memory saved on 2 GPUs) and ``--resume`` is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_write_json
from ..lora import EXPERT_FILES, StoryMemLoraConfig, add_storymem_adapter, save_storymem_lora
from .cache import PreparedDataset
from .data import MemoryBatchSampler, MemoryClipDataset, collate_samples
from .errors import DataError, TrainingConfigError
from .flow import EXPERTS
from .loss import flow_matching_loss

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "train", "ADAPTER_NAME"]

ADAPTER_NAME = "storymem"
CHECKPOINT_ADAPTER = "adapter"


@dataclass
class TrainConfig:
    """Hyperparameters of a training run (the ``train_lora.py train`` flags)."""

    lora_config: str
    data_dir: str
    output_dir: str
    base: str = "toy"
    expert: str = "high"
    seed: int = 0
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 2000
    max_train_minutes: Optional[float] = None  # stop (with a checkpoint) once this much wall time has passed
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    mixed_precision: Optional[str] = None  # None: accelerate's config, else bf16 on GPU, no on CPU
    gradient_checkpointing: bool = True
    allow_tf32: bool = False
    flow_shift: float = 5.0
    boundary_ratio: float = 0.9
    min_memory: int = 1
    max_memory: int = 10
    mi2v_prob: Optional[float] = None  # None: 0.5 for mi2v/mm2v adapters, 0 for m2v
    loss_on_memory: bool = False
    subject_loss_weight: float = 1.0  # weight of subject cells (prepared subject masks); 1 = a plain mean
    caption_dropout: float = 0.0
    no_memory_prob: float = 0.0  # share of batches without memory frames (a story's first shot)
    distractor_prob: float = 0.0  # share of samples (3+ memory frames) with one frame of another cluster
    preserve_base_weight: float = 0.0  # memory-free batches: weight of |v - v_base|^2 (the base's own prediction)
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    validation_steps: int = 0
    validation_shots: int = 3
    validation_inference_steps: int = 30
    validation_guidance_scale: float = 3.5
    validation_other_expert: str = "base"
    validation_cluster: int = 0
    report_to: Optional[str] = "tensorboard"
    dataloader_num_workers: int = 0
    skip_bad_shards: bool = False
    verify_data: bool = False

    def validate(self):
        if self.expert not in EXPERTS:
            raise TrainingConfigError(f"expert must be one of {sorted(EXPERTS)}, got {self.expert!r}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
            if getattr(self, name) < 1:
                raise TrainingConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_memory <= self.max_memory:
            raise TrainingConfigError(f"need 0 <= min_memory <= max_memory, got {self.min_memory}, {self.max_memory}")
        if self.mi2v_prob is not None and not 0 <= self.mi2v_prob <= 1:
            raise TrainingConfigError(f"mi2v_prob must be in [0, 1], got {self.mi2v_prob}")
        for name in ("caption_dropout", "no_memory_prob", "distractor_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrainingConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.preserve_base_weight < 0:
            raise TrainingConfigError(f"preserve_base_weight must be >= 0, got {self.preserve_base_weight}")
        if self.preserve_base_weight > 0 and self.no_memory_prob == 0 and self.min_memory > 0:
            raise TrainingConfigError("preserve_base_weight acts on batches without memory frames; give them a "
                                      "share with no_memory_prob (or min_memory 0)")
        if self.subject_loss_weight <= 0:
            raise TrainingConfigError(f"subject_loss_weight must be > 0, got {self.subject_loss_weight}")
        if self.flow_shift <= 0:
            raise TrainingConfigError(f"flow_shift must be > 0, got {self.flow_shift}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise TrainingConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.validation_other_expert not in ("base", "none"):
            raise TrainingConfigError(
                f"validation_other_expert must be base or none, got {self.validation_other_expert!r}")
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise TrainingConfigError(f"max_train_minutes must be > 0, got {self.max_train_minutes}")
        if self.validation_steps < 0:
            raise TrainingConfigError(f"validation_steps must be >= 0, got {self.validation_steps}")


@dataclass
class TrainResult:
    adapter_dir: Path
    global_step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this run (mean over processes)
    validation_videos: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- adapters
def _adapter_config(lora_config: StoryMemLoraConfig, base: str, component: str) -> StoryMemLoraConfig:
    from .models import base_identity, is_toy

    return dataclasses.replace(lora_config, experts=[component],
                               base_model=lora_config.base_model or (None if is_toy(base) else base_identity(base)))


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def lora_state_dict_from(named_tensors, adapter_name: str = ADAPTER_NAME) -> dict:
    """peft's saved-adapter naming from raw ``(name, tensor)`` pairs of a model carrying the adapter:
    ``blocks.0.attn1.to_q.lora_A.<adapter>.weight`` -> ``blocks.0.attn1.to_q.lora_A.weight``, wrapper prefixes
    (FSDP, activation checkpointing, compile) removed. Works on sharded/gathered state dicts whose module
    names no longer match the model's (where ``get_peft_model_state_dict`` finds nothing)."""
    out = {}
    for name, tensor in named_tensors:
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{adapter_name}."
            if marker in name:
                out[name.replace(marker, f".{part}.")] = tensor
    return out


def _gather_lora_state_dict(accelerator, model) -> dict:
    """Full LoRA weights of an FSDP-wrapped model (collective: every process must call it)."""
    unwrapped = accelerator.unwrap_model(model)
    expected = sum(1 for name, _ in unwrapped.named_parameters() if f".{ADAPTER_NAME}." in name and "lora_" in name)
    if getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.tensor import DTensor

        # Gather only the adapter's parameters, never the frozen base.
        pairs = [(name, param.full_tensor() if isinstance(param, DTensor) else param)
                 for name, param in unwrapped.named_parameters() if "lora_" in name]
    else:
        pairs = accelerator.get_state_dict(model).items()  # FSDP1: full state dict on the main process only
    if not accelerator.is_main_process:
        return {}
    state = lora_state_dict_from(pairs)
    if len(state) != expected:
        raise RuntimeError(f"gathered {len(state)} LoRA tensors from the sharded model, expected {expected}")
    return state


def export_adapter(accelerator, model, config: StoryMemLoraConfig, component: str, folder) -> Path:
    """Write the adapter of ``model`` to ``folder`` (main process writes; all processes must call it)."""
    from accelerate.utils import DistributedType

    folder = Path(folder)
    if accelerator.distributed_type == DistributedType.FSDP:
        state = _gather_lora_state_dict(accelerator, model)
        if accelerator.is_main_process:
            save_storymem_lora(folder, {component: state}, config)
    elif accelerator.is_main_process:
        save_storymem_lora(folder, {component: accelerator.unwrap_model(model)}, config, adapter_name=ADAPTER_NAME)
    accelerator.wait_for_everyone()
    return folder


def load_adapter_weights(model, folder: Path, component: str, config: StoryMemLoraConfig):
    """Load an adapter written by :func:`export_adapter` back into the training model (resume)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..lora import validate_lora_state_dict

    path = Path(folder) / EXPERT_FILES[component]
    if not path.is_file():
        raise DataError(f"{path}: checkpoint has no adapter weights for {component}")
    state_dict = load_file(str(path))
    validate_lora_state_dict(state_dict, model, config, str(path))
    prefix = "transformer."
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    set_peft_model_state_dict(model, state_dict, adapter_name=ADAPTER_NAME)


# ---------------------------------------------------------------------------------------------- checkpoints
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def resolve_checkpoint(output_dir: Path, resume: str) -> Optional[Path]:
    """``"latest"`` -> newest ``checkpoint-N`` in ``output_dir`` (or None); else the given folder."""
    if resume == "latest":
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir() or not _CHECKPOINT_RE.match(path.name):
        raise FileNotFoundError(f"{resume}: not a checkpoint folder (expected .../checkpoint-N)")
    return path


# ---------------------------------------------------------------------------------------------- train
def _mixed_precision(requested: Optional[str]) -> Optional[str]:
    if requested is not None:
        return requested
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # set by `accelerate launch` / its config file
    return "bf16" if torch.cuda.is_available() else "no"


def _make_optimizer(config: TrainConfig, params):
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                           weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


def _check_model_fits_data(model, data: PreparedDataset, config: TrainConfig, lora_config: StoryMemLoraConfig):
    z = data.latent_shape[0]
    if model.config.in_channels != 2 * z + 4 or model.config.out_channels != z:
        raise DataError(f"{data.root}: latents have {z} channels, the transformer takes {model.config.in_channels} "
                        f"in / {model.config.out_channels} out (expected an I2V model: 2*z+4 in)")
    if model.config.text_dim != data.index["text_dim"]:
        raise DataError(f"{data.root}: text embeddings are {data.index['text_dim']}-d, the transformer expects "
                        f"{model.config.text_dim} (prepared with another base?)")
    stride = lora_config.memory_rope_stride
    if lora_config.memory_rope == "negative" and config.max_memory * stride >= model.config.rope_max_seq_len:
        raise TrainingConfigError(f"{config.max_memory} memory frames at rope stride {stride} exceed the rope table "
                         f"({model.config.rope_max_seq_len})")


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; see the module docstring for what it writes."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    from ..rope import install_memory_rope
    from .models import base_identity, load_expert

    config.validate()
    lora_config = StoryMemLoraConfig.from_file(config.lora_config)
    component = EXPERTS[config.expert]
    context = lora_config.conditioning if lora_config.conditioning in ("mi2v", "mm2v") else None
    context_prob = config.mi2v_prob if config.mi2v_prob is not None else (0.5 if context else 0.0)
    if context is None and context_prob > 0:
        raise TrainingConfigError(f"{config.lora_config}: an m2v adapter has no context frames; --mi2v-prob must be 0")

    # Data first: a bad cache fails before any model is loaded.
    data = PreparedDataset(config.data_dir, skip_bad_shards=config.skip_bad_shards,
                           verify_checksums=config.verify_data)
    if context_prob > 0 and context not in data.contexts:
        raise DataError(f"{data.root}: the {lora_config.conditioning} adapter needs the {context!r} condition, "
                        f"which was not prepared (have {data.contexts}); re-run prepare with --contexts {context}")
    if config.subject_loss_weight != 1.0 and not data.has_subject_masks:
        raise DataError(f"{data.root}: --subject-loss-weight needs subject masks, and this dataset was prepared "
                        "without them; give each clip a mask video (a manifest's 'mask', or <name>.mask.mp4 beside "
                        "it in a folder) and re-run prepare")
    if data.base and data.base != base_identity(config.base):
        logger.warning("%s was prepared with base %s, training on %s: latents and text embeddings must come from "
                       "the same VAE and text encoder", data.root, data.base, base_identity(config.base))

    output_dir = Path(config.output_dir)
    report_to = config.report_to if config.report_to not in (None, "none") else None
    if report_to == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            logger.warning("tensorboard is not installed: training logs go to the console only")
            report_to = None
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=_mixed_precision(config.mixed_precision),
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    if is_fsdp and not getattr(accelerator, "is_fsdp2", False):
        weight_dtype = torch.float32  # FSDP1 flattens frozen and LoRA weights of a block into one tensor
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.info(data.summary())

    # Models are built before seeding, so the training RNG stream does not depend on how they were made.
    transformer = load_expert(config.base, component, dtype=weight_dtype)
    transformer.requires_grad_(False)
    _check_model_fits_data(transformer, data, config, lora_config)
    install_memory_rope(transformer)
    adapter_config = _adapter_config(lora_config, config.base, component)
    # The LoRA initialisation comes from the seed, identical on every process (FSDP2 shards each process's
    # own copy, so they must agree).
    set_seed(config.seed)
    add_storymem_adapter(transformer, lora_config, adapter_name=ADAPTER_NAME)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if accelerator.mixed_precision in ("bf16", "fp16") and not is_fsdp:
        cast_training_params(transformer, dtype=torch.float32)
    transformer.train()

    renderer = None
    if config.validation_steps and accelerator.is_main_process:
        if is_fsdp:
            logger.warning("validation renders are skipped under FSDP (the model is sharded); render the "
                           "checkpoint adapters with the inference CLI instead")
        else:
            from .validation import ValidationRenderer

            renderer = ValidationRenderer(
                data, config.base, component, accelerator.device, weight_dtype, config.validation_shots,
                config.validation_inference_steps, config.validation_guidance_scale,
                "none" if config.expert == "all" else config.validation_other_expert, config.validation_cluster, config.max_memory, seed=config.seed)

    set_seed(config.seed, device_specific=True)  # per-process noise; the sampler shares config.seed
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = _make_optimizer(config, params)
    try:
        sampler = MemoryBatchSampler(
            data.clusters, [data.memory_count] * len(data), batch_size=config.train_batch_size,
            min_memory=config.min_memory, max_memory=config.max_memory, context=context, context_prob=context_prob,
            caption_dropout=config.caption_dropout, no_memory_prob=config.no_memory_prob,
            distractor_prob=config.distractor_prob, seed=config.seed)
    except ValueError as e:
        raise TrainingConfigError(f"{data.root}: {e}") from None
    # Its own generator: starting an iterator draws a worker seed, which must not move the global RNG that
    # noise and timesteps come from (a resumed run starts an iterator where the original did not).
    dataloader = torch.utils.data.DataLoader(MemoryClipDataset(data), batch_sampler=sampler,
                                             collate_fn=collate_samples, num_workers=config.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(config.seed))
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes,
                                 num_cycles=config.lr_num_cycles, power=config.lr_power)
    transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, dataloader,
                                                                           lr_scheduler)
    unwrapped = accelerator.unwrap_model(transformer)

    # Checkpoints hold the adapter only (not the frozen base), except under FSDP where accelerate saves the
    # sharded model itself.
    if not is_fsdp:
        def save_model_hook(models, weights, ckpt_dir):
            if accelerator.is_main_process:
                save_storymem_lora(Path(ckpt_dir) / CHECKPOINT_ADAPTER,
                                   {component: accelerator.unwrap_model(models[0])}, adapter_config,
                                   adapter_name=ADAPTER_NAME)
            while weights:
                weights.pop()

        def load_model_hook(models, ckpt_dir):
            model = models.pop()
            load_adapter_weights(accelerator.unwrap_model(model), Path(ckpt_dir) / CHECKPOINT_ADAPTER, component,
                                 adapter_config)

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

    steps_per_epoch = max(1, math.ceil(len(dataloader) / config.gradient_accumulation_steps))
    if accelerator.is_main_process:
        accelerator.init_trackers("storymem-lora", config=_tracker_config(config, lora_config))
        atomic_write_json(output_dir / "train_config.json", {"train": _jsonable(dataclasses.asdict(config)),
                                                       "adapter": lora_config.to_dict()})

    global_step, first_epoch, skip_batches = 0, 0, 0
    if config.resume_from_checkpoint:
        if is_fsdp and not accelerator.is_fsdp2:
            # Seen on 2 GPUs: FSDP1 checkpoints of this setup resume with a different next step than the run
            # that wrote them; FSDP2 (configs/accelerate_fsdp.yaml) resumes exactly.
            raise TrainingConfigError("resuming is supported under FSDP2 (fsdp_version: 2, "
                                      "configs/accelerate_fsdp.yaml), not FSDP1")
        checkpoint = resolve_checkpoint(output_dir, config.resume_from_checkpoint)
        if checkpoint is None:
            logger.warning("no checkpoint in %s: starting a new run", output_dir)
        else:
            accelerator.load_state(str(checkpoint))
            global_step = int(_CHECKPOINT_RE.match(checkpoint.name).group(1))
            first_epoch = global_step // steps_per_epoch
            skip_batches = (global_step % steps_per_epoch) * config.gradient_accumulation_steps
            logger.info("resumed from %s (step %d)", checkpoint, global_step)

    result = TrainResult(adapter_dir=output_dir / CHECKPOINT_ADAPTER, global_step=global_step)
    loss_kwargs = dict(expert=config.expert, flow_shift=config.flow_shift, boundary_ratio=config.boundary_ratio,
                       rope_mode=lora_config.memory_rope, rope_stride=lora_config.memory_rope_stride,
                       loss_on_memory=config.loss_on_memory, rope_model=unwrapped, weight_dtype=weight_dtype,
                       subject_loss_weight=config.subject_loss_weight,
                       preserve_base_weight=config.preserve_base_weight, base_only=functools.partial(_base_only, unwrapped))
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    epoch = first_epoch
    step_loss = torch.zeros((), device=accelerator.device)
    started = time.perf_counter()
    out_of_time = False
    while global_step < config.max_train_steps and not out_of_time:
        sampler.epoch = epoch
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in loader:
            with accelerator.accumulate(transformer):
                loss, info = flow_matching_loss(transformer, batch, **loss_kwargs)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(transformer.parameters(), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / config.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
            step_loss.zero_()
            result.losses.append(mean_loss)
            logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
                    "memory_frames": info["num_memory_frames"], "timestep": float(info["timesteps"].float().mean())}
            if "preserve_loss" in info:
                logs["preserve_loss"] = float(info["preserve_loss"])
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)

            if config.max_train_minutes is not None:
                # Every process stops at the same step: the decision is reduced across them.
                late = torch.tensor(float(time.perf_counter() - started >= 60.0 * config.max_train_minutes),
                                    device=accelerator.device)
                out_of_time = accelerator.reduce(late, reduction="sum").item() > 0
                if out_of_time:
                    logger.info("time limit of %s min reached at step %d", config.max_train_minutes, global_step)
            if (global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps
                    or out_of_time):
                _save_checkpoint(accelerator, transformer, adapter_config, component, output_dir, global_step,
                                 config.checkpoints_total_limit, is_fsdp)
            if renderer is not None and global_step % config.validation_steps == 0:
                path = output_dir / "validation" / f"step-{global_step:06d}.mp4"
                result.validation_videos.append(renderer.render(unwrapped, path, fps=data.index.get("fps", 16.0)))
            if config.validation_steps and global_step % config.validation_steps == 0:
                accelerator.wait_for_everyone()
            if global_step >= config.max_train_steps or out_of_time:
                break
        epoch += 1
    progress.close()

    export_adapter(accelerator, transformer, adapter_config, component, result.adapter_dir)
    result.global_step = global_step
    if accelerator.is_main_process:
        # This run's loss curve (mean over processes per optimizer step), for comparing runs and launches.
        atomic_write_json(output_dir / "train_summary.json", {
            "global_step": global_step, "losses": result.losses, "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "adapter_dir": str(result.adapter_dir)})
    accelerator.end_training()
    return result


@contextlib.contextmanager
def _base_only(model):
    """``model`` without its adapter for the duration (the base's own prediction)."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def _save_checkpoint(accelerator, model, adapter_config, component, output_dir: Path, step: int,
                     total_limit: Optional[int], is_fsdp: bool):
    if accelerator.is_main_process and total_limit is not None:
        existing = _checkpoints(output_dir)
        for old in existing[:max(0, len(existing) - total_limit + 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    ckpt = output_dir / f"checkpoint-{step}"
    accelerator.save_state(str(ckpt))
    if is_fsdp:
        export_adapter(accelerator, model, adapter_config, component, ckpt / CHECKPOINT_ADAPTER)
    accelerator.wait_for_everyone()
    logger.info("saved %s", ckpt)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


def _tracker_config(config: TrainConfig, lora_config: StoryMemLoraConfig) -> dict:
    # tensorboard's hparams take scalars and strings only
    flat = {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))}
    flat.update({f"lora_{k}": v for k, v in lora_config.to_dict().items() if isinstance(v, (int, float, str, bool))})
    return flat
