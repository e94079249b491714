"""Image and video input checks, and the resize rules keyframe selection and HPSv3 share.

Frames travel through `storymem.memory` as uint8 RGB numpy arrays ([H, W, 3] or [N, H, W, 3]). The helpers here
turn what callers hand in (numpy arrays, PIL images, torch tensors) into that form, or raise a `ValueError`
naming the offending item before any model runs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Qwen2-VL's patch grid: HPSv3 and the release's keyframe resize both snap sides to multiples of 28.
IMAGE_FACTOR = 28
MAX_ASPECT_RATIO = 200
# The release resizes a shot's frames to at most 256 * 28 * 28 pixels (and, being Qwen's video rule, at least
# 48 * 28 * 28) before scoring and comparing them.
SCORING_MAX_PIXELS = 256 * IMAGE_FACTOR * IMAGE_FACTOR
SCORING_MIN_PIXELS = 48 * IMAGE_FACTOR * IMAGE_FACTOR


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"numpy array of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, torch.Tensor):
        return f"torch tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, Image.Image):
        return f"PIL image of mode {x.mode} and size {x.size[0]}x{x.size[1]}"
    return type(x).__name__


def as_rgb_image(image: Any, what: str = "image") -> np.ndarray:
    """One image as a uint8 [H, W, 3] RGB array.

    Accepts a PIL image in mode RGB, or a uint8 numpy array / CPU torch tensor of shape [H, W, 3]. Anything
    else (RGBA, grey, float arrays, CHW layout) raises a `ValueError` naming `what`: silently converting
    such inputs would hide a caller bug (a float image in [0, 1] cast to uint8 is black).
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"{what}: expected an RGB image, got a PIL image in mode {image.mode!r}; convert it first")
        return np.asarray(image, dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what}: expected a uint8 [H, W, 3] array or a PIL image, got {_describe(image)}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what}: expected an RGB image of shape [H, W, 3], got {_describe(image)}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8 (0..255), got {_describe(image)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{what}: image is empty ({_describe(image)})")
    return image


def as_image_list(images: Any, what: str = "images") -> list[np.ndarray]:
    """A batch of images (sizes may differ) as a list of uint8 [H, W, 3] arrays.

    Accepts a sequence of PIL images / uint8 arrays, a uint8 array [N, H, W, 3], a uint8 tensor [N, H, W, 3],
    or a float tensor [N, 3, H, W] with values in [0, 1] (torchvision's layout).
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point():
        if images.shape[1] != 3:
            raise ValueError(f"{what}: a float tensor must be [N, 3, H, W] in [0, 1], got {_describe(images)}")
        values = images.detach().float()
        if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError(f"{what}: a float tensor must hold finite values in [0, 1]")
        as_uint8 = (values * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [frame for frame in as_uint8]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        if array.ndim == 3 and array.shape[-1] == 3:
            raise ValueError(f"{what}: got a single image {_describe(images)}; pass a list or an [N, H, W, 3] batch")
        if array.ndim != 4:
            raise ValueError(f"{what}: expected a batch of shape [N, H, W, 3], got {_describe(images)}")
        return [as_rgb_image(frame, f"{what}[{i}]") for i, frame in enumerate(array)]
    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise ValueError(f"{what}: expected a list of images or an [N, H, W, 3] array, got {_describe(images)}")
    return [as_rgb_image(image, f"{what}[{i}]") for i, image in enumerate(images)]


def as_video(frames: Any, what: str = "frames") -> np.ndarray:
    """A shot's frames as one uint8 array [N, H, W, 3] (N >= 1, every frame the same size).

    Also takes a list of same-sized images, or a float tensor [N, 3, H, W] in [0, 1] (see `as_image_list`)."""
    if isinstance(frames, torch.Tensor) and not frames.is_floating_point():
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"{what}: expected RGB frames of shape [N, H, W, 3], got {_describe(frames)}")
        if frames.dtype != np.uint8:
            raise ValueError(f"{what}: expected dtype uint8 (0..255), got {_describe(frames)}")
        if frames.shape[0] == 0:
            raise ValueError(f"{what}: the video has no frames")
        if frames.shape[1] == 0 or frames.shape[2] == 0:
            raise ValueError(f"{what}: frames are empty ({_describe(frames)})")
        return frames
    images = as_image_list(frames, what)
    if not images:
        raise ValueError(f"{what}: the video has no frames")
    first = images[0].shape
    for i, image in enumerate(images):
        if image.shape != first:
            raise ValueError(
                f"{what}: frames must share one size; {what}[{i}] is {image.shape[0]}x{image.shape[1]} "
                f"but {what}[0] is {first[0]}x{first[1]}"
            )
    return np.stack(images)


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


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(as_rgb_image(image)))
