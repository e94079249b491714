"""A training run's folder: adapters and checkpoints (export, also from an FSDP-sharded model; atomic saves,
resume, rotation) and the rule for a folder that holds an earlier run.

Checkpoints hold the adapter only (not the frozen base) beside accelerate's optimizer, scheduler and RNG state,
except under FSDP, where accelerate saves the sharded model itself and the adapter is exported next to it::

    OUTPUT/checkpoint-500/            accelerate's state (optimizer, scheduler, RNG, sampler position)
    OUTPUT/checkpoint-500/adapter/    the adapter as of step 500 (also the weights resumed from)
    OUTPUT/checkpoint-500/checkpoint.json   written last: the checkpoint is complete

A checkpoint is written into ``checkpoint-N.tmp`` and renamed to ``checkpoint-N`` once complete, so a run killed
while saving leaves a ``.tmp`` folder (removed by the next save) and never a ``checkpoint-N`` that cannot be
resumed. ``--resume latest`` takes the newest checkpoint that has its ``checkpoint.json``, skipping (and naming)
any that lack it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_json
from ..lora import EXPERT_FILES, StoryMemLoraConfig, save_storymem_lora
from .errors import DataError, TrainingConfigError

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_NAME", "CHECKPOINT_ADAPTER", "CHECKPOINT_MARKER", "RUN_OUTPUTS", "lora_state_dict_from",
           "export_adapter", "load_adapter_weights", "register_checkpoint_hooks", "resolve_checkpoint",
           "checkpoint_step", "is_complete_checkpoint", "list_checkpoints", "save_checkpoint", "earlier_run",
           "check_run_folder", "clear_run_folder", "claim_run_folder", "any_process"]

ADAPTER_NAME = "storymem"  # the peft adapter's name on the training model
CHECKPOINT_ADAPTER = "adapter"  # the adapter's folder in a run or checkpoint folder
CHECKPOINT_MARKER = "checkpoint.json"  # the last file a checkpoint save writes
# What a run writes into its folder besides checkpoints (--overwrite removes them, and nothing else); the first
# three are its results, which a new run must not silently replace.
RUN_OUTPUTS = (CHECKPOINT_ADAPTER, "train_summary.json", "validation", "train_config.json", "logs")
_RUN_RESULTS = RUN_OUTPUTS[:3]
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_STAGING_RE = re.compile(r"^checkpoint-(\d+)\.(tmp|old)$")
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# ---------------------------------------------------------------------------------------------- adapters
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


def register_checkpoint_hooks(accelerator, component: str, adapter_config: StoryMemLoraConfig):
    """Make ``accelerator.save_state`` / ``load_state`` write and read the adapter instead of the whole model
    (not under FSDP, where accelerate saves the sharded model)."""

    def save_model_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            save_storymem_lora(Path(checkpoint_dir) / CHECKPOINT_ADAPTER,
                               {component: accelerator.unwrap_model(models[0])}, adapter_config,
                               adapter_name=ADAPTER_NAME)
        while weights:  # nothing else of the model to save
            weights.pop()

    def load_model_hook(models, checkpoint_dir):
        model = models.pop()
        load_adapter_weights(accelerator.unwrap_model(model), Path(checkpoint_dir) / CHECKPOINT_ADAPTER, component,
                             adapter_config)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


# ---------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, oldest first (complete or not)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The step a ``checkpoint-N`` folder was saved at."""
    return int(_CHECKPOINT_RE.match(Path(checkpoint).name).group(1))


def is_complete_checkpoint(checkpoint: Path) -> bool:
    """Whether the save of ``checkpoint`` finished (its marker, written last, is there)."""
    return (Path(checkpoint) / CHECKPOINT_MARKER).is_file()


