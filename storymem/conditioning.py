"""The memory-condition layout of Memory-to-Video: one implementation for training and inference.

The transformer of Wan2.2-I2V sees, per latent frame, 36 channels: [noisy latents (16), mask (4), y (16)].
StoryMem prepends ``fm`` memory latent frames along time, so every tensor here spans ``fm + f`` latent
frames, memory first:

* ``y`` = concat over time of (memory latents, video-condition latents);
* the mask is 1 for every memory latent frame, and for the video frames the pipeline conditions on
  (none for M2V, frame 0 for MI2V, frames 0..4 -> latent frames 0 and 1 for MM2V), else 0.

Memory images are VAE-encoded each on its own as a one-frame video (one latent frame per image, no
temporal compression); the video condition is a whole ``num_frames`` clip (the known frames then zeros)
encoded at once, exactly as Wan's I2V does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils.torch_utils import get_module_execution_device

__all__ = [
    "MemoryCondition",
    "build_condition_mask",
    "build_memory_condition",
    "encode_memory_frames",
    "encode_video_condition",
    "normalize_latents",
    "denormalize_latents",
    "num_latent_frames",
]

def num_latent_frames(num_frames: int, temporal_scale: int = 4) -> int:
    if num_frames < 1 or (num_frames - 1) % temporal_scale != 0:
        raise ValueError(f"num_frames must be of the form {temporal_scale}n+1, got {num_frames}")
    return (num_frames - 1) // temporal_scale + 1


def _latent_stats(vae, device, dtype):
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(device, dtype)
    std = torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(device, dtype)
    return mean, std


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the normalised space the transformer works in (as diffusers' Wan pipelines)."""
    mean, std = _latent_stats(vae, latents.device, latents.dtype)
    return (latents - mean) * (1.0 / std)


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _latent_stats(vae, latents.device, latents.dtype)
    return latents / (1.0 / std) + mean


def _vae_mode(vae, video: torch.Tensor) -> torch.Tensor:
    # Wan pipelines condition on the posterior's mode ("argmax"), never on a sample.
    return vae.encode(video).latent_dist.mode()


@torch.no_grad()
def encode_memory_frames(vae, frames: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Encode memory images, each as its own one-frame video.

    Args:
        frames: ``[M, 3, H, W]`` in [-1, 1].
    Returns:
        normalised latents ``[1, z_dim, M, h, w]`` (one latent frame per image), in ``frames.dtype``.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"memory frames must be [M, 3, H, W], got shape {tuple(frames.shape)}")
    # Where the VAE will run: with model/sequential CPU offload its weights still sit on the CPU here.
    vae_device = get_module_execution_device(vae)
    chunks = []
    for start in range(0, frames.shape[0], batch_size):
        # Batch of one-frame videos: [m, 3, 1, H, W]; the causal VAE treats batch items independently.
        chunk = frames[start : start + batch_size].unsqueeze(2).to(vae_device, vae.dtype)
        chunks.append(_vae_mode(vae, chunk))
    latents = torch.cat(chunks, dim=0)  # [M, z, 1, h, w]
    latents = latents.squeeze(2).permute(1, 0, 2, 3).unsqueeze(0)  # [1, z, M, h, w]
    return normalize_latents(vae, latents.to(frames.device, torch.float32)).to(frames.dtype)


