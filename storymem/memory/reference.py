"""The StoryMem release's keyframe extraction, restated literally, kept as the yardstick for parity checks.

`release_keyframes` follows the release's `extract_keyframe_indices` / `save_keyframes` line by line: every
adaptive pass resizes all frames again and restarts from frame 0, every comparison runs the embedder on both
frames again (here: one embedder call holding the two frames; the release makes two single-image calls), and
every aesthetic check calls the scorer on that one frame, even when it was scored on an earlier pass.

It exists so tests and `benchmarks/bench_keyframes.py` can check that `KeyframeSelector` picks exactly the
same frames while doing far less work. Do not use it for rendering.

One deliberate difference from the release: frames reach the embedder as uint8 images, so the embedder's own
preprocessing applies (the release's CLIP helper skips the /255 scaling when a frame's maximum is <= 1.5,
i.e. on an all-black frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..images import uint8_images, uint8_video
from .images import IMAGE_FACTOR, SCORING_MAX_PIXELS, SCORING_MIN_PIXELS, smart_resize

MIN_FRAME_SIMILARITY = 0.9
MAX_KEYFRAME_NUM = 3
ADAPTIVE_ALPHA = 0.01
HPSV3_QUALITY_THRESHOLD = 3.0


@dataclass
class ReferenceResult:
    indices: list[int]  # kept keyframes (after the memory dedup)
    candidates: list[int]  # keyframes of the final adaptive pass
    threshold: float
    embed_calls: int
    embedded_images: int
    score_calls: int


def _hwc(frame: torch.Tensor) -> np.ndarray:
    """[3, H, W] tensor with integer values -> uint8 [H, W, 3], as the release hands frames to its models."""
    return frame.permute(1, 2, 0).numpy().astype(np.uint8).clip(0, 255)


def release_keyframes(
    frames: Any,
    embedder: Any,
    scorer: Any,
    memory: Any = (),
    threshold: float = MIN_FRAME_SIMILARITY,
    max_keyframes: int = MAX_KEYFRAME_NUM,
    threshold_step: float = ADAPTIVE_ALPHA,
    aesthetic_threshold: float = HPSV3_QUALITY_THRESHOLD,
    dedup_threshold: float = MIN_FRAME_SIMILARITY,
) -> ReferenceResult:
    """The release's keyframe indices for `frames` (uint8 [N, H, W, 3]) given remembered `memory` images."""
    counts = {"embed_calls": 0, "embedded_images": 0, "score_calls": 0}

    def frame_sim(frame1: torch.Tensor, frame2: torch.Tensor) -> float:
        z = embedder.embed([_hwc(frame1), _hwc(frame2)])
        counts["embed_calls"] += 1
        counts["embedded_images"] += 2
        z1 = F.normalize(z[0:1].float(), dim=-1)
        z2 = F.normalize(z[1:2].float(), dim=-1)
        return (z1 * z2).sum(dim=-1).item()

    def is_low_quality(frame: torch.Tensor) -> bool:
        counts["score_calls"] += 1
        score = float(scorer.score([_hwc(frame)], [""])[0])
        return score < aesthetic_threshold

    def extract_keyframe_indices(frames: torch.Tensor, threshold: float) -> list[int]:
        num_frames, _, height, width = frames.shape
        resized_height, resized_width = smart_resize(
            height, width, factor=IMAGE_FACTOR, min_pixels=SCORING_MIN_PIXELS, max_pixels=SCORING_MAX_PIXELS
        )
        resized_frames = F.interpolate(
            frames, [resized_height, resized_width], mode="bilinear", antialias=True
        ).float()

        first_keyframe_indice = 0
        while is_low_quality(resized_frames[first_keyframe_indice]):
            first_keyframe_indice += 1
            if first_keyframe_indice >= num_frames:
                return []
        keyframe_indices = [first_keyframe_indice]
        last_keyframe = resized_frames[first_keyframe_indice]
        for i in range(2, resized_frames.size(0)):
            current_frame = resized_frames[i]
            sim = frame_sim(last_keyframe, current_frame)
            if sim < threshold and not is_low_quality(current_frame):
                keyframe_indices.append(i)
                last_keyframe = current_frame
        return keyframe_indices

    video = torch.from_numpy(np.ascontiguousarray(uint8_video(frames))).permute(0, 3, 1, 2)  # T, C, H, W
    while True:
        keyframe_indices = extract_keyframe_indices(video, threshold)
        if len(keyframe_indices) > max_keyframes:
            threshold -= threshold_step
        else:
            break

    remembered_images = uint8_images(memory, "memory") if memory is not None and len(memory) > 0 else []
    memory_bank = [torch.from_numpy(np.ascontiguousarray(m)).permute(2, 0, 1) for m in remembered_images]
    kept = []
    for index in keyframe_indices:
        keyframe = video[index]
        pass_flag = False
        for remembered in memory_bank:
            if frame_sim(keyframe, remembered) > dedup_threshold:
                pass_flag = True
                break
        if not pass_flag:
            kept.append(index)
    return ReferenceResult(indices=kept, candidates=keyframe_indices, threshold=threshold, **counts)