def resolve_checkpoint(output_dir: Path, resume: str) -> Optional[Path]:
    """``"latest"`` -> the newest complete ``checkpoint-N`` in ``output_dir`` (None if there is none; incomplete
    ones are skipped with a warning naming them); else the given folder, which must be a complete checkpoint."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        for checkpoint in reversed(found):
            if is_complete_checkpoint(checkpoint):
                return checkpoint
            logger.warning("skipping %s: incomplete (no %s; its save was interrupted)", checkpoint,
                           CHECKPOINT_MARKER)
        return None
    path = Path(resume)
    if not path.is_dir() or not _CHECKPOINT_RE.match(path.name):
        raise TrainingConfigError(f"{resume}: not a checkpoint folder (expected .../checkpoint-N, or latest)",
                                  option="resume_from_checkpoint")
    if not is_complete_checkpoint(path):
        raise DataError(f"{path}: incomplete checkpoint (no {CHECKPOINT_MARKER}: its save was interrupted); resume "
                        "from an earlier one, or --resume latest for the newest complete one")
    return path


def _fsync_tree(folder: Path):
    """Flush every file of ``folder`` to disk, so the marker written after them never outlives their data."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every system opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(staging: Path, final: Path, step: int):
    """Mark ``staging`` complete and rename it to ``final`` (an older folder of that name is moved aside first
    and removed after, so a crash in between leaves one complete checkpoint)."""
    _fsync_tree(staging)
    atomic_write_json(staging / CHECKPOINT_MARKER, {"step": step, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _rotate(output_dir: Path, keep: Path, total_limit: Optional[int]):
    """Remove what an interrupted save left (``.tmp``/``.old`` folders) and the oldest complete checkpoints
    beyond ``total_limit`` (never ``keep``, the one just saved)."""
    for stale in output_dir.glob("checkpoint-*"):
        if stale.is_dir() and _STAGING_RE.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    if total_limit is None:
        return
    complete = [c for c in list_checkpoints(output_dir) if is_complete_checkpoint(c) and c != keep]
    for old in complete[:max(0, len(complete) + 1 - total_limit)]:
        # Renamed first: a kill while deleting leaves a .old folder (cleared by the next save), not a checkpoint-N
        # that lost part of its files.
        doomed = old.with_name(old.name + ".old")
        os.replace(old, doomed)
        shutil.rmtree(doomed)


def save_checkpoint(accelerator, model, adapter_config: StoryMemLoraConfig, component: str, output_dir: Path,
                    step: int, total_limit: Optional[int], is_fsdp: bool) -> Path:
    """Save ``checkpoint-<step>`` atomically (written as ``checkpoint-<step>.tmp``, renamed when complete), then
    remove the oldest ones beyond ``total_limit`` (collective: every process must call it)."""
    output_dir = Path(output_dir)
    checkpoint = output_dir / f"checkpoint-{step}"
    staging = output_dir / f"checkpoint-{step}.tmp"  # one name on every process: they all write into it
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if is_fsdp:
        export_adapter(accelerator, model, adapter_config, component, staging / CHECKPOINT_ADAPTER)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _publish(staging, checkpoint, step)
        _rotate(output_dir, checkpoint, total_limit)
    accelerator.wait_for_everyone()
    logger.info("saved %s", checkpoint)
    return checkpoint


# ---------------------------------------------------------------------------------------------- run folder
def _checkpoint_folders(output_dir: Path) -> list[str]:
    return [p.name for p in sorted(Path(output_dir).glob("checkpoint-*"))
            if p.is_dir() and (_CHECKPOINT_RE.match(p.name) or _STAGING_RE.match(p.name))]


def earlier_run(output_dir: Path) -> list[str]:
    """The results an earlier run left in ``output_dir`` (its checkpoints, complete or not, adapter, summary,
    validation renders), by name; empty if none. Its settings and logs alone are no results."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return _checkpoint_folders(output_dir) + [name for name in _RUN_RESULTS if (output_dir / name).exists()]


def check_run_folder(output_dir: Path, resume: Optional[str], overwrite: bool):
    """Refuse to start a new run in a folder that holds an earlier one's results, unless told what to do with
    them: ``--resume`` continues it (``latest`` needs a complete checkpoint there), ``--overwrite`` deletes them
    first."""
    found = [] if overwrite else earlier_run(output_dir)
    if not found:
        return
    listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    resumable = resume not in (None, "latest") or resolve_checkpoint(output_dir, "latest") is not None
    clean = "start clean with --overwrite (deletes its checkpoints and adapter)"
    if not resume:
        choices = f"continue it with --resume latest, or {clean}" if resumable else \
            f"it has no complete checkpoint to continue from: {clean}"
        raise TrainingConfigError(f"{output_dir} holds an earlier run ({listed}); {choices}, or give another --output",
                                  option="output_dir")
    if not resumable:  # starting over here would silently replace that run
        raise TrainingConfigError(f"{output_dir} holds an earlier run ({listed}) but no complete checkpoint to "
                                  f"continue from; {clean} instead", option="resume_from_checkpoint")


def clear_run_folder(output_dir: Path) -> list[str]:
    """Delete what an earlier run left in ``output_dir`` (its checkpoints and :data:`RUN_OUTPUTS`, nothing else);
    return the names."""
    found = _checkpoint_folders(output_dir) + [name for name in RUN_OUTPUTS if (Path(output_dir) / name).exists()]
    for name in found:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if found:
        logger.info("--overwrite: removed %s from %s", ", ".join(found), output_dir)
    return found


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (collective), so that every process takes the same branch."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
    return total.item() > 0


@contextmanager
def claim_run_folder(accelerator, output_dir: Path, overwrite: bool, purpose: str):
    """The run folder, created and held by the first process (one run writes into a folder at a time), and
    cleared of an earlier run with ``overwrite``; every process raises if the first could not."""
    from ..locking import FolderLock, FolderLockError

    lock, error = None, None
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock = FolderLock(output_dir, owner="storymem train", purpose=purpose).acquire()
            if overwrite:
                clear_run_folder(output_dir)
        except FolderLockError as e:
            error = TrainingConfigError(str(e))
        except OSError as e:
            error = TrainingConfigError(f"cannot write to {e.filename or output_dir} ({e.strerror or e})",
                                        option="output_dir")
    if any_process(accelerator, error is not None):
        if lock is not None:
            lock.release()
        raise error or TrainingConfigError("the first process could not set the run folder up", option="output_dir")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
