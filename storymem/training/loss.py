"""One training step's loss: the memory condition built exactly as at inference, rectified-flow velocity loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..conditioning import build_memory_condition
from ..defaults import BOUNDARY_RATIO, ROPE_STRIDE
from ..rope import memory_rope
from .flow import TRAIN_FLOW_SHIFT, flow_interpolate, flow_velocity_target, sample_timesteps

__all__ = ["flow_matching_loss", "build_training_condition"]


def build_training_condition(batch: dict, temporal_scale: int = 4):
    """The :class:`~storymem.conditioning.MemoryCondition` of a batch, via the function inference uses."""
    memory = batch["memory_latents"].float()
    return build_memory_condition(memory if memory.shape[2] else None, batch["video_condition"].float(),
                                  batch["num_frames"], batch["num_context_frames"], temporal_scale)


def flow_matching_loss(model, batch: dict, expert: str = "high", flow_shift: float = TRAIN_FLOW_SHIFT,
                       boundary_ratio: float = BOUNDARY_RATIO, rope_mode: str = "negative",
                       rope_stride: int = ROPE_STRIDE,
                       loss_on_memory: bool = False, rope_model=None, weight_dtype: Optional[torch.dtype] = None,
                       generator: Optional[torch.Generator] = None, timesteps: Optional[torch.Tensor] = None,
                       temporal_scale: int = 4, return_errors: bool = False,
                       subject_loss_weight: float = 1.0, preserve_base_weight: float = 0.0,
                       base_only=None) -> tuple[torch.Tensor, dict]:
    """Rectified-flow velocity loss of ``model`` on one batch of :func:`~storymem.training.data.collate_samples`.

    The noisy input spans memory and target frames alike (as in sampling, where the scheduler steps all
    ``fm + f`` frames): ``x_t = (1 - t) x0 + t eps`` with ``x0 = [memory latents, target latents]``; the loss is
    ``|v - (eps - x0)|^2`` averaged over the target's latent frames (and the memory frames with
    ``loss_on_memory``). With ``subject_loss_weight`` w != 1 the target's latent cells that show the subject
    (``batch["subject_mask"]`` ``[B, f, h, w]``, from prepared subject masks) weigh w times the others (a
    weighted mean, so the loss keeps its scale): in clips where the subject is small, what memory is for
    (who it is) is otherwise a small share of the loss.

    With ``preserve_base_weight`` w > 0, a batch without memory frames adds
    ``w * |v - v_base|^2``, where ``v_base`` is the frozen base's own prediction for the same input (the
    model called with its adapter off, under ``base_only()``): without memory the adapter has nothing to add,
    so it is held to what the base already does there (a story's first shot, a new character's introduction)
    and spends itself on what memory adds.

    Args:
        model: the (possibly wrapped) transformer to call.
        rope_model: the unwrapped transformer whose rope learns the memory layout (default ``model``).
        generator: CPU generator for timesteps and noise (default: the global RNGs).
        timesteps: fixed integer timesteps ``[B]`` instead of sampling (evaluation).
        base_only: context manager factory under which ``model`` runs without its adapter (needed with
            ``preserve_base_weight``).
        return_errors: also return the squared error of every target element, ``info["errors"]``
            ``[B, C, f, h, w]`` (detached), for losses over parts of a clip (evaluation).
    """
    latents = batch["latents"].float()
    condition = build_training_condition(batch, temporal_scale)
    fm = condition.num_memory_frames
    # The memory frames' clean latents are the memory part of y.
    x0 = torch.cat([condition.latents[:, :, :fm], latents], dim=2) if fm else latents
    batch_size = x0.shape[0]
    if timesteps is None:
        timesteps, sigmas = sample_timesteps(batch_size, expert, flow_shift, boundary_ratio, generator=generator)
    else:
        sigmas = timesteps.to(torch.float32) / 1000.0
    timesteps, sigmas = timesteps.to(x0.device), sigmas.to(x0.device)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    noisy = flow_interpolate(x0, noise, sigmas)
    target = flow_velocity_target(x0, noise)

    rope_model = rope_model if rope_model is not None else model
    weight_dtype = weight_dtype or rope_model.dtype
    hidden_states = torch.cat([noisy, condition.tensor], dim=1).to(weight_dtype)
    inputs = dict(hidden_states=hidden_states, timestep=timesteps,
                  encoder_hidden_states=batch["prompt_embeds"].to(weight_dtype), return_dict=False)
    with memory_rope(rope_model, fm, rope_mode, rope_stride):
        prediction = model(**inputs)[0]
    preserve = None
    if preserve_base_weight > 0 and fm == 0:
        if base_only is None:
            raise ValueError("preserve_base_weight needs base_only, a context that turns the adapter off")
        with torch.no_grad(), base_only(), memory_rope(rope_model, 0, rope_mode, rope_stride):
            base_prediction = model(**inputs)[0]
        preserve = F.mse_loss(prediction.float(), base_prediction.float())
    start = 0 if loss_on_memory else fm
    if subject_loss_weight == 1.0:
        loss = F.mse_loss(prediction[:, :, start:].float(), target[:, :, start:].float())
    else:
        if "subject_mask" not in batch:
            raise ValueError("subject_loss_weight needs the batch's 'subject_mask' (prepare with subject masks)")
        subject = batch["subject_mask"].to(x0.device, torch.float32).unsqueeze(1)  # [B, 1, f, h, w]
        weights = 1.0 + (subject_loss_weight - 1.0) * subject
        if start < fm:  # memory frames, when in the loss, weigh 1
            weights = torch.cat([weights.new_ones(batch_size, 1, fm - start, *weights.shape[-2:]), weights], dim=2)
        weights = weights.expand_as(prediction[:, :, start:])
        errors = (prediction[:, :, start:].float() - target[:, :, start:].float()).square()
        loss = (errors * weights).sum() / weights.sum()
    if preserve is not None:
        loss = loss + preserve_base_weight * preserve
    info = {"timesteps": timesteps, "num_memory_frames": fm}
    if preserve is not None:
        info["preserve_loss"] = preserve.detach()
    if return_errors:
        info["errors"] = (prediction[:, :, fm:].detach().float() - target[:, :, fm:].float()).square()
    return loss, info
