"""A training run's adapters and checkpoints: export (also from an FSDP-sharded model), resume, rotation.

Checkpoints hold the adapter only (not the frozen base) beside accelerate's optimizer, scheduler and RNG state,
except under FSDP, where accelerate saves the sharded model itself and the adapter is exported next to it::

    OUTPUT/checkpoint-500/          accelerate's state (optimizer, scheduler, RNG, sampler position)
    OUTPUT/checkpoint-500/adapter/  the adapter as of step 500 (also the weights resumed from)
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Optional

from ..lora import EXPERT_FILES, StoryMemLoraConfig, save_storymem_lora
from .errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_NAME", "CHECKPOINT_ADAPTER", "lora_state_dict_from", "export_adapter", "load_adapter_weights",
           "register_checkpoint_hooks", "resolve_checkpoint", "checkpoint_step", "save_checkpoint"]

ADAPTER_NAME = "storymem"  # the peft adapter's name on the training model
CHECKPOINT_ADAPTER = "adapter"  # the adapter's folder in a run or checkpoint folder
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
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
def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The step a ``checkpoint-N`` folder was saved at."""
    return int(_CHECKPOINT_RE.match(Path(checkpoint).name).group(1))


def resolve_checkpoint(output_dir: Path, resume: str) -> Optional[Path]:
    """``"latest"`` -> newest ``checkpoint-N`` in ``output_dir`` (or None); else the given folder."""
    if resume == "latest":
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir() or not _CHECKPOINT_RE.match(path.name):
        raise FileNotFoundError(f"{resume}: not a checkpoint folder (expected .../checkpoint-N)")
    return path


def save_checkpoint(accelerator, model, adapter_config: StoryMemLoraConfig, component: str, output_dir: Path,
                    step: int, total_limit: Optional[int], is_fsdp: bool):
    """Save ``checkpoint-<step>``, first removing the oldest ones beyond ``total_limit`` (collective)."""
    if accelerator.is_main_process and total_limit is not None:
        existing = _checkpoints(output_dir)
        for old in existing[:max(0, len(existing) - total_limit + 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    checkpoint = output_dir / f"checkpoint-{step}"
    accelerator.save_state(str(checkpoint))
    if is_fsdp:
        export_adapter(accelerator, model, adapter_config, component, checkpoint / CHECKPOINT_ADAPTER)
    accelerator.wait_for_everyone()
    logger.info("saved %s", checkpoint)
