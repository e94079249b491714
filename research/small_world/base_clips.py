"""The small world's base-model training clips: rendered single shots with their captions, clips that cut once
to the same character elsewhere, reference frames of a clip's character drawn in other clips (the memory
layout), and the pixel-level weights and masks that put the loss where characters are.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np
import torch

from .world import Character, ClipSpec

__all__ = [
    "CAPTION_MODES",
    "character_weight",
    "check_mode_probs",
    "cut_clip",
    "latent_character_mask",
    "render_reference_frames",
    "render_training_clips",
    "to_video",
]

CAPTION_MODES = ("first", "named", "returns", "same")


def check_mode_probs(probs, name: str):
    probs = tuple(probs)
    if len(probs) != len(CAPTION_MODES) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"{name} must be {len(CAPTION_MODES)} probabilities (for {', '.join(CAPTION_MODES)}) "
                         f"summing to 1, got {probs}")


def cut_clip(rng: np.random.Generator, first: ClipSpec, mode: str, num_frames: int, height: int, width: int,
             temporal_scale: int = 4) -> tuple[np.ndarray, str, int]:
    """A clip of ``first`` that cuts once to its character in a random other clip (scene, place, motion).

    The cut falls between two latent frames (after pixel frame ``4j``), so no latent frame mixes the two
    shots, with at least two latent frames before it and one after. The caption describes the first shot in
    ``mode``, then the second as "the same character ...": after the cut, only the frames before it say who to
    draw.

    Returns ``(frames uint8 [T, H, W, 3], caption, cut)`` where ``cut`` is the first frame of the second shot.
    """
    latent_frames = (num_frames - 1) // temporal_scale + 1
    if (num_frames - 1) % temporal_scale or latent_frames < 3:
        raise ValueError(f"a cut needs num_frames = {temporal_scale}n+1 >= {2 * temporal_scale + 1}, got {num_frames}")
    j = int(rng.integers(1, latent_frames - 1))  # latent frames 0..j show the first shot
    cut = temporal_scale * j + 1
    second = ClipSpec.random(rng, first.characters[0])
    video = np.concatenate([first.render(num_frames, height, width)[:cut],
                            second.render(num_frames, height, width)[:num_frames - cut]])
    return video, f"{first.caption(mode)} then {second.caption('same')}", cut


def _render_chunk(job: tuple) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    seed, count, num_frames, height, width, mode_probs, exclude, cut_prob, cut_mode_probs = job
    rng = np.random.default_rng(seed)
    frames = np.empty((count, num_frames, height, width, 3), np.uint8)
    captions, identities, referential = [], [], []
    for i in range(count):
        character = Character.random(rng, exclude=exclude)
        spec = ClipSpec.random(rng, character)
        mode = CAPTION_MODES[int(rng.choice(len(CAPTION_MODES), p=mode_probs))]
        # No draw without cuts: the clips of a seed stay what they were before cuts existed.
        if cut_prob and rng.random() < cut_prob:
            mode = CAPTION_MODES[int(rng.choice(len(CAPTION_MODES), p=cut_mode_probs))]
            frames[i], caption, _ = cut_clip(rng, spec, mode, num_frames, height, width)
            same = caption  # after the cut it is referential already; before it, mostly too
        else:
            frames[i], caption = spec.render(num_frames, height, width), spec.caption(mode)
            same = spec.caption("same")
        captions.append(caption)
        identities.append(character.key)
        referential.append(same)
    return frames, captions, identities, referential


def render_training_clips(count: int, num_frames: int, height: int, width: int, seed: int = 0,
                          exclude: Sequence[str] = (), mode_probs: Sequence[float] = (0.5, 0.25, 0.15, 0.1),
                          workers: int = 1, chunk: int = 250,
                          cut_prob: float = 0.0, cut_mode_probs: Sequence[float] = (0.1, 0.05, 0.1, 0.75),
                          ) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """``count`` single-character clips of random characters (identities in ``exclude`` left out) in random
    scenes, with captions in the given mix of modes; a share ``cut_prob`` of them cut once to the same
    character elsewhere (:func:`cut_clip`), the part before the cut captioned in the ``cut_mode_probs`` mix.
    Deterministic per ``seed`` whatever ``workers``.

    Returns ``(frames uint8 [N, T, H, W, 3], captions, identity keys, referential captions)``, the last being
    each clip's caption in the ``same`` mode ("the same character ..."; a cut clip's caption as it is).
    """
    if not 0.0 <= cut_prob <= 1.0:
        raise ValueError(f"cut_prob must be in [0, 1], got {cut_prob}")
    check_mode_probs(mode_probs, "mode_probs")
    check_mode_probs(cut_mode_probs, "cut_mode_probs")
    jobs = [(int(np.random.default_rng([seed, i]).integers(2 ** 31)), min(chunk, count - start), num_frames,
             height, width, tuple(mode_probs), tuple(exclude), float(cut_prob), tuple(cut_mode_probs))
            for i, start in enumerate(range(0, count, chunk))]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    frames = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, num_frames, height, width, 3), np.uint8)
    return (frames, [c for p in parts for c in p[1]], [k for p in parts for k in p[2]],
            [c for p in parts for c in p[3]])


def _render_reference_chunk(job: tuple) -> np.ndarray:
    seed, keys, per_clip, num_frames, height, width = job
    rng = np.random.default_rng(seed)
    out = np.empty((len(keys), per_clip, height, width, 3), np.uint8)
    for i, key in enumerate(keys):
        character = Character.from_key(key)
        filled = 0
        while filled < per_clip:
            video = ClipSpec.random(rng, character).render(num_frames, height, width)
            take = min(2, per_clip - filled)
            for t in sorted(rng.choice(num_frames, size=take, replace=False)):
                out[i, filled] = video[t]
                filled += 1
    return out


def render_reference_frames(identities: Sequence[str], per_clip: int, num_frames: int, height: int, width: int,
                            seed: int = 0, workers: int = 1, chunk: int = 250) -> np.ndarray:
    """Memory frames for training clips: for each identity key, ``per_clip`` frames of that character in other
    clips (two random frames from each, every clip in a random scene, place and motion), the way a memory bank
    holds keyframes of earlier shots. Deterministic per ``seed`` whatever ``workers``.

    Returns uint8 ``[N, per_clip, H, W, 3]``.
    """
    if per_clip < 1:
        raise ValueError(f"per_clip must be >= 1, got {per_clip}")
    jobs = [(int(np.random.default_rng([seed, 7, i]).integers(2 ** 31)), list(identities[start:start + chunk]),
             per_clip, num_frames, height, width) for i, start in enumerate(range(0, len(identities), chunk))]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_reference_chunk, jobs))
    else:
        parts = [_render_reference_chunk(job) for job in jobs]
    return np.concatenate(parts) if parts else np.empty((0, per_clip, height, width, 3), np.uint8)


# Darkest background value 0.28; darkest pattern shade 0.78 x 0.5 = 0.39 (world.COLOURS, PATTERN_SHADE).
_CHARACTER_MIN_VALUE = 0.33


def to_video(frames_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] (tensor or array) -> float [B, 3, T, H, W] in [-1, 1]."""
    if isinstance(frames_uint8, np.ndarray):
        frames_uint8 = torch.from_numpy(np.ascontiguousarray(frames_uint8))
    return frames_uint8.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def character_weight(video: torch.Tensor, extra: float) -> torch.Tensor:
    """1 + extra on saturated pixels: the world draws characters in saturated colours and backgrounds muted or
    dark, so this puts the loss where identities are. The value floor sits between the darkest background
    (:data:`~research.small_world.scenes.BACKGROUND_MAX_VALUE`) and the darkest pattern shade, so patterns count
    too: a floor above the shade taught a VAE to paint bodies plain."""
    rgb = (video + 1) / 2
    top = rgb.amax(dim=1, keepdim=True)
    saturation = (top - rgb.amin(dim=1, keepdim=True)) / top.clamp_min(1e-3)
    return 1.0 + extra * ((saturation > 0.6) & (top > _CHARACTER_MIN_VALUE)).float()


def latent_character_mask(video: torch.Tensor, temporal_scale: int = 4, spatial_scale: int = 4) -> torch.Tensor:
    """Which latent cells show a character: ``video`` float ``[B, 3, T, H, W]`` in [-1, 1] (T = 4n+1) ->
    ``[B, 1, f, H/s, W/s]`` of 0/1, a cell being 1 if any of its pixels, in any frame it encodes, is a
    character's (saturated) pixel. Latent frame 0 encodes pixel frame 0, frame k the frames 4k-3 .. 4k."""
    from storymem.training.sources import mask_latent_cells

    return mask_latent_cells(character_weight(video, 1.0) - 1.0, temporal_scale, spatial_scale)
