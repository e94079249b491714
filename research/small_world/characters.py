"""The toy world's characters: four identity attributes, their geometry, and how one is drawn.

A :class:`Character` is a flat shape with four identity attributes: its ``shape``, its body ``colour`` (one of
a palette of saturated, clearly distinct colours), a ``pattern`` drawn in a darker shade of the body colour
and an ``accessory`` drawn in the complementary palette colour. Characters that appear together never share a
body colour, and never have complementary body colours (:func:`compatible_together`).

Geometry lives in a canonical frame: ``u`` to the right, ``v`` down, in units of the body's half-size; the
body fits in about ``[-1, 1]^2`` and accessories reach up to ``v = -1.8``. A :class:`Pose` places that frame in
a picture (centre, pixels per unit, rotation). The detector uses the same functions to draw its templates.
Characters are :data:`BODY_SIZE` x min(height, width) in half-size, so the same clip renders at any size
(anti-aliased by supersampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "ACCESSORIES",
    "BODY_SIZE",
    "COLOURS",
    "GROUND_Y",
    "PATTERNS",
    "PATTERN_SHADE",
    "SHAPES",
    "Character",
    "Pose",
    "WorldError",
    "accessory_colour",
    "accessory_mask",
    "body_mask",
    "character_colours",
    "character_layers",
    "compatible_together",
    "draw_character",
    "pattern_mask",
    "shape_symmetry",
]


class WorldError(ValueError):
    """An attribute, scene, motion or size the toy world does not know; the message names the field."""


#: Body colours, in hue order. Saturation >= 0.84 and value >= 0.78 for all of them, so they stand apart
#: from every background colour; neighbouring hues are at least 25 degrees apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (245, 125, 15),
    "yellow": (240, 220, 20),
    "green": (40, 190, 60),
    "cyan": (20, 195, 215),
    "blue": (40, 70, 225),
    "purple": (145, 55, 215),
    "pink": (235, 60, 175),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "heart", "cross", "ring", "moon")
PATTERNS = ("plain", "striped", "dotted", "checkered")
ACCESSORIES = ("none", "hat", "crown", "scarf", "glasses", "bow")

#: Pattern colour = body colour x PATTERN_SHADE (same hue, darker).
PATTERN_SHADE = 0.5
#: Body half-size as a fraction of min(height, width) (before the per-clip jitter).
BODY_SIZE = 0.2
#: Where the characters' feet touch the ground, as a fraction of the height.
GROUND_Y = 0.87

# Top and bottom of each body in canonical units (hats sit on the top, feet stand on the bottom).
_BODY_TOP = {"square": -0.86, "hexagon": -0.7, "heart": -0.96, "star": -1.0}
BODY_BOTTOM = {"square": 0.86, "hexagon": 0.7, "triangle": 0.8, "star": 0.809}
# Rotational symmetry order of each body (0: every angle).
_SYMMETRY = {"circle": 0, "ring": 0, "square": 4, "cross": 4, "triangle": 3, "star": 5, "diamond": 2,
             "hexagon": 2, "heart": 1, "moon": 1}


def shape_symmetry(shape: str) -> int:
    """Rotational symmetry order of a body shape: 0 for circle and ring (any angle), 1 for none."""
    return _SYMMETRY[check_choice(shape, SHAPES, "shape")]


def accessory_colour(colour: str) -> str:
    """The accessory colour of a body colour: the palette colour opposite on the hue circle."""
    names = list(COLOURS)
    return names[(names.index(check_choice(colour, COLOURS, "colour")) + len(names) // 2) % len(names)]


def compatible_together(a: Character, b: Character) -> bool:
    """Whether two characters may appear in one picture (different, non-complementary body colours)."""
    return a.colour != b.colour and accessory_colour(a.colour) != b.colour


def check_choice(value, choices, name: str):
    if value not in choices:
        raise WorldError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Character:
    """A character's identity: what the detector recovers and what captions describe."""

    shape: str
    colour: str
    pattern: str = "plain"
    accessory: str = "none"

    def __post_init__(self):
        check_choice(self.shape, SHAPES, "shape")
        check_choice(self.colour, COLOURS, "colour")
        check_choice(self.pattern, PATTERNS, "pattern")
        check_choice(self.accessory, ACCESSORIES, "accessory")

    @property
    def key(self) -> str:
        """A stable identifier, ``colour-pattern-shape-accessory`` (e.g. ``red-striped-circle-hat``)."""
        return f"{self.colour}-{self.pattern}-{self.shape}-{self.accessory}"

    @classmethod
    def from_key(cls, key: str) -> Character:
        parts = str(key).split("-")
        if len(parts) != 4:
            raise WorldError(f"character key {key!r} is not of the form colour-pattern-shape-accessory")
        colour, pattern, shape, accessory = parts
        return cls(shape=shape, colour=colour, pattern=pattern, accessory=accessory)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern, "accessory": self.accessory}

    @classmethod
    def from_dict(cls, data: dict) -> Character:
        if not isinstance(data, dict):
            raise WorldError(f"a character must be an object with shape/colour/pattern/accessory, got {data!r}")
        missing = [k for k in ("shape", "colour") if k not in data]
        if missing:
            raise WorldError(f"character {data!r} is missing field(s) {', '.join(missing)}")
        return cls(shape=data["shape"], colour=data["colour"], pattern=data.get("pattern", "plain"),
                   accessory=data.get("accessory", "none"))

    def description(self, definite: bool = False) -> str:
        """``a red striped circle with a hat`` (``definite``: ``the red striped circle with the hat``)."""
        article = "the" if definite else "an" if self.colour[0] in "aeiou" else "a"
        words = [article, self.colour] + ([] if self.pattern == "plain" else [self.pattern]) + [self.shape]
        if self.accessory != "none":
            thing = "glasses" if self.accessory == "glasses" else f"{'the' if definite else 'a'} {self.accessory}"
            words += ["with", thing]
        return " ".join(words)

    @classmethod
    def random(cls, rng: np.random.Generator, exclude: Sequence[Character | str] = ()) -> Character:
        """A random character whose key is not in ``exclude`` (characters or keys)."""
        excluded = {c.key if isinstance(c, Character) else str(c) for c in exclude}
        total = len(SHAPES) * len(COLOURS) * len(PATTERNS) * len(ACCESSORIES)
        if len(excluded) >= total:
            raise WorldError("every character of the world is excluded")
        while True:
            character = cls(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                            pattern=PATTERNS[rng.integers(len(PATTERNS))],
                            accessory=ACCESSORIES[rng.integers(len(ACCESSORIES))])
            if character.key not in excluded:
                return character


