"""What the identity detector reads and returns: its settings (:class:`DetectorConfig`), a detected character
(:class:`Detection`), the comparison of two shots (:class:`CharacterMatch`), and the conversions of characters
and frames it accepts. The detector itself is :class:`~research.small_world.detector.IdentityDetector`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from .characters import Character, Pose, WorldError

__all__ = [
    "ATTRIBUTES",
    "CharacterLike",
    "CharacterMatch",
    "Detection",
    "DetectorConfig",
    "as_character",
    "as_frames",
    "rgb_to_hsv",
    "softmax",
]

ATTRIBUTES = ("shape", "colour", "pattern", "accessory")


@dataclass
class DetectorConfig:
    """Settings of :class:`IdentityDetector` (the defaults are tuned for the toy world's own frames).

    Attributes:
        min_saturation, min_value: a pixel is a character pixel when its HSV saturation and value are at
            least these (background colours stay below ``scenes.BACKGROUND_MAX_SATURATION`` or value
            ``scenes.BACKGROUND_MAX_VALUE``).
        max_hue_distance: degrees from the nearest palette hue beyond which a saturated pixel is unclassified.
        min_pixels: smallest body (in pixels at the working scale) worth fitting.
        min_fit: silhouette IoU below which a colour blob is not taken for a character.
        working_scale: body half-size in pixels the analysis runs at; larger pictures are reduced.
        max_frames: frames of a clip that are analysed (evenly spread).
        template_size: resolution of the canonical templates (cells per side over ``[-2.2, 2.2]``).
        sharpness: how sharply fit scores turn into attribute probabilities (softmax inverse temperature).
        pattern_sharpness: the same for the share of brightness variance a pattern explains.
        pattern_min_fit: share of the body's brightness variance a pattern must explain to be read (below
            it the body is plain).
        pattern_min_contrast: least darkening of the pattern's shade, relative to the body's brightness, for
            a pattern to be read (the world draws 1 - PATTERN_SHADE = 0.5; blur lowers it).
        pattern_margin: pixels (at the working scale) kept between the pixels a pattern is judged on and the
            body's edge or the accessory (small bodies fall back to half a pixel).
        candidates: best silhouette fits that compete again with their accessories on every pixel.
        upright_prior: score handicap of an upside-down reading (scaled by (1 - cos angle) / 2).
    """

    min_saturation: float = 0.5
    min_value: float = 0.3
    max_hue_distance: float = 22.0
    min_pixels: int = 12
    min_fit: float = 0.45
    working_scale: float = 11.0
    max_frames: int = 6
    template_size: int = 221
    sharpness: float = 40.0
    pattern_sharpness: float = 20.0
    pattern_min_fit: float = 0.15
    pattern_min_contrast: float = 0.1
    pattern_margin: float = 1.0
    candidates: int = 5
    upright_prior: float = 0.03

    def __post_init__(self):
        if not 0.0 < self.min_saturation < 1.0 or not 0.0 <= self.min_value < 1.0:
            raise ValueError(f"min_saturation must be in (0, 1) and min_value in [0, 1), got "
                             f"{self.min_saturation}, {self.min_value}")
        if (self.max_frames < 1 or self.min_pixels < 1 or self.candidates < 1 or self.template_size < 32
                or self.working_scale < 4):
            raise ValueError("max_frames, min_pixels and candidates must be >= 1, template_size >= 32 and "
                             "working_scale >= 4")
        if (not 0.0 < self.pattern_min_fit < 1.0 or not 0.0 <= self.pattern_min_contrast < 1.0
                or self.pattern_margin < 0):
            raise ValueError(f"pattern_min_fit must be in (0, 1), pattern_min_contrast in [0, 1) and pattern_margin "
                             f">= 0, got {self.pattern_min_fit}, {self.pattern_min_contrast}, {self.pattern_margin}")


@dataclass(frozen=True)
class Detection:
    """A detected character.

    Attributes:
        character: the identity read from the pixels.
        confidence: in [0, 1]; for one frame, fit x the least certain attribute probability; for a clip, the
            confidence mass of the analysed frames that agree with ``character``, over the frames analysed.
        scores: probability of each attribute's value (``shape``, ``colour``, ``pattern``, ``accessory``).
        fit: silhouette IoU of the body template (for a clip: mean over the frames that saw it).
        pose: where the body is (in the input's pixels); for a clip, the pose in the first frame that saw it.
        frames: how many analysed frames saw this character.
    """

    character: Character
    confidence: float
    scores: dict = field(default_factory=dict)
    fit: float = 0.0
    pose: Optional[Pose] = None
    frames: int = 1

    @property
    def key(self) -> str:
        return self.character.key

    def to_dict(self) -> dict:
        return {"character": self.character.to_dict(), "key": self.key, "confidence": round(self.confidence, 4),
                "scores": {k: round(v, 4) for k, v in self.scores.items()}, "fit": round(self.fit, 4),
                "frames": self.frames, "pose": None if self.pose is None else self.pose.to_dict()}


@dataclass(frozen=True)
class CharacterMatch:
    """Whether two shots show the same character: ``same`` (all four attributes equal), ``agreement`` (share
    of equal attributes), ``confidence`` (the lower of the two detections'; 0 when one found none)."""

    same: bool
    agreement: float
    confidence: float
    a: Optional[Detection]
    b: Optional[Detection]


CharacterLike = Union[Character, str, dict]


def as_character(value: CharacterLike) -> Character:
    """A :class:`Character` from a Character, a key (``red-striped-circle-hat``) or a dict."""
    if isinstance(value, Character):
        return value
    if isinstance(value, str):
        return Character.from_key(value)
    if isinstance(value, dict):
        return Character.from_dict(value.get("character", value))
    raise WorldError(f"expected a character (Character, key or dict), got {type(value).__name__}")


def as_frames(frames) -> np.ndarray:
    """Frames as uint8 [N, H, W, 3] from uint8 or float [0, 1] arrays or tensors (one frame or many)."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [N, H, W, 3] (or one [H, W, 3] frame), got shape {list(array.shape)}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {array.dtype}")
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    return array


def softmax(scores: np.ndarray, sharpness: float) -> np.ndarray:
    """Probabilities from fit scores (``sharpness``: inverse temperature)."""
    z = sharpness * (scores - scores.max())
    e = np.exp(z)
    return e / e.sum()


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, saturation and value of float RGB in [0, 1], [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = rgb.max(-1)
    mn = rgb.min(-1)
    delta = mx - mn
    safe = np.where(delta > 1e-6, delta, 1.0)
    hue = np.where(mx == r, (g - b) / safe % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(delta > 1e-6, hue * 60.0, 0.0)
    saturation = np.where(mx > 1e-6, delta / np.where(mx > 1e-6, mx, 1.0), 0.0)
    return hue.astype(np.float32), saturation.astype(np.float32), mx.astype(np.float32)
