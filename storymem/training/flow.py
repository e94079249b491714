"""Rectified-flow training targets and per-expert timestep sampling for Wan2.2's two experts.

Wan2.2-A14B splits denoising between two experts at the timestep ``boundary_ratio * 1000`` (900): the
high-noise expert (``transformer``) runs ``t >= 900``, the low-noise one (``transformer_2``) ``t < 900``, where
``t = 1000 * sigma`` and ``sigma`` is the *shifted* noise level the scheduler steps through
(``sigma' = shift * s / (1 + (shift - 1) * s)``). Each expert is trained only on its side of that boundary.

Timesteps are integers (``sigma = t / 1000`` exactly): an integer tensor reaches the transformer unchanged
under any mixed-precision wrapper (FSDP casts floating inputs to bf16, which would round ``t`` near 1000 by up
to 2), and the noise level used to build ``x_t`` is exactly the one the model is told.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..defaults import BOUNDARY_RATIO

__all__ = [
    "EXPERTS",
    "TRAIN_FLOW_SHIFT",
    "expert_timestep_range",
    "flow_interpolate",
    "flow_velocity_target",
    "sample_timesteps",
    "shift_sigma",
    "unshift_sigma",
]

NUM_TRAIN_TIMESTEPS = 1000
# Wan's training shift (the plain Wan2.2-I2V config's 5.0), which noise levels are drawn with here. It is not the
# sampling shift: the M2V release samples with storymem.defaults.FLOW_SHIFT (4.0).
TRAIN_FLOW_SHIFT = 5.0
# CLI name -> pipeline component of the expert ("all": the one transformer of a single-expert base).
EXPERTS = {"high": "transformer", "low": "transformer_2", "all": "transformer"}


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: ``shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of :func:`shift_sigma`."""
    return sigma / (shift - (shift - 1.0) * sigma)


def expert_timestep_range(expert: str, boundary_ratio: float = BOUNDARY_RATIO,
                          num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, int]:
    """Inclusive integer timestep range an expert is trained on.

    ``"high"``: ``[ceil(boundary), T]``; ``"low"``: ``[1, ceil(boundary) - 1]`` (``t = 0`` is the clean sample,
    where the velocity target is pure noise and teaches nothing); ``"all"``: ``[1, T]`` for a single-expert model.
    """
    if not 0.0 < boundary_ratio < 1.0:
        raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
    boundary = int(-(-boundary_ratio * num_train_timesteps // 1))  # ceil without float surprises
    if expert == "high":
        return boundary, num_train_timesteps
    if expert == "low":
        return 1, boundary - 1
    if expert == "all":
        return 1, num_train_timesteps
    raise ValueError(f"expert must be 'high', 'low' or 'all', got {expert!r}")


def sample_timesteps(batch_size: int, expert: str, shift: float = TRAIN_FLOW_SHIFT,
                     boundary_ratio: float = BOUNDARY_RATIO,
                     generator: Optional[torch.Generator] = None, device=None,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps on one expert's side of the boundary, distributed as Wan's shifted uniform noise levels.

    ``u ~ U(0, 1)`` restricted to the expert's range (equivalently: sample ``sigma' = shift(u)`` and keep the
    ones on this side), rounded to the integer timestep grid.

    Returns:
        ``(timesteps, sigmas)``: ``long [B]`` and ``float32 [B]`` with ``sigmas = timesteps / 1000``.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    lo, hi = expert_timestep_range(expert, boundary_ratio, num_train_timesteps)
    # Bounds of u whose shifted sigma rounds into [lo, hi].
    edges = torch.tensor([(lo - 0.5) / num_train_timesteps, (hi + 0.5) / num_train_timesteps], dtype=torch.float64)
    u_lo, u_hi = unshift_sigma(edges.clamp(0.0, 1.0), shift).tolist()
    # Drawn on the CPU (with the CPU generator or the global CPU RNG, which checkpoints restore), so a run is
    # reproducible whatever the device.
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    u = u_lo + (u_hi - u_lo) * u
    t = torch.round(shift_sigma(u, shift) * num_train_timesteps).clamp(lo, hi).to(torch.long)
    t = t.to(device) if device is not None else t
    return t, t.to(torch.float32) / num_train_timesteps


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) * x0 + t * eps`` with ``t = sigma`` per sample."""
    s = _expand(sigmas, x0)
    return (1.0 - s) * x0 + s * noise


def flow_velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity ``eps - x0`` that Wan's transformer predicts."""
    return noise - x0
