"""The one image contract of storymem: which image forms the pipeline and the memory accept, and the forms
they are turned into.

**One image** may be

* a PIL image (any mode; converted to RGB, as diffusers does);
* a numpy array ``[H, W, 3]`` (channels last, as PIL and video decoders give them): ``uint8`` in 0..255 or
  float in [0, 1];
* a torch tensor ``[3, H, W]`` (channels first, as torchvision and diffusers use them): ``uint8`` or float
  in [0, 1].

**Several images** (memory images, keyframes, a shot's frames) may be a list or tuple of single images
(sizes and kinds may differ), a numpy array ``[N, H, W, 3]`` or a torch tensor ``[N, 3, H, W]``; where a
list of images is expected, one single image stands for a list of one. A **video** (:func:`uint8_video`)
must be a batch: frames of one size.

What each function returns:

=====================  =====================================================================
:func:`split_images`   the individual images of a batch, unconverted but checked
:func:`uint8_image`    ``np.ndarray`` uint8 ``[H, W, 3]`` (the memory's form)
:func:`uint8_images`   a list of those
:func:`uint8_video`    ``np.ndarray`` uint8 ``[N, H, W, 3]``, one size for all frames
:func:`float_image`    ``torch.Tensor`` float32 ``[3, H, W]`` in [0, 1] on the CPU (the pipeline's form)
=====================  =====================================================================

Float images are checked to lie in [0, 1] (a float image in 0..255 would otherwise turn white, one in [-1, 1]
half black); anything else raises a ``ValueError`` (or ``TypeError`` for a wrong kind of object) naming the
offending item.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import PIL.Image
import torch

__all__ = ["ImageLike", "describe", "split_images", "uint8_image", "uint8_images", "uint8_video", "float_image"]

ImageLike = Union[PIL.Image.Image, np.ndarray, torch.Tensor]

# Float images may overshoot [0, 1] by rounding (a decoder's output); further out is a caller's bug.
_FLOAT_TOLERANCE = 1e-3


def describe(x: Any) -> str:
    """A short description of an image-like object for error messages."""
    if isinstance(x, np.ndarray):
        return f"numpy array of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, torch.Tensor):
        return f"torch tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, PIL.Image.Image):
        return f"PIL image of mode {x.mode} and size {x.size[0]}x{x.size[1]}"
    return type(x).__name__


def _check_single(image: Any, what: str) -> None:
    """Raise unless ``image`` is one image in an accepted form (layout and dtype; float ranges are checked on
    conversion)."""
    if isinstance(image, PIL.Image.Image):
        if image.size[0] == 0 or image.size[1] == 0:
            raise ValueError(f"{what}: image is empty ({describe(image)})")
        return
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{what}: numpy images must be RGB arrays [H, W, 3] (HxWx3), got {describe(image)}")
        spatial, dtype_ok = image.shape[:2], image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{what}: tensor images must be channels first [3, H, W] (3xHxW), got {describe(image)}")
        spatial, dtype_ok = tuple(image.shape[1:]), image.dtype == torch.uint8 or image.is_floating_point()
    else:
        raise TypeError(f"{what}: expected a PIL image, a numpy array or a torch tensor, got {describe(image)}")
    if not dtype_ok:
        raise ValueError(f"{what}: images must be uint8 (0..255) or float in [0, 1], got {describe(image)}")
    if 0 in spatial:
        raise ValueError(f"{what}: image is empty ({describe(image)})")


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    # torch warns on read-only arrays (np.asarray of a PIL image, a memory-mapped file): copy those.
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _checked_float(values: torch.Tensor, what: str) -> torch.Tensor:
    values = values.float()
    if not torch.isfinite(values).all() or values.min() < -_FLOAT_TOLERANCE or values.max() > 1 + _FLOAT_TOLERANCE:
        raise ValueError(f"{what}: float images must hold finite values in [0, 1] (uint8 images: 0..255)")
    return values.clamp(0, 1)


def float_image(image: ImageLike, what: str = "image") -> torch.Tensor:
    """One image as a float32 ``[3, H, W]`` tensor in [0, 1] on the CPU (uint8 values are divided by 255)."""
    _check_single(image, what)
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        tensor = _from_numpy(image).permute(2, 0, 1)
    else:
        tensor = image.detach().cpu()
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    return _checked_float(tensor, what)


def uint8_image(image: ImageLike, what: str = "image") -> np.ndarray:
    """One image as a uint8 ``[H, W, 3]`` RGB array (uint8 arrays are returned as they are, not copied; float
    values are rounded from [0, 1] to 0..255)."""
    _check_single(image, what)
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return image.detach().cpu().permute(1, 2, 0).numpy()
        values = _checked_float(image.detach().cpu(), what).permute(1, 2, 0)
    else:
        values = _checked_float(_from_numpy(image), what)
    return (values * 255.0).round().to(torch.uint8).numpy()


def split_images(images: Any, what: str = "images") -> list:
    """The single images of ``images`` (see the module doc for the accepted forms), each checked, unconverted.
    ``None`` is no image."""
    if images is None:
        return []
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        layout_ok = images.shape[-1] == 3 if isinstance(images, np.ndarray) else images.shape[1] == 3
        if not layout_ok:
            expected = "[N, H, W, 3]" if isinstance(images, np.ndarray) else "channels first [N, 3, H, W]"
            raise ValueError(f"{what}: a batch of images must be {expected}, got {describe(images)}")
        items = list(images)
    elif isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        items = [images]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise TypeError(f"{what}: expected a list of images or a batch array/tensor, got {describe(images)}")
    for i, image in enumerate(items):
        _check_single(image, f"{what}[{i}]")
    return items


def uint8_images(images: Any, what: str = "images") -> list[np.ndarray]:
    """A batch of images (sizes may differ) as a list of uint8 ``[H, W, 3]`` arrays."""
    return [uint8_image(image, f"{what}[{i}]") for i, image in enumerate(split_images(images, what))]


def uint8_video(frames: Any, what: str = "frames") -> np.ndarray:
    """A shot's frames as one uint8 array ``[N, H, W, 3]`` (N >= 1, every frame the same size): a numpy array
    ``[N, H, W, 3]``, a tensor ``[N, 3, H, W]``, or a list of same-sized images. A uint8 array is returned as
    it is."""
    if isinstance(frames, (np.ndarray, torch.Tensor, PIL.Image.Image)) and getattr(frames, "ndim", 0) != 4:
        raise ValueError(f"{what}: expected RGB frames of shape [N, H, W, 3], got {describe(frames)}")
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.shape[-1] == 3:
        if frames.shape[0] == 0:
            raise ValueError(f"{what}: the video has no frames")
        if 0 in frames.shape[1:3]:
            raise ValueError(f"{what}: frames are empty ({describe(frames)})")
        return frames
    if isinstance(frames, np.ndarray) and frames.shape[-1] != 3:
        raise ValueError(f"{what}: expected RGB frames of shape [N, H, W, 3], got {describe(frames)}")
    images = uint8_images(frames, what)
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
