"""Training a StoryMem adapter on one Wan2.2 expert with accelerate (single GPU, DDP or FSDP).

Each run trains one expert (``--expert high`` -> ``transformer``, ``low`` -> ``transformer_2``; ``all`` for a
base with a single transformer) on timesteps of its side of the boundary, and writes adapters
:meth:`StoryMemPipeline.load_storymem_lora` loads::

    OUTPUT/
      adapter/                        final adapter (storymem_adapter.json + high_noise/low_noise.safetensors)
      checkpoint-500/                 resumable state (optimizer, scheduler, RNG, sampler position) ...
        adapter/                      ... and the adapter as of step 500 (also the weights resumed from)
        checkpoint.json               written last: the checkpoint is complete
      validation/step-000500.mp4      validation stories (with --validation-steps)
      logs/                           tensorboard
      train_config.json
      train_summary.json              the loss of every step

Precision: the frozen base weights are kept in the mixed-precision dtype (bf16), the LoRA weights in fp32
(diffusers' ``cast_training_params``), compute under autocast. Under FSDP2 (``configs/accelerate_fsdp.yaml``)
the base stays bf16 and sharded and accelerate keeps the LoRA weights in fp32. FSDP1 needs one dtype per
flattened block, so there everything is loaded in fp32 (no memory saved on 2 GPUs) and ``--resume`` is refused.

Reliability: checkpoints are written atomically (:mod:`storymem.training.checkpoints`); an ``--output`` that
holds an earlier run is refused unless ``--resume`` continues it or ``--overwrite`` clears it; SIGINT/SIGTERM end
the current step, save a checkpoint and raise :class:`~storymem.training.errors.TrainingInterrupted`
(:mod:`storymem.training.signals`); a loss or adapter weights that stop being finite stop the run before
anything non-finite is saved.

:func:`train` reads top to bottom as the steps of a run: check the settings and the data, set up accelerate,
claim the run folder, load the expert and add the adapter, build optimizer, sampler and schedule, resume, loop,
export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import pickle
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..atomic import atomic_write_json, jsonable
from ..defaults import FPS
from ..devices import default_device, torch_dtype
from ..lora import StoryMemLoraConfig, add_storymem_adapter
from .cache import PreparedDataset
from .checkpoints import (
    ADAPTER_NAME,
    CHECKPOINT_ADAPTER,
    any_process,
    check_run_folder,
    checkpoint_step,
    claim_run_folder,
    export_adapter,
    register_checkpoint_hooks,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, read_lora_config
from .data import MemoryBatchSampler, MemoryClipDataset, collate_samples
from .errors import DataError, TrainingConfigError, TrainingDivergedError, TrainingInterrupted
from .flow import EXPERTS
from .loss import flow_matching_loss
from .signals import StopRequest

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "train"]


@dataclass
class TrainResult:
    adapter_dir: Path
    global_step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this run (mean over processes)
    validation_videos: list[Path] = field(default_factory=list)


@dataclass
class _Run:
    """What the training loop works with, once everything is set up."""

    config: TrainConfig
    accelerator: Any
    transformer: Any  # as prepared by accelerate (possibly wrapped)
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    sampler: MemoryBatchSampler
    adapter_config: StoryMemLoraConfig
    component: str
    output_dir: Path
    is_fsdp: bool
    loss_kwargs: dict
    renderer: Any = None  # ValidationRenderer on the main process with --validation-steps
    fps: float = float(FPS)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; see the module docstring for what it writes.

    Raises:
        TrainingConfigError / DataError: a bad setting or bad data (before any model is loaded where possible).
        TrainingInterrupted: SIGINT or SIGTERM stopped the run; it names the checkpoint it saved first.
        TrainingDivergedError: the loss or the weights stopped being finite; nothing from then on was saved.
    """
    from .models import check_base_available

    config.validate()
    lora_config = read_lora_config(config.lora_config)
    component = EXPERTS[config.expert]
    context, context_prob = _context_frames(config, lora_config)
    output_dir = Path(config.output_dir)
    _check_report_to(config)
    check_run_folder(output_dir, config.resume_from_checkpoint, config.overwrite)
    check_base_available(config.base, parts=(component,))
    # Data before models: a bad cache fails before any model is loaded.
    data = _open_data(config, lora_config, context, context_prob)
    _check_sizes_fit_base(config, lora_config, data)

    accelerator = _make_accelerator(config, output_dir)
    with claim_run_folder(accelerator, output_dir, config.overwrite, purpose=f"training ({config.expert})"):
        return _train(config, lora_config, component, context, context_prob, data, accelerator, output_dir)


