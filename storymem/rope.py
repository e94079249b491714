"""Memory-aware rotary position embedding for diffusers' ``WanTransformer3DModel``.

Wan's 3D RoPE gives every token a (time, height, width) position. StoryMem prepends ``fm`` memory latent
frames along time. Two placements of their time positions:

* ``"negative"`` (the paper, and what the published weights were trained with): memory frame ``j``
  (0 = oldest) at ``-(fm - j) * stride`` (stride 5), the shot at ``0 .. f-1``, so the new shot keeps the
  positions it was pre-trained with;
* ``"contiguous"`` (the first public release's inference code, which left the shift out): plain positions
  ``0 .. fm + f - 1`` over the whole sequence. Use it only to reproduce that release's videos, or with an
  adapter trained that way.

The module replaces ``transformer.rope`` in place (same name, same output shapes), so the rest of the
model, ``_cp_plan`` context parallelism (which splits this module's outputs along the sequence), caching
hooks and compilation keep working. The frequency tables are diffusers' own buffers; a negative position
``-p`` uses ``cos(p)`` and ``-sin(p)`` of those tables, which is exact, and with no memory the output is the
stock module's, bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from .defaults import ROPE_STRIDE

__all__ = ["ROPE_MODES", "MemoryRotaryPosEmbed", "install_memory_rope", "memory_rope", "time_positions"]

ROPE_MODES = ("negative", "contiguous")


def time_positions(num_memory_frames: int, num_video_frames: int, mode: str = "negative",
                   stride: int = ROPE_STRIDE) -> torch.Tensor:
    """Latent-frame time positions of ``fm`` memory frames followed by ``f`` video frames."""
    if mode not in ROPE_MODES:
        raise ValueError(f"memory_rope must be one of {ROPE_MODES}, got {mode!r}")
    if num_memory_frames < 0 or num_video_frames < 1:
        raise ValueError(f"need fm >= 0 and f >= 1, got fm={num_memory_frames}, f={num_video_frames}")
    video = torch.arange(num_video_frames, dtype=torch.long)
    if mode == "contiguous":
        return torch.arange(num_memory_frames + num_video_frames, dtype=torch.long)
    if stride < 1:
        raise ValueError(f"memory rope stride must be >= 1, got {stride}")
    memory = -(num_memory_frames - torch.arange(num_memory_frames, dtype=torch.long)) * stride
    return torch.cat([memory, video])


class MemoryRotaryPosEmbed(WanRotaryPosEmbed):
    """``WanRotaryPosEmbed`` with explicit time positions for memory frames.

    The memory layout is per call state (set by the pipeline or trainer through :func:`memory_rope`), since
    the transformer's forward passes nothing but the hidden states to its rope.
    """

    def __init__(self, attention_head_dim, patch_size, max_seq_len, theta: float = 10000.0):
        super().__init__(attention_head_dim, patch_size, max_seq_len, theta)
        self.num_memory_frames = 0
        self.mode = "negative"
        self.stride = ROPE_STRIDE

    @classmethod
    def from_wan_rope(cls, rope: WanRotaryPosEmbed) -> "MemoryRotaryPosEmbed":
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in rope.__dict__.items() if not k.startswith("_")})
        # Share diffusers' frequency tables (buffers: follow .to(), offload and dtype moves).
        for name, buf in rope.named_buffers(recurse=False):
            new.register_buffer(name, buf, persistent=False)
        new.num_memory_frames, new.mode, new.stride = 0, "negative", ROPE_STRIDE
        return new

    def set_memory_layout(self, num_memory_frames: int, mode: str = "negative", stride: int = ROPE_STRIDE):
        if mode not in ROPE_MODES:
            raise ValueError(f"memory_rope must be one of {ROPE_MODES}, got {mode!r}")
        if num_memory_frames < 0:
            raise ValueError(f"num_memory_frames must be >= 0, got {num_memory_frames}")
        if mode == "negative" and num_memory_frames * stride >= self.max_seq_len:
            raise ValueError(
                f"{num_memory_frames} memory frames at stride {stride} exceed the rope table ({self.max_seq_len})"
            )
        self.num_memory_frames, self.mode, self.stride = num_memory_frames, mode, stride

    def forward(self, hidden_states: torch.Tensor):
        fm = self.num_memory_frames
        if fm == 0 or self.mode == "contiguous":
            # Contiguous positions are what the stock module computes over fm + f frames.
            return super().forward(hidden_states)

        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        if fm >= ppf:
            raise ValueError(f"rope was told of {fm} memory frames but the input has only {ppf} latent frames")
        positions = time_positions(fm, ppf - fm, self.mode, self.stride).to(self.freqs_cos.device)

        split_sizes = [self.t_dim, self.h_dim, self.w_dim]
        cos_t, cos_h, cos_w = self.freqs_cos.split(split_sizes, dim=1)
        sin_t, sin_h, sin_w = self.freqs_sin.split(split_sizes, dim=1)

        # cos(-x) = cos(x), sin(-x) = -sin(x): exact in floating point, so negative rows come from the table.
        index = positions.abs()
        sign = torch.where(positions < 0, -1.0, 1.0).to(sin_t.dtype)[:, None]
        cos_f, sin_f = cos_t[index], sin_t[index] * sign

        def grid(t_part, h_part, w_part):
            t_part = t_part.view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)
            h_part = h_part[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)
            w_part = w_part[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)
            return torch.cat([t_part, h_part, w_part], dim=-1).reshape(1, ppf * pph * ppw, 1, -1)

        return grid(cos_f, cos_h, cos_w), grid(sin_f, sin_h, sin_w)


def install_memory_rope(transformer) -> MemoryRotaryPosEmbed:
    """Swap ``transformer.rope`` for a :class:`MemoryRotaryPosEmbed` (idempotent). Returns it."""
    rope = transformer.rope
    if isinstance(rope, MemoryRotaryPosEmbed):
        return rope
    if not isinstance(rope, WanRotaryPosEmbed):
        raise TypeError(f"expected a Wan transformer with a WanRotaryPosEmbed, found {type(rope).__name__}")
    transformer.rope = MemoryRotaryPosEmbed.from_wan_rope(rope)
    return transformer.rope


@contextlib.contextmanager
def memory_rope(transformers, num_memory_frames: int, mode: str = "negative",
                stride: int = ROPE_STRIDE) -> Iterator[None]:
    """Within the block, the given transformer(s) place ``num_memory_frames`` leading frames as memory."""
    if not isinstance(transformers, (list, tuple)):
        transformers = [transformers]
    ropes = [install_memory_rope(t) for t in transformers if t is not None]
    previous = [(r.num_memory_frames, r.mode, r.stride) for r in ropes]
    try:
        for r in ropes:
            r.set_memory_layout(num_memory_frames, mode, stride)
        yield
    finally:
        for r, (fm, m, s) in zip(ropes, previous):
            r.num_memory_frames, r.mode, r.stride = fm, m, s

