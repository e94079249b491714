"""The resize rules keyframe selection and HPSv3 share (Qwen2-VL's 28-pixel grid).

Frames travel through `storymem.memory` as uint8 RGB numpy arrays ([H, W, 3] or [N, H, W, 3]); what callers may
hand in, and the conversion, is `storymem.images` (the one image contract of the package). Its conversions are
re-exported here under the names this package used before: `as_rgb_image` (`uint8_image`), `as_image_list`
(`uint8_images`), `as_video` (`uint8_video`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..images import uint8_image as as_rgb_image, uint8_images as as_image_list, uint8_video as as_video

__all__ = ["IMAGE_FACTOR", "SCORING_MAX_PIXELS", "SCORING_MIN_PIXELS", "as_image_list", "as_rgb_image", "as_video",
           "resize_for_scoring", "smart_resize"]

# Qwen2-VL's patch grid: HPSv3 and the release's keyframe resize both snap sides to multiples of 28.
IMAGE_FACTOR = 28
MAX_ASPECT_RATIO = 200
# The release resizes a shot's frames to at most 256 * 28 * 28 pixels (and, being Qwen's video rule, at least
# 48 * 28 * 28) before scoring and comparing them.
SCORING_MAX_PIXELS = 256 * IMAGE_FACTOR * IMAGE_FACTOR
SCORING_MIN_PIXELS = 48 * IMAGE_FACTOR * IMAGE_FACTOR


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = SCORING_MIN_PIXELS,
    max_pixels: int = SCORING_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio
    kept as closely as possible. Same arithmetic as the release (and qwen-vl-utils), so sizes match exactly."""
    if min(height, width) <= 0:
        raise ValueError(f"cannot resize an empty image ({height}x{width})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def resize_for_scoring(frames: np.ndarray) -> np.ndarray:
    """Step 1 of keyframe selection: resize a shot's uint8 frames [N, H, W, 3] to the `smart_resize` size
    (bilinear, antialiased, on uint8 like the release), returning uint8 [N, h, w, 3]."""
    height, width = frames.shape[1:3]
    target = smart_resize(height, width)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    resized = F.interpolate(video, size=list(target), mode="bilinear", antialias=True)
    return resized.permute(0, 2, 3, 1).contiguous().numpy()