def character_colours(character: Character) -> np.ndarray:
    """float32 [4, 3] RGB of the label values of :func:`character_layers` (index 0 unused)."""
    body = np.array(COLOURS[character.colour], np.float32)
    accessory = np.array(COLOURS[accessory_colour(character.colour)], np.float32)
    return np.stack([np.zeros(3, np.float32), body, body * PATTERN_SHADE, accessory])


# ---------------------------------------------------------------------------------------------- geometry
def _polygon(u: np.ndarray, v: np.ndarray, vertices) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the points."""
    inside = np.zeros(np.shape(u), bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (x2 - x1) * (v - y1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


_STAR = [p for i in range(5) for p in (
    (math.cos(math.radians(-90 + 72 * i)), math.sin(math.radians(-90 + 72 * i))),
    (0.45 * math.cos(math.radians(-54 + 72 * i)), 0.45 * math.sin(math.radians(-54 + 72 * i))),
)]
_TRIANGLE = [(0.0, -1.0), (1.04, 0.8), (-1.04, 0.8)]  # equilateral, centred on (0, 0.2)
_HEART_POINT = [(-0.99, -0.3), (0.99, -0.3), (0.0, 1.0)]
_DIAMOND = [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]


def body_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether canonical points ``(u, v)`` lie inside a body of this shape."""
    u = np.asarray(u, np.float32)
    v = np.asarray(v, np.float32)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.86) & (np.abs(v) <= 0.86)
    if shape == "triangle":
        return _polygon(u, v, _TRIANGLE)
    if shape == "star":
        return _polygon(u, v, _STAR)
    if shape == "diamond":
        return np.abs(u) / 0.72 + np.abs(v) <= 1.0
    if shape == "hexagon":  # wider than tall (flat top and bottom), so that it never passes for a circle
        return (np.abs(v) <= 0.7) & (np.abs(u) + np.abs(v) * (0.45 / 0.7) <= 1.0)
    if shape == "heart":  # two round lobes over a point, with a deep notch between the lobes
        lobes = ((u - 0.48) ** 2 + (v + 0.42) ** 2 <= 0.54 ** 2) | ((u + 0.48) ** 2 + (v + 0.42) ** 2 <= 0.54 ** 2)
        return lobes | _polygon(u, v, _HEART_POINT)
    if shape == "cross":
        return ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 1.0))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5 * 0.5)
    if shape == "moon":
        return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + (v + 0.15) ** 2 > 0.8 * 0.8)
    raise WorldError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, phase: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Where a pattern is drawn in the dark shade (in the canonical frame, so it turns with the body).
    ``phase`` shifts the pattern (the detector uses it to absorb small pose errors)."""
    u = np.asarray(u, np.float32) - phase[0]
    v = np.asarray(v, np.float32) - phase[1]
    if pattern == "plain":
        return np.zeros(u.shape, bool)
    if pattern == "striped":  # horizontal bands, period 0.6
        return np.floor(v / 0.3 + 0.5).astype(np.int64) % 2 == 1
    if pattern == "dotted":  # dots of radius 0.17 on a 0.6 grid, one at the centre
        du = u - 0.6 * np.round(u / 0.6)
        dv = v - 0.6 * np.round(v / 0.6)
        return du * du + dv * dv <= 0.17 * 0.17
    if pattern == "checkered":  # 0.5 x 0.5 cells
        return (np.floor(u / 0.5).astype(np.int64) + np.floor(v / 0.5).astype(np.int64)) % 2 == 0
    raise WorldError(f"unknown pattern {pattern!r}; expected one of {', '.join(PATTERNS)}")


def _rect(u, v, x0, x1, y0, y1):
    return (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)


def accessory_mask(accessory: str, shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether canonical points lie on the accessory worn by a body of this shape (drawn over the body)."""
    u = np.asarray(u, np.float32)
    v = np.asarray(v, np.float32)
    top = _BODY_TOP.get(shape, -1.0)
    base = top + 0.12  # hats and crowns overlap the top of the body a little
    if accessory == "none":
        return np.zeros(u.shape, bool)
    if accessory == "hat":  # a top hat: wide brim, tall narrow crown
        return _rect(u, v, -0.8, 0.8, base - 0.2, base) | _rect(u, v, -0.48, 0.48, base - 0.9, base - 0.2)
    if accessory == "crown":
        return _polygon(u, v, [(-0.62, base), (0.62, base), (0.62, base - 0.8), (0.31, base - 0.38),
                               (0.0, base - 0.85), (-0.31, base - 0.38), (-0.62, base - 0.8)])
    if accessory == "scarf":  # a band around the lower body and a hanging end
        around = body_mask(shape, u / 1.1, v / 1.1)
        return around & (((v >= 0.15) & (v <= 0.39)) | _rect(u, v, 0.3, 0.54, 0.39, 0.88))
    if accessory == "glasses":
        lens = ((u - 0.38) ** 2 + (v + 0.28) ** 2 <= 0.26 ** 2) | ((u + 0.38) ** 2 + (v + 0.28) ** 2 <= 0.26 ** 2)
        return lens | _rect(u, v, -0.2, 0.2, -0.34, -0.23)
    if accessory == "bow":  # a hair bow on the top right: two wings and a knot
        cx, cy = 0.55, top + 0.05
        right = _polygon(u, v, [(cx, cy), (cx + 0.45, cy - 0.3), (cx + 0.45, cy + 0.3)])
        left = _polygon(u, v, [(cx, cy), (cx - 0.45, cy - 0.3), (cx - 0.45, cy + 0.3)])
        return right | left | ((u - cx) ** 2 + (v - cy) ** 2 <= 0.12 ** 2)
    raise WorldError(f"unknown accessory {accessory!r}; expected one of {', '.join(ACCESSORIES)}")