@torch.no_grad()
def encode_video_condition(
    vae,
    context_frames: Optional[torch.Tensor],
    num_frames: int,
    height: int,
    width: int,
    batch_size: int = 1,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """VAE-encode the video condition: the given leading frames then zeros, as one ``num_frames`` clip.

    Args:
        context_frames: ``[B, 3, k, H, W]`` in [-1, 1] (k=1 for MI2V, 5 for MM2V) or ``None`` (M2V: all zeros).
    Returns:
        normalised latents ``[B, z_dim, f, h, w]`` with ``f = (num_frames - 1) / 4 + 1``.
    """
    vae_device = get_module_execution_device(vae)
    if context_frames is None:
        video = torch.zeros(batch_size, 3, num_frames, height, width)
    else:
        if context_frames.ndim != 5 or context_frames.shape[1] != 3:
            raise ValueError(f"context frames must be [B, 3, k, H, W], got shape {tuple(context_frames.shape)}")
        k = context_frames.shape[2]
        if k >= num_frames:
            raise ValueError(f"{k} context frames leave nothing to generate in a {num_frames}-frame shot")
        if tuple(context_frames.shape[-2:]) != (height, width):
            raise ValueError(f"context frames are {tuple(context_frames.shape[-2:])}, expected {(height, width)}")
        zeros = context_frames.new_zeros(context_frames.shape[0], 3, num_frames - k, height, width)
        video = torch.cat([context_frames, zeros], dim=2)
    latents = _vae_mode(vae, video.to(vae_device, vae.dtype))
    device = device if device is not None else latents.device
    return normalize_latents(vae, latents.to(device, torch.float32)).to(dtype)


def build_condition_mask(
    num_memory_frames: int,
    num_frames: int,
    num_context_frames: int,
    latent_height: int,
    latent_width: int,
    temporal_scale: int = 4,
    batch_size: int = 1,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The 4-channel mask over ``fm + f`` latent frames, built in pixel time like Wan I2V.

    Pixel-time mask of length ``fm + num_frames``: ones for the memory entries and the first
    ``num_context_frames`` video frames. Entries ``0..fm`` are each repeated ``temporal_scale`` times
    (the memory images and video frame 0 stand for a whole latent frame each), the rest are kept, and the
    sequence is grouped by ``temporal_scale`` into channels.

    Returns ``[B, temporal_scale, fm + f, latent_height, latent_width]``.
    """
    f = num_latent_frames(num_frames, temporal_scale)
    if not 0 <= num_context_frames < num_frames:
        raise ValueError(f"num_context_frames must be in [0, {num_frames}), got {num_context_frames}")
    pixel = torch.zeros(num_memory_frames + num_frames, dtype=dtype)
    pixel[: num_memory_frames + num_context_frames] = 1
    head = pixel[: num_memory_frames + 1].repeat_interleave(temporal_scale)
    pixel = torch.cat([head, pixel[num_memory_frames + 1 :]])
    mask = pixel.view(num_memory_frames + f, temporal_scale).transpose(0, 1)  # [4, fm+f]
    mask = mask[None, :, :, None, None].expand(batch_size, -1, -1, latent_height, latent_width)
    return mask.to(device).contiguous()


@dataclass
class MemoryCondition:
    """What the transformer is conditioned on, besides the noisy latents and the text."""

    mask: torch.Tensor  # [B, 4, fm + f, h, w]
    latents: torch.Tensor  # y: [B, z_dim, fm + f, h, w]
    num_memory_frames: int
    num_context_frames: int

    @property
    def tensor(self) -> torch.Tensor:
        """``[mask, y]`` along channels: concatenate after the noisy latents to get the 36-channel input."""
        return torch.cat([self.mask, self.latents], dim=1)

    @property
    def num_video_frames(self) -> int:
        return self.latents.shape[2] - self.num_memory_frames


def build_memory_condition(
    memory_latents: Optional[torch.Tensor],
    video_condition_latents: torch.Tensor,
    num_frames: int,
    num_context_frames: int,
    temporal_scale: int = 4,
) -> MemoryCondition:
    """Assemble mask and condition latents for M2V (0 context frames), MI2V (1) or MM2V (5).

    Args:
        memory_latents: ``[B or 1, z, fm, h, w]`` normalised (``encode_memory_frames``), or ``None``.
        video_condition_latents: ``[B, z, f, h, w]`` normalised (``encode_video_condition``).
    """
    batch, _, f, h, w = video_condition_latents.shape
    expected_f = num_latent_frames(num_frames, temporal_scale)
    if f != expected_f:
        raise ValueError(f"video condition has {f} latent frames, {num_frames} frames need {expected_f}")
    if memory_latents is None or memory_latents.shape[2] == 0:
        fm, y = 0, video_condition_latents
    else:
        if memory_latents.ndim != 5 or tuple(memory_latents.shape[-2:]) != (h, w):
            raise ValueError(
                f"memory latents {tuple(memory_latents.shape)} do not match the video condition {(h, w)} grid"
            )
        memory_latents = memory_latents.to(video_condition_latents)
        if memory_latents.shape[0] != batch:
            memory_latents = memory_latents.expand(batch, -1, -1, -1, -1)
        fm = memory_latents.shape[2]
        y = torch.cat([memory_latents, video_condition_latents], dim=2)
    mask = build_condition_mask(
        fm, num_frames, num_context_frames, h, w, temporal_scale, batch, y.device, y.dtype
    )
    return MemoryCondition(mask=mask, latents=y, num_memory_frames=fm, num_context_frames=num_context_frames)

