"""Aesthetic scorers: images -> one quality score each; keyframe selection keeps frames scoring >= a bar.

Interface (duck-typed, see `AestheticScorer`): `.score(images, prompts=None) -> list[float]`, one finite float
per image; `prompts` (one string per image, or None for empty prompts) is what prompt-aware scorers such as
HPSv3 rate the image against. Keyframe selection scores with empty prompts, as the release does.

`HPSv3Scorer` lives in `storymem.memory.hpsv3` (it imports transformers, and imports this module's checks; this
module does not import it back).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence, runtime_checkable

from ..images import uint8_images


@runtime_checkable
class AestheticScorer(Protocol):
    def score(self, images: Any, prompts: Sequence[str] | None = None) -> list[float]: ...


def check_prompts(prompts: Sequence[str] | None, count: int) -> list[str]:
    """`prompts` as a list of `count` strings (None -> empty prompts)."""
    if prompts is None:
        return [""] * count
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per image (got a single string)")
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"got {len(prompts)} prompts for {count} images; give one prompt per image")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
    return prompts


def check_scores(scores: Any, count: int, source: str = "scorer") -> list[float]:
    """A scorer's output as `count` finite floats, or a `ValueError` naming the first bad one.

    A NaN must not pass silently: `NaN < 3.0` is False, so the release would keep a frame it never really
    scored."""
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source} returned scores that are not numbers: {exc}") from exc
    if len(values) != count:
        raise ValueError(f"{source} returned {len(values)} scores for {count} images")
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"{source} returned a non-finite score ({value}) for image {i} of the batch")
    return values


class NullScorer:
    """Gives every image the same score (by default 10.0, above the release's 3.0 bar, so every frame
    passes): keyframe selection by CLIP similarity alone, e.g. when the 7B HPSv3 model is not available."""

    def __init__(self, value: float = 10.0):
        if not math.isfinite(float(value)):
            raise ValueError(f"NullScorer value must be finite, got {value}")
        self.value = float(value)
        self.num_calls = 0
        self.num_images = 0

    def score(self, images: Any, prompts: Sequence[str] | None = None) -> list[float]:
        images = uint8_images(images)
        check_prompts(prompts, len(images))
        self.num_calls += 1
        self.num_images += len(images)
        return [self.value] * len(images)

    def __repr__(self) -> str:
        return f"NullScorer(value={self.value})"