def character_layers(character: Character, u: np.ndarray, v: np.ndarray,
                     phase: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Label of canonical points: 0 outside, 1 body, 2 body in the pattern's dark shade, 3 accessory."""
    body = body_mask(character.shape, u, v)
    dark = pattern_mask(character.pattern, u, v, phase) & body
    accessory = accessory_mask(character.accessory, character.shape, u, v)
    labels = np.where(body, np.where(dark, 2, 1), 0).astype(np.uint8)
    labels[accessory] = 3
    return labels


@dataclass(frozen=True)
class Pose:
    """Where a character is drawn: centre ``(x, y)`` in pixels, ``scale`` pixels per canonical unit (the
    body's half-size) and ``angle`` in degrees (clockwise on screen)."""

    x: float
    y: float
    scale: float
    angle: float = 0.0

    def to_canonical(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical coordinates of picture points (pixel centres are at ``i + 0.5``)."""
        a = math.radians(self.angle)
        dx = (np.asarray(px, np.float32) - self.x) / self.scale
        dy = (np.asarray(py, np.float32) - self.y) / self.scale
        return dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)

    def to_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "scale": self.scale, "angle": self.angle}


def _supersampling(scale: float) -> int:
    # Small characters need more samples per pixel for smooth edges; large ones have finer edges already.
    return 4 if scale < 12 else 3 if scale < 40 else 2


def draw_character(canvas: np.ndarray, character: Character, pose: Pose, supersample: Optional[int] = None) -> None:
    """Draw ``character`` at ``pose`` onto ``canvas`` (float32 [H, W, 3] in 0..255) in place, anti-aliased by
    ``supersample`` x ``supersample`` samples per pixel."""
    height, width = canvas.shape[:2]
    # Picture-space box of the character's canonical box (u in [-1.2, 1.2], v in [-2.05, 1.15]) at this angle.
    a = math.radians(pose.angle)
    corners = [(u * math.cos(a) - v * math.sin(a), u * math.sin(a) + v * math.cos(a))
               for u in (-1.2, 1.2) for v in (-2.05, 1.15)]
    xs_c = [pose.x + pose.scale * c[0] for c in corners]
    ys_c = [pose.y + pose.scale * c[1] for c in corners]
    x0, x1 = max(0, int(math.floor(min(xs_c)))), min(width, int(math.ceil(max(xs_c))) + 1)
    y0, y1 = max(0, int(math.floor(min(ys_c)))), min(height, int(math.ceil(max(ys_c))) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    ss = supersample or _supersampling(pose.scale)
    offsets = (np.arange(ss, dtype=np.float32) + 0.5) / ss
    ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + offsets[None, :]).reshape(-1)
    u, v = pose.to_canonical(xs[None, :], ys[:, None])
    h, w = y1 - y0, x1 - x0
    labels = character_layers(character, u, v).reshape(h, ss, w, ss)
    colours = character_colours(character)
    # Average the samples of each pixel: the share of each layer gives coverage and premultiplied colour.
    colour = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w), np.float32)
    for label in (1, 2, 3):
        share = (labels == label).sum(axis=(1, 3), dtype=np.uint16).astype(np.float32) / (ss * ss)
        if share.any():
            alpha += share
            colour += share[..., None] * colours[label]
    if not alpha.any():
        return
    region = canvas[y0:y1, x0:x1]
    region *= 1.0 - alpha[..., None]
    region += colour