def _train(config: TrainConfig, lora_config: StoryMemLoraConfig, component: str, context: Optional[str],
           context_prob: float, data: PreparedDataset, accelerator, output_dir: Path) -> TrainResult:
    """Load the expert, build optimizer, sampler and schedule, resume, loop, export."""
    from accelerate.utils import DistributedType, set_seed
    from diffusers.optimization import get_scheduler

    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    weight_dtype = _weight_dtype(accelerator, is_fsdp)
    if config.allow_tf32 and accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        logger.info(data.summary())

    # Models are built before seeding, so the training RNG stream does not depend on how they were made.
    transformer = _load_transformer(config, lora_config, component, data, weight_dtype,
                                    cast_lora_to_fp32=accelerator.mixed_precision in ("bf16", "fp16") and not is_fsdp)
    adapter_config = _adapter_config(lora_config, config.base, component)
    renderer = _validation_renderer(config, data, component, accelerator, weight_dtype, is_fsdp)

    set_seed(config.seed, device_specific=True)  # per-process noise; the sampler shares config.seed
    optimizer = _make_optimizer(config, [p for p in transformer.parameters() if p.requires_grad])
    sampler = _make_sampler(config, data, context, context_prob)
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
    if not is_fsdp:  # checkpoints hold the adapter, not the frozen base (FSDP saves the sharded model)
        register_checkpoint_hooks(accelerator, component, adapter_config)
    if accelerator.is_main_process:
        accelerator.init_trackers("storymem-lora", config=_tracker_config(config, lora_config))
        atomic_write_json(output_dir / "train_config.json", {"train": jsonable(dataclasses.asdict(config)),
                                                             "adapter": lora_config.to_dict()})

    unwrapped = accelerator.unwrap_model(transformer)
    loss_kwargs = dict(expert=config.expert, flow_shift=config.flow_shift, boundary_ratio=config.boundary_ratio,
                       rope_mode=lora_config.memory_rope, rope_stride=lora_config.memory_rope_stride,
                       loss_on_memory=config.loss_on_memory, rope_model=unwrapped, weight_dtype=weight_dtype,
                       subject_loss_weight=config.subject_loss_weight,
                       preserve_base_weight=config.preserve_base_weight,
                       base_only=functools.partial(_base_only, unwrapped))
    run = _Run(config=config, accelerator=accelerator, transformer=transformer, optimizer=optimizer,
               lr_scheduler=lr_scheduler, dataloader=dataloader, sampler=sampler, adapter_config=adapter_config,
               component=component, output_dir=output_dir, is_fsdp=is_fsdp, loss_kwargs=loss_kwargs,
               renderer=renderer, fps=data.index.get("fps", float(FPS)))
    try:
        with StopRequest() as stop:
            result = _train_loop(run, stop, *_resume(run))
    except (TrainingInterrupted, TrainingDivergedError):
        accelerator.end_training()  # flush the logs of the steps that were taken
        raise

    export_adapter(accelerator, transformer, adapter_config, component, result.adapter_dir)
    if accelerator.is_main_process:
        # This run's loss curve (mean over processes per optimizer step), for comparing runs and launches.
        atomic_write_json(output_dir / "train_summary.json", {
            "global_step": result.global_step, "losses": result.losses, "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "adapter_dir": str(result.adapter_dir)})
    accelerator.end_training()
    return result


# ---------------------------------------------------------------------------------------------- set-up
def _context_frames(config: TrainConfig, lora_config: StoryMemLoraConfig) -> tuple[Optional[str], float]:
    """The adapter's context condition (``"mi2v"``/``"mm2v"``, None for m2v) and how often samples use it."""
    context = lora_config.conditioning if lora_config.conditioning in ("mi2v", "mm2v") else None
    context_prob = config.mi2v_prob if config.mi2v_prob is not None else (0.5 if context else 0.0)
    if context is None and context_prob > 0:
        raise TrainingConfigError(f"{config.lora_config}: an m2v adapter has no context frames; --mi2v-prob must be 0")
    return context, context_prob


def _open_data(config: TrainConfig, lora_config: StoryMemLoraConfig, context: Optional[str],
               context_prob: float) -> PreparedDataset:
    """The prepared dataset, checked against what this run needs from it."""
    from .models import base_identity

    data = PreparedDataset(config.data_dir, skip_bad_shards=config.skip_bad_shards,
                           verify_checksums=config.verify_data)
    if context_prob > 0 and context not in data.contexts:
        raise DataError(f"{data.root}: the {lora_config.conditioning} adapter needs the {context!r} condition, "
                        f"which was not prepared (have {data.contexts}); re-run prepare with --contexts {context}")
    if config.subject_loss_weight != 1.0 and not data.has_subject_masks:
        raise DataError(f"{data.root}: --subject-loss-weight needs subject masks, and this dataset was prepared "
                        "without them; give each clip a mask video (a manifest's 'mask', or <name>.mask.mp4 beside "
                        "it in a folder) and re-run prepare")
    _check_settings_fit_data(config, data)
    if data.base and data.base != base_identity(config.base):
        logger.warning("%s was prepared with base %s, training on %s: latents and text embeddings must come from "
                       "the same VAE and text encoder", data.root, data.base, base_identity(config.base))
    return data


def _check_settings_fit_data(config: TrainConfig, data: PreparedDataset):
    """The settings whose range depends on the prepared data, each named when it does not fit."""
    clusters = [c for c in data.clusters if len(c) >= 2]
    targets = sum(len(c) for c in clusters)
    if config.train_batch_size > targets:
        raise TrainingConfigError(f"{config.train_batch_size} is more than the {targets} clips of {data.root}",
                                  option="train_batch_size")
    if config.distractor_prob > 0 and len(clusters) < 2:
        raise TrainingConfigError(f"distractors come from another cluster, and {data.root} has one",
                                  option="distractor_prob")
    if config.validation_steps and config.validation_cluster >= len(data.clusters):
        raise TrainingConfigError(f"{data.root} has {len(data.clusters)} clusters (0 to {len(data.clusters) - 1}), "
                                  f"got {config.validation_cluster}", option="validation_cluster")


def _check_report_to(config: TrainConfig):
    from accelerate.utils import LoggerType

    known = [name for name in LoggerType.list() if name != "all"]
    if config.report_to not in (None, "none", "all", *known):
        raise TrainingConfigError(f"must be none or one of {', '.join(known)}, got {config.report_to!r}",
                                  option="report_to")


def _check_sizes_fit_base(config: TrainConfig, lora_config: StoryMemLoraConfig, data: PreparedDataset):
    """The prepared sizes and ``--max-memory`` against the base's rope table, before the base is loaded."""
    from .models import base_rope_length, check_sizes_fit_base

    rope = base_rope_length(config.base)
    index = data.index
    try:
        check_sizes_fit_base(config.base, index["height"], index["width"], index["num_frames"], rope_length=rope)
    except TrainingConfigError as e:
        raise DataError(f"{data.root} was prepared at a size the base cannot take: {e.detail}") from None
    _check_memory_fits_rope(config, lora_config, data.latent_shape[1], rope)


def _check_memory_fits_rope(config: TrainConfig, lora_config: StoryMemLoraConfig, latent_frames: int, rope: int):
    """``--max-memory`` frames must have rope positions: at negative positions ``stride`` apart, or after one
    another before the clip's latent frames (contiguous)."""
    stride = lora_config.memory_rope_stride
    if lora_config.memory_rope == "negative" and config.max_memory * stride >= rope:
        raise TrainingConfigError(f"{config.max_memory} memory frames at rope stride {stride} exceed the rope "
                                  f"table ({rope}); at most {(rope - 1) // stride}", option="max_memory")
    if lora_config.memory_rope == "contiguous" and config.max_memory + latent_frames > rope:
        raise TrainingConfigError(f"{config.max_memory} memory frames and {latent_frames} latent frames exceed the "
                                  f"rope table ({rope}); at most {rope - latent_frames}", option="max_memory")


def _make_accelerator(config: TrainConfig, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = config.report_to if config.report_to not in (None, "none") else None
    if report_to == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            logger.warning("tensorboard is not installed: training logs go to the console only")
            report_to = None
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=_mixed_precision(config.mixed_precision),
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def _mixed_precision(requested: Optional[str]) -> Optional[str]:
    if requested is not None:
        return requested
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # set by `accelerate launch` / its config file
    return "bf16" if default_device().type == "cuda" else "no"


def _weight_dtype(accelerator, is_fsdp: bool) -> torch.dtype:
    """The dtype the frozen base is held in: the mixed-precision dtype, fp32 without one and under FSDP1 (which
    flattens frozen and LoRA weights of a block into one tensor)."""
    if accelerator.mixed_precision not in ("bf16", "fp16"):
        return torch.float32
    if is_fsdp and not getattr(accelerator, "is_fsdp2", False):
        return torch.float32
    return torch_dtype(accelerator.mixed_precision)


def _load_transformer(config: TrainConfig, lora_config: StoryMemLoraConfig, component: str, data: PreparedDataset,
                      weight_dtype: torch.dtype, cast_lora_to_fp32: bool):
    """The frozen expert with the memory rope and a fresh adapter, ready to train."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    from ..rope import install_memory_rope
    from .models import load_expert

    transformer = load_expert(config.base, component, dtype=weight_dtype)
    transformer.requires_grad_(False)
    _check_model_fits_data(transformer, data, config, lora_config)
    install_memory_rope(transformer)
    # The LoRA initialisation comes from the seed, identical on every process (FSDP2 shards each process's
    # own copy, so they must agree).
    set_seed(config.seed)
    add_storymem_adapter(transformer, lora_config, adapter_name=ADAPTER_NAME)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cast_lora_to_fp32:
        cast_training_params(transformer, dtype=torch.float32)
    transformer.train()
    return transformer


def _check_model_fits_data(model, data: PreparedDataset, config: TrainConfig, lora_config: StoryMemLoraConfig):
    z = data.latent_shape[0]
    if model.config.in_channels != 2 * z + 4 or model.config.out_channels != z:
        raise DataError(f"{data.root}: latents have {z} channels, the transformer takes {model.config.in_channels} "
                        f"in / {model.config.out_channels} out (expected an I2V model: 2*z+4 in)")
    if model.config.text_dim != data.index["text_dim"]:
        raise DataError(f"{data.root}: text embeddings are {data.index['text_dim']}-d, the transformer expects "
                        f"{model.config.text_dim} (prepared with another base?)")
    _check_memory_fits_rope(config, lora_config, data.latent_shape[1], model.config.rope_max_seq_len)


def _adapter_config(lora_config: StoryMemLoraConfig, base: str, component: str) -> StoryMemLoraConfig:
    """The config written with the adapter: the trained expert, and the base it was trained on (none for the
    random tiny base, which has nothing to name)."""
    from .models import base_identity, is_random_base

    recorded = lora_config.base_model or (None if is_random_base(base) else base_identity(base))
    return dataclasses.replace(lora_config, experts=[component], base_model=recorded)


def _validation_renderer(config: TrainConfig, data: PreparedDataset, component: str, accelerator,
                         weight_dtype: torch.dtype, is_fsdp: bool):
    if not config.validation_steps or not accelerator.is_main_process:
        return None
    if is_fsdp:
        logger.warning("validation renders are skipped under FSDP (the model is sharded); render the checkpoint "
                       "adapters with the inference CLI instead")
        return None
    from .validation import ValidationRenderer

    other_expert = "none" if config.expert == "all" else config.validation_other_expert
    return ValidationRenderer(data, config.base, component, accelerator.device, weight_dtype, config.validation_shots,
                              config.validation_inference_steps, config.validation_guidance_scale, other_expert,
                              config.validation_cluster, config.max_memory, seed=config.seed)


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


def _make_sampler(config: TrainConfig, data: PreparedDataset, context: Optional[str],
                  context_prob: float) -> MemoryBatchSampler:
    try:
        return MemoryBatchSampler(
            data.clusters, [data.memory_count] * len(data), batch_size=config.train_batch_size,
            min_memory=config.min_memory, max_memory=config.max_memory, context=context, context_prob=context_prob,
            caption_dropout=config.caption_dropout, no_memory_prob=config.no_memory_prob,
            distractor_prob=config.distractor_prob, seed=config.seed)
    except ValueError as e:
        raise TrainingConfigError(f"{data.root}: {e}") from None


def _tracker_config(config: TrainConfig, lora_config: StoryMemLoraConfig) -> dict:
    # tensorboard's hparams take scalars and strings only
    flat = {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))}
    flat.update({f"lora_{k}": v for k, v in lora_config.to_dict().items() if isinstance(v, (int, float, str, bool))})
    return flat


def _steps_per_epoch(run: _Run) -> int:
    return max(1, math.ceil(len(run.dataloader) / run.config.gradient_accumulation_steps))


def _resume(run: _Run) -> tuple[int, int, int, Optional[Path]]:
    """``(global_step, first_epoch, batches to skip in it, checkpoint)``: zeros and None for a new run, else
    restored from the checkpoint ``--resume`` names."""
    config, accelerator = run.config, run.accelerator
    if not config.resume_from_checkpoint:
        return 0, 0, 0, None
    if run.is_fsdp and not accelerator.is_fsdp2:
        # Seen on 2 GPUs: FSDP1 checkpoints of this setup resume with a different next step than the run that
        # wrote them; FSDP2 (configs/accelerate_fsdp.yaml) resumes exactly.
        raise TrainingConfigError("resuming is supported under FSDP2 (fsdp_version: 2, configs/accelerate_fsdp.yaml), "
                                  "not FSDP1", option="resume_from_checkpoint")
    checkpoint = resolve_checkpoint(run.output_dir, config.resume_from_checkpoint)
    if checkpoint is None:  # nothing there (check_run_folder refused a folder with a run but no checkpoint)
        logger.warning("no checkpoint in %s: starting a new run", run.output_dir)
        return 0, 0, 0, None
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{checkpoint}: cannot be resumed ({first}); give an earlier one with --resume "
                        f"{run.output_dir}/checkpoint-N") from None
    global_step = checkpoint_step(checkpoint)
    steps_per_epoch = _steps_per_epoch(run)
    logger.info("resumed from %s (step %d)", checkpoint, global_step)
    return (global_step, global_step // steps_per_epoch,
            (global_step % steps_per_epoch) * config.gradient_accumulation_steps, checkpoint)


# ---------------------------------------------------------------------------------------------- loop
def _train_loop(run: _Run, stop: StopRequest, global_step: int, first_epoch: int, skip_batches: int,
                last_checkpoint: Optional[Path]) -> TrainResult:
    """Optimizer steps until ``max_train_steps`` (or the time limit, or a stop signal), with logs, checkpoints
    and validation. A signal ends the step it arrived in, saves a checkpoint and raises TrainingInterrupted."""
    from tqdm.auto import tqdm

    config, accelerator, transformer = run.config, run.accelerator, run.transformer
    result = TrainResult(adapter_dir=run.output_dir / CHECKPOINT_ADAPTER, global_step=global_step)
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    step_loss = torch.zeros((), device=accelerator.device)
    started = time.perf_counter()
    epoch, stopping = first_epoch, None
    while global_step < config.max_train_steps and stopping is None:
        run.sampler.epoch = epoch
        loader = run.dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(run.dataloader, skip_batches)
        for batch in loader:
            with accelerator.accumulate(transformer):
                loss, info = flow_matching_loss(transformer, batch, **run.loss_kwargs)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(transformer.parameters(), config.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / config.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            mean_loss, stopping = _end_of_step(run, step_loss, stop, started, global_step)
            step_loss.zero_()
            if not math.isfinite(mean_loss):
                progress.close()
                raise _diverged(run, f"the loss became {mean_loss}", global_step, last_checkpoint)
            result.losses.append(mean_loss)
            _log_step(run, progress, global_step, mean_loss, info)
            last_checkpoint = _after_step(run, result, global_step, stopping is not None, last_checkpoint)
            if global_step >= config.max_train_steps or stopping is not None:
                break
        epoch += 1
    progress.close()
    result.global_step = global_step
    if stopping is not None and stopping != "time":
        raise TrainingInterrupted(stopping, global_step, last_checkpoint)
    return result


def _end_of_step(run: _Run, step_loss: torch.Tensor, stop: StopRequest, started: float, global_step: int):
    """``(mean loss over processes, why to stop now)``: None, "time" (``--max-train-minutes`` passed) or the
    signal that asked for a stop. One reduction across processes, so that every process stops at the same step."""
    accelerator = run.accelerator
    limit = run.config.max_train_minutes
    late = limit is not None and time.perf_counter() - started >= 60.0 * limit
    flags = [float(late), float(stop.signum == signal.SIGINT), float(stop.signum == signal.SIGTERM)]
    local = torch.cat([step_loss.detach().float().view(1), torch.tensor(flags, device=step_loss.device)])
    total = accelerator.reduce(local, reduction="sum").tolist()
    mean_loss = total[0] / accelerator.num_processes
    if total[2] > 0 or total[3] > 0:
        return mean_loss, signal.SIGINT if total[2] > 0 else signal.SIGTERM
    if total[1] > 0:
        logger.info("time limit of %s min reached at step %d", limit, global_step)
        return mean_loss, "time"
    return mean_loss, None


def _diverged(run: _Run, what: str, global_step: int, last_checkpoint: Optional[Path]) -> TrainingDivergedError:
    where = (f"the last checkpoint, {last_checkpoint}, is intact (--resume latest continues from it)"
             if last_checkpoint is not None else "no checkpoint was saved before it")
    return TrainingDivergedError(f"{what} at step {global_step}; nothing from this step on was saved and {where}; "
                                 f"lower --learning-rate (now {run.config.learning_rate:g}) or check the data")


def _check_finite_adapter(run: _Run, global_step: int, last_checkpoint: Optional[Path]):
    """Refuse to save adapter weights that are not all finite numbers (they would render noise)."""
    finite = all(bool(torch.isfinite(p.detach()).all()) for p in run.transformer.parameters() if p.requires_grad)
    if any_process(run.accelerator, not finite):
        raise _diverged(run, "the adapter weights stopped being finite numbers", global_step, last_checkpoint)


def _log_step(run: _Run, progress, global_step: int, mean_loss: float, info: dict):
    logs = {"loss": mean_loss, "lr": run.lr_scheduler.get_last_lr()[0],
            "memory_frames": info["num_memory_frames"], "timestep": float(info["timesteps"].float().mean())}
    if "preserve_loss" in info:
        logs["preserve_loss"] = float(info["preserve_loss"])
    progress.update(1)
    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
    run.accelerator.log(logs, step=global_step)


def _after_step(run: _Run, result: TrainResult, global_step: int, stopping: bool,
                last_checkpoint: Optional[Path]) -> Optional[Path]:
    """Checkpoint and validation render when they are due; returns the newest checkpoint."""
    config = run.config
    if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps or stopping:
        _check_finite_adapter(run, global_step, last_checkpoint)
        last_checkpoint = save_checkpoint(run.accelerator, run.transformer, run.adapter_config, run.component,
                                          run.output_dir, global_step, config.checkpoints_total_limit, run.is_fsdp)
    if config.validation_steps and global_step % config.validation_steps == 0 and not stopping:
        if run.renderer is not None:
            path = run.output_dir / "validation" / f"step-{global_step:06d}.mp4"
            unwrapped = run.accelerator.unwrap_model(run.transformer)
            result.validation_videos.append(run.renderer.render(unwrapped, path, fps=run.fps))
        run.accelerator.wait_for_everyone()
    return last_checkpoint


@contextlib.contextmanager
def _base_only(model):
    """``model`` without its adapter for the duration (the base's own prediction)."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()
