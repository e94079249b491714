"""The toy world: procedural "shape stories" drawn with numpy and PIL.

A :class:`Character` is a flat shape with four identity attributes: its ``shape``, its body ``colour`` (one of
a palette of saturated, clearly distinct colours), a ``pattern`` drawn in a darker shade of the body colour
and an ``accessory`` drawn in the complementary palette colour. A :class:`Scene` is a background (desert,
forest, beach, city, ...) with a few props (trees, houses, rocks, lamps, the sun, ...). A :class:`Motion`
says how a character moves through a clip (walks, runs, jumps, spins, enters, leaves, ...).

Two rules of the world make identities recoverable from pixels (see :mod:`research.small_world.detector`):

* every colour a background or prop uses is muted (HSV saturation <= :data:`BACKGROUND_MAX_SATURATION`) or
  dark (value <= :data:`BACKGROUND_MAX_VALUE`), while characters use saturated colours only;
* characters that appear together never share a body colour, and never have complementary body colours
  (one's body colour would be the other's accessory colour).

Geometry lives in a canonical frame: ``u`` to the right, ``v`` down, in units of the body's half-size; the
body fits in about ``[-1, 1]^2`` and accessories reach up to ``v = -1.8``. A :class:`Pose` places that frame in
a picture (centre, pixels per unit, rotation). The detector uses the same functions to draw its templates.
Characters are :data:`BODY_SIZE` x min(height, width) in half-size, so the same clip renders at any size from
32x32 to 480x832 and beyond (anti-aliased by supersampling).

Captions (:func:`caption`) use words of :data:`storymem.builtin.tiny.TOY_VOCABULARY` only, without punctuation,
so the toy tokenizer never meets an unknown word: "a red striped circle with a hat walks into the desert near
a rock" for a first appearance, "the same character ..." or "the red striped circle with the hat returns
and ..." later on.

Everything is deterministic: every random choice comes from a ``numpy.random.Generator`` built from an
explicit seed; nothing touches global random state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

__all__ = [
    "ACCESSORIES",
    "BACKGROUNDS",
    "BACKGROUND_MAX_SATURATION",
    "BACKGROUND_MAX_VALUE",
    "BODY_SIZE",
    "CAPTION_MODES",
    "COLOURS",
    "MOTIONS",
    "PATTERNS",
    "PATTERN_SHADE",
    "PROPS",
    "SHAPES",
    "Character",
    "ClipSpec",
    "Motion",
    "Pose",
    "Prop",
    "Scene",
    "WorldError",
    "accessory_colour",
    "accessory_mask",
    "body_mask",
    "caption",
    "character_colours",
    "character_layers",
    "character_poses",
    "compatible_together",
    "draw_character",
    "first_frame_caption",
    "pattern_mask",
    "render_background",
    "render_clip",
    "shape_symmetry",
]


class WorldError(ValueError):
    """An attribute, scene, motion or size the toy world does not know; the message names the field."""


# ---------------------------------------------------------------------------------------------- attributes
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
#: Background colours are muted (saturation at most this) ...
BACKGROUND_MAX_SATURATION = 0.45
#: ... or dark (value at most this).
BACKGROUND_MAX_VALUE = 0.28

# Top and bottom of each body in canonical units (hats sit on the top, feet stand on the bottom).
_BODY_TOP = {"square": -0.86, "hexagon": -0.7, "heart": -0.96, "star": -1.0}
_BODY_BOTTOM = {"square": 0.86, "hexagon": 0.7, "triangle": 0.8, "star": 0.809}
# Rotational symmetry order of each body (0: every angle).
_SYMMETRY = {"circle": 0, "ring": 0, "square": 4, "cross": 4, "triangle": 3, "star": 5, "diamond": 2,
             "hexagon": 2, "heart": 1, "moon": 1}


def shape_symmetry(shape: str) -> int:
    """Rotational symmetry order of a body shape: 0 for circle and ring (any angle), 1 for none."""
    return _SYMMETRY[_check_choice(shape, SHAPES, "shape")]


def accessory_colour(colour: str) -> str:
    """The accessory colour of a body colour: the palette colour opposite on the hue circle."""
    names = list(COLOURS)
    return names[(names.index(_check_choice(colour, COLOURS, "colour")) + len(names) // 2) % len(names)]


def compatible_together(a: Character, b: Character) -> bool:
    """Whether two characters may appear in one picture (different, non-complementary body colours)."""
    return a.colour != b.colour and accessory_colour(a.colour) != b.colour


def _check_choice(value, choices, name: str):
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
        _check_choice(self.shape, SHAPES, "shape")
        _check_choice(self.colour, COLOURS, "colour")
        _check_choice(self.pattern, PATTERNS, "pattern")
        _check_choice(self.accessory, ACCESSORIES, "accessory")

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


# ---------------------------------------------------------------------------------------------- scenes
PROPS = ("tree", "house", "rock", "lamp", "tower", "bridge", "flower", "sun", "moon", "cloud")
_SKY_PROPS = ("sun", "moon", "cloud")


@dataclass(frozen=True)
class _Style:
    where: str  # "in the desert"
    across: str  # "across the desert"
    into: str  # "into the desert"
    place: str  # "the desert"
    sky: tuple  # top, bottom colours (None: no sky, e.g. a cave)
    ground: tuple  # top, bottom colours
    horizon: float
    ground_props: tuple
    sky_props: tuple


_STYLES: dict[str, _Style] = {
    "desert": _Style("in the desert", "across the desert", "into the desert", "the desert",
                     ((196, 212, 226), (240, 228, 200)), ((222, 194, 146), (204, 172, 122)), 0.58,
                     ("rock",), ("sun", "cloud")),
    "forest": _Style("in the forest", "through the forest", "into the forest", "the forest",
                     ((176, 198, 182), (206, 216, 198)), ((76, 100, 64), (58, 80, 48)), 0.52,
                     ("tree", "rock", "flower"), ("cloud",)),
    "beach": _Style("on the beach", "across the beach", "to the beach", "the beach",
                    ((150, 192, 226), (204, 224, 238)), ((228, 210, 170), (214, 192, 148)), 0.62,
                    ("rock", "tower"), ("sun", "cloud")),
    "city": _Style("in the city", "through the city", "into the city", "the city",
                   ((176, 182, 194), (208, 210, 214)), ((104, 104, 110), (84, 84, 90)), 0.62,
                   ("lamp", "house", "tower"), ("cloud",)),
    "snow": _Style("in the snow", "through the snow", "into the snow", "the snow",
                   ((192, 206, 224), (226, 232, 240)), ((238, 242, 248), (216, 224, 236)), 0.56,
                   ("tree", "house", "rock"), ("cloud", "sun")),
    "night": _Style("in the street at night", "across the street at night", "into the street at night",
                    "the street", ((14, 18, 38), (34, 40, 66)), ((44, 46, 58), (30, 32, 42)), 0.62,
                    ("lamp", "house", "tree"), ("moon",)),
    "meadow": _Style("in the meadow", "across the meadow", "into the meadow", "the meadow",
                     ((160, 200, 232), (210, 228, 240)), ((132, 166, 108), (108, 144, 88)), 0.56,
                     ("tree", "flower", "rock"), ("sun", "cloud")),
    "mountain": _Style("on the mountain", "across the mountain", "up the mountain", "the mountain",
                       ((168, 194, 220), (214, 224, 234)), ((140, 146, 128), (116, 122, 106)), 0.62,
                       ("rock", "tree"), ("cloud", "sun")),
    "cave": _Style("in the cave", "through the cave", "into the cave", "the cave",
                   None, ((100, 92, 84), (74, 68, 62)), 0.64, ("rock", "lamp"), ()),
    "room": _Style("in the room", "across the room", "into the room", "the room",
                   None, ((160, 132, 106), (138, 112, 88)), 0.64, ("lamp", "flower"), ()),
    "space": _Style("in space", "through space", "into space", "space",
                    ((8, 8, 20), (22, 20, 40)), ((112, 112, 120), (86, 86, 94)), 0.66, ("rock",), ("moon",)),
    "garden": _Style("in the garden", "through the garden", "into the garden", "the garden",
                     ((164, 200, 228), (212, 228, 238)), ((124, 160, 102), (104, 138, 86)), 0.58,
                     ("flower", "tree", "house", "bridge"), ("sun", "cloud")),
}
BACKGROUNDS = tuple(_STYLES)


@dataclass(frozen=True)
class Prop:
    """A prop of a scene: its kind, horizontal position (fraction of the width) and relative size."""

    kind: str
    x: float
    scale: float = 1.0

    def __post_init__(self):
        _check_choice(self.kind, PROPS, "prop")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "x": self.x, "scale": self.scale}


@dataclass(frozen=True)
class Scene:
    """A background and its props. ``detail_seed`` fixes the small random details (stars, dunes, windows)."""

    background: str
    props: tuple[Prop, ...] = ()
    detail_seed: int = 0

    def __post_init__(self):
        _check_choice(self.background, BACKGROUNDS, "background")
        object.__setattr__(self, "props", tuple(self.props))

    @property
    def style(self) -> _Style:
        return _STYLES[self.background]

    @property
    def landmark(self) -> Optional[str]:
        """The first ground prop, which captions mention ("near a tree")."""
        for prop in self.props:
            if prop.kind not in _SKY_PROPS:
                return prop.kind
        return None

    def to_dict(self) -> dict:
        return {"background": self.background, "props": [p.to_dict() for p in self.props],
                "detail_seed": self.detail_seed}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        if not isinstance(data, dict) or "background" not in data:
            raise WorldError(f"a scene must be an object with a 'background', got {data!r}")
        props = tuple(Prop(p["kind"], float(p["x"]), float(p.get("scale", 1.0))) for p in data.get("props", ()))
        return cls(background=data["background"], props=props, detail_seed=int(data.get("detail_seed", 0)))

    @classmethod
    def random(cls, rng: np.random.Generator, background: Optional[str] = None) -> Scene:
        """A scene with 1-3 ground props (the first is the landmark) and maybe a sky prop."""
        background = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        style = _STYLES[_check_choice(background, BACKGROUNDS, "background")]
        count = int(rng.integers(1, 4))
        kinds = [style.ground_props[int(rng.integers(len(style.ground_props)))] for _ in range(count)]
        # Spread the props over the width so they do not pile up.
        slots = rng.permutation(np.linspace(0.12, 0.88, 4))[:count]
        props = [Prop(k, float(np.round(x + rng.uniform(-0.05, 0.05), 3)), float(np.round(rng.uniform(0.8, 1.2), 3)))
                 for k, x in zip(kinds, slots)]
        if style.sky_props and rng.random() < 0.7:
            props.append(Prop(style.sky_props[int(rng.integers(len(style.sky_props)))],
                              float(np.round(rng.uniform(0.15, 0.85), 3)), float(np.round(rng.uniform(0.8, 1.2), 3))))
        return cls(background=background, props=tuple(props), detail_seed=int(rng.integers(2 ** 31)))


def _vertical_gradient(top, bottom, rows: int, width: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, max(rows, 1), dtype=np.float32)[:, None, None]
    column = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return np.broadcast_to(column, (max(rows, 1), width, 3))[:rows]


def _shade(colour, factor: float) -> tuple[int, int, int]:
    return tuple(int(round(c * factor)) for c in colour)


class _Painter:
    """PIL drawing in fractions of the picture: x in widths, y in heights, sizes in heights."""

    def __init__(self, image):
        from PIL import ImageDraw

        self.image = image
        self.draw = ImageDraw.Draw(image)
        self.w, self.h = image.size

    def px(self, x: float, y: float) -> tuple[float, float]:
        return x * self.w, y * self.h

    def polygon(self, points, fill):
        self.draw.polygon([self.px(x, y) for x, y in points], fill=tuple(fill))

    def rect(self, x: float, y: float, half_w: float, height: float, fill):
        """A rectangle whose bottom centre is at (x, y); half_w and height in heights."""
        cx, cy = self.px(x, y)
        self.draw.rectangle([cx - half_w * self.h, cy - height * self.h, cx + half_w * self.h, cy], fill=tuple(fill))

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill):
        cx, cy = self.px(x, y)
        self.draw.ellipse([cx - rx * self.h, cy - ry * self.h, cx + rx * self.h, cy + ry * self.h], fill=tuple(fill))


def _draw_prop(p: _Painter, prop: Prop, scene: Scene, ground_y: float, rng: np.random.Generator):
    s = prop.scale
    night = scene.background in ("night", "space", "cave")
    snowy = scene.background == "snow"
    x, y = prop.x, ground_y
    if prop.kind == "tree":
        trunk = (70, 54, 44) if night else (102, 84, 70)
        p.rect(x, y, 0.018 * s, 0.12 * s, trunk)
        if scene.background in ("snow", "forest", "mountain"):  # a pine
            leaves = (44, 70, 56) if snowy else (50, 86, 56)
            for k in range(3):
                base = y - 0.07 * s - k * 0.06 * s
                half = (0.085 - 0.02 * k) * s
                p.polygon([(x - half * p.h / p.w, base), (x + half * p.h / p.w, base), (x, base - 0.11 * s)], leaves)
                if snowy:
                    p.polygon([(x - 0.3 * half * p.h / p.w, base - 0.075 * s), (x + 0.3 * half * p.h / p.w,
                               base - 0.075 * s), (x, base - 0.11 * s)], (236, 240, 246))
        else:
            leaves = (40, 58, 46) if night else (82, 114, 78)
            p.ellipse(x, y - 0.17 * s, 0.075 * s, 0.075 * s, leaves)
            p.ellipse(x - 0.04 * s * p.h / p.w * 1.5, y - 0.13 * s, 0.05 * s, 0.045 * s, _shade(leaves, 0.9))
    elif prop.kind == "house":
        wall = (70, 68, 80) if night else (196, 180, 160)
        roof = (54, 48, 58) if night else (146, 104, 92)
        window = (226, 208, 146) if night else (170, 186, 200)
        p.rect(x, y, 0.07 * s, 0.1 * s, wall)
        hw = 0.085 * s * p.h / p.w
        p.polygon([(x - hw, y - 0.1 * s), (x + hw, y - 0.1 * s), (x, y - 0.17 * s)], roof)
        if snowy:
            p.polygon([(x - hw * 0.5, y - 0.135 * s), (x + hw * 0.5, y - 0.135 * s), (x, y - 0.17 * s)],
                      (240, 244, 248))
        p.rect(x - 0.03 * s * p.h / p.w, y, 0.016 * s, 0.05 * s, _shade(roof, 0.8))
        p.rect(x + 0.03 * s * p.h / p.w, y - 0.045 * s, 0.018 * s, 0.03 * s, window)
    elif prop.kind == "rock":
        colour = (80, 78, 84) if night else (140, 132, 124)
        p.ellipse(x, y - 0.02 * s, 0.05 * s, 0.035 * s, colour)
        p.ellipse(x + 0.015 * s * p.h / p.w, y - 0.03 * s, 0.025 * s, 0.018 * s, _shade(colour, 1.12))
    elif prop.kind == "lamp":
        pole = (60, 60, 66)
        p.rect(x, y, 0.006 * s, 0.22 * s, pole)
        if night or scene.background == "room":
            p.ellipse(x, y - 0.23 * s, 0.045 * s, 0.045 * s, (120, 112, 86) if night else (226, 214, 186))
        p.ellipse(x, y - 0.23 * s, 0.02 * s, 0.02 * s, (250, 240, 200))
    elif prop.kind == "tower":
        colour = (150, 146, 150) if scene.background == "city" else (200, 196, 188)
        p.rect(x, y, 0.03 * s, 0.3 * s, colour)
        p.rect(x, y - 0.3 * s, 0.04 * s, 0.03 * s, _shade(colour, 0.85))
        p.rect(x, y - 0.2 * s, 0.012 * s, 0.025 * s, (90, 92, 100))
    elif prop.kind == "bridge":
        wood = (140, 110, 86)
        hw = 0.12 * s * p.h / p.w
        points = [(x - hw + 2 * hw * i / 12, y - 0.05 * s * math.sin(math.pi * i / 12)) for i in range(13)]
        p.polygon(points + [(x + hw, y + 0.015 * s), (x - hw, y + 0.015 * s)], wood)
        for i in (2, 6, 10):
            px, py = points[i]
            p.rect(px, py, 0.004 * s, 0.04 * s, _shade(wood, 0.8))
    elif prop.kind == "flower":
        p.rect(x, y, 0.003 * s, 0.05 * s, (90, 120, 80))
        petal = [(236, 214, 222), (238, 232, 190), (226, 222, 240)][int(rng.integers(3))]
        for k in range(5):
            a = 2 * math.pi * k / 5
            p.ellipse(x + 0.014 * s * math.cos(a) * p.h / p.w, y - 0.05 * s + 0.014 * s * math.sin(a),
                      0.01 * s, 0.01 * s, petal)
        p.ellipse(x, y - 0.05 * s, 0.007 * s, 0.007 * s, (220, 200, 150))
    elif prop.kind == "sun":
        p.ellipse(x, 0.14, 0.07 * s, 0.07 * s, (252, 242, 206))
    elif prop.kind == "moon":
        p.ellipse(x, 0.14, 0.06 * s, 0.06 * s, (228, 228, 214))
        p.ellipse(x + 0.012 * s * p.h / p.w, 0.13, 0.012 * s, 0.012 * s, (200, 200, 190))
    elif prop.kind == "cloud":
        colour = (238, 240, 244)
        for dx, dy, r in ((0.0, 0.0, 0.04), (0.05, 0.01, 0.03), (-0.05, 0.01, 0.03)):
            p.ellipse(x + dx * s * p.h / p.w, 0.16 + dy * s, r * s * 1.4, r * s, colour)


def _draw_features(p: _Painter, scene: Scene, rng: np.random.Generator):
    """The background-specific scenery behind the props."""
    style = scene.style
    hz = style.horizon
    kind = scene.background
    if kind == "desert":
        for band, colour in ((0.0, (212, 180, 128)), (0.12, (204, 170, 118))):
            phase, amp = rng.uniform(0, 2 * math.pi), rng.uniform(0.01, 0.025)
            pts = [(i / 24, hz + band + 0.03 + amp * math.sin(phase + 2 * math.pi * i / 12)) for i in range(25)]
            p.polygon(pts + [(1, 1), (0, 1)], colour)
    elif kind == "forest":
        for i in range(14):  # distant trees
            x = (i + rng.uniform(0, 0.6)) / 13
            hw = rng.uniform(0.03, 0.05) * p.h / p.w
            p.polygon([(x - hw, hz + 0.01), (x + hw, hz + 0.01), (x, hz - rng.uniform(0.12, 0.22))], (86, 110, 90))
    elif kind == "beach":
        p.polygon([(0, hz - 0.1), (1, hz - 0.1), (1, hz), (0, hz)], (96, 138, 168))
        for i in range(6):
            x, y = rng.uniform(0.05, 0.95), hz - rng.uniform(0.02, 0.08)
            p.rect(x, y, 0.03, 0.004, (150, 180, 200))
        p.polygon([(0, hz), (1, hz), (1, hz + 0.02), (0, hz + 0.015)], (236, 236, 230))
    elif kind in ("city", "night"):
        x = 0.0
        while x < 1.0:
            bw = rng.uniform(0.06, 0.14)
            top = hz - rng.uniform(0.12, 0.4)
            colour = [(120, 122, 132), (140, 138, 142), (104, 108, 118)][int(rng.integers(3))]
            if kind == "night":
                colour = _shade(colour, 0.42)
            p.polygon([(x, top), (x + bw, top), (x + bw, hz), (x, hz)], colour)
            lit = (216, 198, 138) if kind == "night" else (196, 200, 190)
            for wy in np.arange(top + 0.03, hz - 0.03, 0.06):
                for wx in np.arange(x + 0.015, x + bw - 0.015, 0.03):
                    if rng.random() < (0.45 if kind == "night" else 0.8):
                        p.polygon([(wx, wy), (wx + 0.012, wy), (wx + 0.012, wy + 0.025), (wx, wy + 0.025)], lit)
            x += bw + rng.uniform(0.0, 0.02)
        p.polygon([(0, hz + 0.12), (1, hz + 0.12), (1, hz + 0.13), (0, hz + 0.13)],
                  (70, 70, 72) if kind == "night" else (150, 150, 150))
    elif kind == "snow":
        for i in range(3):
            x, r = rng.uniform(0, 1), rng.uniform(0.15, 0.3)
            p.ellipse(x, hz + 0.02, r * p.w / p.h, 0.05, (228, 234, 244))
    elif kind == "meadow" or kind == "garden":
        if kind == "garden":
            p.polygon([(0, hz - 0.08), (1, hz - 0.08), (1, hz + 0.02), (0, hz + 0.02)], (80, 116, 80))
        for _ in range(30):
            x, y = rng.uniform(0, 1), rng.uniform(hz + 0.03, 1.0)
            petal = [(236, 214, 222), (238, 232, 190), (244, 244, 240)][int(rng.integers(3))]
            p.ellipse(x, y, 0.006, 0.006, petal)
    elif kind == "mountain":
        for layer, colour in ((0, (150, 160, 178)), (1, (122, 130, 148))):
            x = -0.1 + rng.uniform(0, 0.1)
            while x < 1.1:
                hw, peak = rng.uniform(0.12, 0.25), hz - rng.uniform(0.2, 0.4) + 0.08 * layer
                p.polygon([(x - hw, hz + 0.01), (x + hw, hz + 0.01), (x, peak)], colour)
                cap = 0.25
                p.polygon([(x - hw * cap, peak + (hz - peak) * cap), (x + hw * cap, peak + (hz - peak) * cap),
                           (x, peak)], (236, 238, 242))
                x += hw * rng.uniform(1.0, 1.6)
    elif kind == "cave":
        for i in range(12):  # stalactites
            x = (i + rng.uniform(0, 0.8)) / 11
            hw = rng.uniform(0.01, 0.03)
            p.polygon([(x - hw, 0), (x + hw, 0), (x, rng.uniform(0.08, 0.22))], (44, 40, 38))
    elif kind == "room":
        p.polygon([(0, hz - 0.03), (1, hz - 0.03), (1, hz), (0, hz)], (176, 160, 140))
        x = rng.uniform(0.2, 0.8)
        p.polygon([(x - 0.08, 0.14), (x + 0.08, 0.14), (x + 0.08, 0.38), (x - 0.08, 0.38)], (120, 100, 84))
        p.polygon([(x - 0.07, 0.155), (x + 0.07, 0.155), (x + 0.07, 0.365), (x - 0.07, 0.365)], (180, 204, 222))
    if kind in ("night", "space"):
        for _ in range(40 if kind == "space" else 25):
            x, y = rng.uniform(0, 1), rng.uniform(0, hz - 0.1 if kind == "space" else hz - 0.35)
            p.ellipse(x, y, 0.004, 0.004, (220, 220, 228))
    if kind == "space":
        for _ in range(5):  # craters
            x, y = rng.uniform(0, 1), rng.uniform(hz + 0.04, 0.98)
            p.ellipse(x, y, 0.04, 0.012, (96, 96, 104))


def render_background(scene: Scene, height: int, width: int) -> np.ndarray:
    """The scene without characters: uint8 [height, width, 3]. Drawn with PIL at a higher resolution and
    reduced with a box filter (anti-aliasing)."""
    from PIL import Image

    _check_size(height, width)
    k = 4 if min(height, width) < 128 else 2
    hh, ww = height * k, width * k
    style = scene.style
    rng = np.random.default_rng(scene.detail_seed)
    horizon = int(round(style.horizon * hh))
    if style.sky is None:  # indoors / underground: a wall instead of a sky
        wall = {"cave": ((62, 56, 52), (88, 80, 74)), "room": ((206, 194, 176), (222, 210, 190))}[scene.background]
        top = _vertical_gradient(wall[0], wall[1], horizon, ww)
    else:
        top = _vertical_gradient(style.sky[0], style.sky[1], horizon, ww)
    bottom = _vertical_gradient(style.ground[0], style.ground[1], hh - horizon, ww)
    array = np.concatenate([top, bottom], axis=0)
    image = Image.fromarray(np.round(array).astype(np.uint8))
    painter = _Painter(image)
    _draw_features(painter, scene, rng)
    for prop in sorted(scene.props, key=lambda q: q.kind not in _SKY_PROPS):  # sky first
        ground = style.horizon + 0.08 + 0.04 * float(rng.random())  # props stand a little behind the characters
        _draw_prop(painter, prop, scene, ground, rng)
    return np.asarray(image.resize((width, height), Image.BOX), dtype=np.uint8).copy()


def _check_size(height: int, width: int):
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))):
        raise WorldError(f"height and width must be integers, got {height!r} x {width!r}")
    if height < 16 or width < 16:
        raise WorldError(f"frames of the toy world are at least 16x16 pixels, got {height}x{width} (H x W)")


# ---------------------------------------------------------------------------------------------- motion
MOTIONS = ("stand", "walk", "run", "jump", "spin", "slide", "enter", "leave")
_MOVES = {"walk": 0.3, "run": 0.45, "slide": 0.35, "jump": 0.1}


@dataclass(frozen=True)
class Motion:
    """How one character moves through a clip.

    Attributes:
        kind: one of :data:`MOTIONS`.
        direction: +1 (right), -1 (left) or 0 (in place; ``stand``, ``spin``, a ``jump`` on the spot).
        start_x: where the character starts, as a fraction of the width (``enter`` starts at the edge it
            comes from and walks to ``start_x``).
    """

    kind: str
    direction: int = 0
    start_x: float = 0.5

    def __post_init__(self):
        _check_choice(self.kind, MOTIONS, "motion")
        if self.direction not in (-1, 0, 1):
            raise WorldError(f"motion direction must be -1, 0 or 1, got {self.direction!r}")
        if self.kind in ("walk", "run", "slide", "enter", "leave") and self.direction == 0:
            raise WorldError(f"motion {self.kind!r} needs a direction (-1 left, 1 right)")
        if not (isinstance(self.start_x, (int, float)) and -0.5 <= self.start_x <= 1.5):
            raise WorldError(f"motion start_x must be a fraction of the width, got {self.start_x!r}")

    def x_at(self, t: float) -> float:
        """Horizontal position (fraction of the width) at clip time ``t`` in [0, 1]."""
        if self.kind == "enter":
            edge = -0.05 if self.direction > 0 else 1.05
            return edge + (self.start_x - edge) * _ease_out(t)
        if self.kind == "leave":
            edge = 1.05 if self.direction > 0 else -0.05
            return self.start_x + (edge - self.start_x) * t * t
        distance = _MOVES.get(self.kind, 0.0) * self.direction
        return self.start_x + distance * (_ease_in_out(t) if self.kind == "slide" else t)

    @property
    def end_x(self) -> float:
        return self.x_at(1.0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "direction": self.direction, "start_x": self.start_x}

    @classmethod
    def from_dict(cls, data: dict) -> Motion:
        if not isinstance(data, dict) or "kind" not in data:
            raise WorldError(f"a motion must be an object with a 'kind', got {data!r}")
        return cls(kind=data["kind"], direction=int(data.get("direction", 0)), start_x=float(data.get("start_x", 0.5)))

    @classmethod
    def random(cls, rng: np.random.Generator, start_x: Optional[float] = None,
               kinds: Sequence[str] = MOTIONS) -> Motion:
        """A random motion that keeps the character in the picture (``leave`` excepted), starting at
        ``start_x`` when given (``enter`` then walks in to it)."""
        kind = kinds[int(rng.integers(len(kinds)))]
        x = float(np.round(rng.uniform(0.25, 0.75), 3)) if start_x is None else float(start_x)
        if kind in ("walk", "run", "slide", "leave"):
            # Head towards the side with more room.
            direction = 1 if x < 0.5 else -1
            if start_x is None:
                distance = _MOVES.get(kind, 0.0)
                x = float(np.round(rng.uniform(0.2, 0.8 - distance), 3)) if direction > 0 else \
                    float(np.round(rng.uniform(0.2 + distance, 0.8), 3))
            elif kind != "leave" and not 0.2 <= x + direction * _MOVES[kind] <= 0.8:
                kind, direction = "stand", 0
            return cls(kind, direction, x)
        if kind == "enter":
            direction = 1 if rng.random() < 0.5 else -1
            return cls(kind, direction, x)
        if kind == "jump":
            direction = int(rng.integers(-1, 2))
            if not 0.2 <= x + direction * _MOVES["jump"] <= 0.8:
                direction = 0
            return cls(kind, direction, x)
        return cls(kind, 0, x)


def _ease_in_out(t: float) -> float:
    return 0.5 - 0.5 * math.cos(math.pi * t)


def _ease_out(t: float) -> float:
    return 1.0 - (1.0 - t) ** 2


def character_poses(character: Character, motion: Motion, num_frames: int, height: int, width: int,
                    rng: Optional[np.random.Generator] = None) -> list[Pose]:
    """The character's pose in each frame. ``rng`` adds the per-clip variation (size, gait phase, ground
    line, wobble); without it the poses are the motion's nominal ones."""
    return _track(character, motion, num_frames, height, width, rng)[0]


def _track(character: Character, motion: Motion, num_frames: int, height: int, width: int,
           rng: Optional[np.random.Generator]) -> tuple[list[Pose], float, list[float]]:
    """Poses, the ground line (feet y in pixels) and the hop height (in body units) of each frame."""
    if rng is None:
        size_jitter, ground_jitter, phase, steps = 1.0, 0.0, 0.0, 3.0
    else:
        size_jitter = float(rng.uniform(0.92, 1.08))
        ground_jitter = float(rng.uniform(-0.015, 0.015))
        phase = float(rng.uniform(0, 0.25))
        steps = float(rng.uniform(2.5, 3.5))
    scale = BODY_SIZE * min(height, width) * size_jitter
    feet = (GROUND_Y + ground_jitter) * height
    bottom = _BODY_BOTTOM.get(character.shape, 1.0)
    poses, hops = [], []
    for i in range(num_frames):
        t = i / (num_frames - 1) if num_frames > 1 else 0.0
        hop, angle = 0.0, 0.0
        kind = motion.kind
        if kind == "stand":
            hop = 0.05 * (0.5 - 0.5 * math.cos(2 * math.pi * (2 * t + phase)))
        elif kind in ("walk", "enter", "leave"):
            hop = 0.12 * abs(math.sin(math.pi * (steps * t + phase)))
            angle = 5.0 * math.sin(math.pi * (steps * t + phase))
        elif kind == "run":
            hop = 0.2 * abs(math.sin(math.pi * (1.7 * steps * t + phase)))
            angle = 10.0 * motion.direction
        elif kind == "jump":
            hop = 1.0 * abs(math.sin(2 * math.pi * t))
        elif kind == "spin":
            angle = 360.0 * _ease_in_out(t) * (1 if phase < 0.125 else -1)
            hop = 0.25 * math.sin(math.pi * t)
        x = motion.x_at(t) * width
        if kind not in ("enter", "leave"):  # narrow pictures: keep the whole body in view
            margin = min(1.1 * scale, 0.5 * width)
            x = min(max(x, margin), width - margin)
        y = feet - (bottom + hop) * scale
        poses.append(Pose(float(x), float(y), float(scale), float(angle)))
        hops.append(hop)
    return poses, feet, hops


def _shadow(canvas: np.ndarray, pose: Pose, feet_y: float, hop: float):
    """A soft shadow on the ground under a character (darkens the background; hue and saturation kept)."""
    height, width = canvas.shape[:2]
    rx = 0.9 * pose.scale * max(0.4, 1.0 - 0.35 * hop)
    ry = max(0.8, 0.16 * pose.scale)
    x0, x1 = max(0, int(pose.x - rx) - 1), min(width, int(pose.x + rx) + 2)
    y0, y1 = max(0, int(feet_y - ry) - 1), min(height, int(feet_y + ry) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    d = ((xs - pose.x) / rx) ** 2 + ((ys - feet_y) / ry) ** 2
    factor = 1.0 - 0.22 * np.clip(1.5 * (1.0 - d), 0.0, 1.0)
    canvas[y0:y1, x0:x1] *= factor[..., None]


MotionLike = Union[Motion, str]


def _as_motion(motion: MotionLike, rng: np.random.Generator) -> Motion:
    if isinstance(motion, Motion):
        return motion
    if isinstance(motion, str):
        _check_choice(motion, MOTIONS, "motion")
        return Motion.random(rng, kinds=(motion,))
    raise WorldError(f"motion must be a Motion or one of {', '.join(MOTIONS)}, got {motion!r}")


def render_clip(characters: Character | Sequence[Character], scene: Scene,
                motion: MotionLike | Sequence[MotionLike], num_frames: int, height: int, width: int,
                seed: int = 0, with_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render a clip: uint8 [num_frames, height, width, 3].

    ``motion`` is one motion per character, or one motion for the first character while the others stand
    mirrored across the middle. A motion given by kind only (``"walk"``) gets its direction and start from
    ``seed``. Same arguments, same frames. ``with_mask`` also returns where the characters are: bool
    ``[num_frames, height, width]``, the pixels a character covers at least half of (shadows excluded).
    """
    characters = [characters] if isinstance(characters, Character) else list(characters)
    if not characters:
        raise WorldError("render_clip needs at least one character")
    for i, c in enumerate(characters):
        if not isinstance(c, Character):
            raise WorldError(f"characters[{i}] is not a Character: {c!r}")
    for i in range(len(characters)):
        for j in range(i + 1, len(characters)):
            if not compatible_together(characters[i], characters[j]):
                raise WorldError(f"characters {characters[i].key} and {characters[j].key} cannot appear together: "
                                 "their body colours are equal or complementary")
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise WorldError(f"num_frames must be a positive integer, got {num_frames!r}")
    _check_size(height, width)
    rng = np.random.default_rng(seed)
    motions = _motions_for(characters, motion, rng)
    background = render_background(scene, height, width).astype(np.float32)
    tracks = [_track(c, m, num_frames, height, width, np.random.default_rng(rng.integers(2 ** 62)))
              for c, m in zip(characters, motions)]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    mask = np.zeros((num_frames, height, width), bool) if with_mask else None
    for i in range(num_frames):
        canvas = background.copy()
        for poses, feet, hops in tracks:  # shadows first: a character never darkens another one
            _shadow(canvas, poses[i], feet, hops[i])
        for character, (poses, _, _) in zip(characters, tracks):
            draw_character(canvas, character, poses[i])
        frames[i] = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
        if with_mask:
            # Drawn over black and over white, a pixel covered by a fraction a differs by (1 - a) x 255.
            black, white = np.zeros((height, width, 3), np.float32), np.full((height, width, 3), 255.0, np.float32)
            for character, (poses, _, _) in zip(characters, tracks):
                draw_character(black, character, poses[i])
                draw_character(white, character, poses[i])
            mask[i] = (white - black).mean(axis=-1) <= 127.5
    return (frames, mask) if with_mask else frames


def _motions_for(characters, motion, rng) -> list[Motion]:
    if isinstance(motion, (Motion, str)):
        first = _as_motion(motion, rng)
        others = [Motion("stand", 0, float(np.clip(1.0 - first.start_x, 0.2, 0.8))) for _ in characters[1:]]
        return [first] + others
    motions = [_as_motion(m, rng) for m in motion]
    if len(motions) != len(characters):
        raise WorldError(f"got {len(motions)} motions for {len(characters)} characters")
    return motions


# ---------------------------------------------------------------------------------------------- captions
CAPTION_MODES = ("first", "named", "same", "returns")


def _verb_phrase(motion: Motion, scene: Scene) -> str:
    style = scene.style
    side = "right" if motion.direction > 0 else "left"
    if motion.kind == "stand":
        return f"stands {style.where}"
    if motion.kind in ("walk", "run", "slide"):
        verb = {"walk": "walks", "run": "runs", "slide": "slides"}[motion.kind]
        return f"{verb} {side} {style.across}"
    if motion.kind == "jump":
        return f"jumps {side} {style.where}" if motion.direction else f"jumps {style.where}"
    if motion.kind == "spin":
        return f"spins around {style.where}"
    if motion.kind == "enter":
        return f"walks {style.into}"
    if motion.kind == "leave":
        return f"walks {side} and leaves {style.place}"
    raise WorldError(f"unknown motion {motion.kind!r}")


def caption(characters: Character | Sequence[Character], scene: Scene, motion: Motion | Sequence[Motion],
            mode: str = "first") -> str:
    """A caption made of :data:`storymem.builtin.tiny.TOY_VOCABULARY` words.

    ``mode``: ``first`` introduces the character ("a red striped circle with a hat walks into the desert"),
    ``named`` refers back to it by name ("the red striped circle with the hat ..."), ``same`` by reference
    only ("the same character ..."), ``returns`` brings it back ("the red ... returns and ..."). With several
    characters the first is the subject and the others are introduced in a ``while`` clause.
    """
    characters = [characters] if isinstance(characters, Character) else list(characters)
    motions = [motion] if isinstance(motion, Motion) else list(motion)
    if mode not in CAPTION_MODES:
        raise WorldError(f"unknown caption mode {mode!r}; expected one of {', '.join(CAPTION_MODES)}")
    if len(motions) == 1 and len(characters) > 1:
        motions = motions + [Motion("stand", 0, 0.5)] * (len(characters) - 1)
    if len(motions) != len(characters):
        raise WorldError(f"got {len(motions)} motions for {len(characters)} characters")
    main = characters[0]
    if mode == "first":
        subject = main.description()
    elif mode == "same":
        subject = "the same character"
    else:
        subject = main.description(definite=True)
    verb = _verb_phrase(motions[0], scene)
    text = f"{subject} returns and {verb}" if mode == "returns" else f"{subject} {verb}"
    landmark = scene.landmark
    if landmark is not None and motions[0].kind != "leave":
        text += f" near a {landmark}"
    for other, m in zip(characters[1:], motions[1:]):
        text += f" while {other.description()} {_verb_phrase(m, scene).split(' ', 1)[0]}"
    return text


def first_frame_caption(character: Character, scene: Scene, definite: bool = False) -> str:
    """What the first frame shows: "a red circle with a hat in the desert near a rock"."""
    text = f"{character.description(definite)} {scene.style.where}"
    if scene.landmark is not None:
        text += f" near a {scene.landmark}"
    return text


# ---------------------------------------------------------------------------------------------- clip specs
@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines a clip: render it at any size and length with :meth:`render`."""

    characters: tuple[Character, ...]
    scene: Scene
    motions: tuple[Motion, ...]
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "characters", tuple(self.characters))
        object.__setattr__(self, "motions", tuple(self.motions))
        if len(self.characters) != len(self.motions) or not self.characters:
            raise WorldError(f"a clip needs one motion per character, got {len(self.characters)} characters and "
                             f"{len(self.motions)} motions")

    def render(self, num_frames: int, height: int, width: int,
               with_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return render_clip(list(self.characters), self.scene, list(self.motions), num_frames, height, width,
                           self.seed, with_mask=with_mask)

    def caption(self, mode: str = "first") -> str:
        return caption(list(self.characters), self.scene, list(self.motions), mode)

    def to_dict(self) -> dict[str, Any]:
        return {"characters": [c.to_dict() for c in self.characters], "scene": self.scene.to_dict(),
                "motions": [m.to_dict() for m in self.motions], "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict) -> ClipSpec:
        if not isinstance(data, dict):
            raise WorldError(f"a clip spec must be an object, got {data!r}")
        for key in ("characters", "scene", "motions"):
            if key not in data:
                raise WorldError(f"clip spec is missing field {key!r}")
        return cls(characters=tuple(Character.from_dict(c) for c in data["characters"]),
                   scene=Scene.from_dict(data["scene"]), motions=tuple(Motion.from_dict(m) for m in data["motions"]),
                   seed=int(data.get("seed", 0)))

    @classmethod
    def random(cls, rng: np.random.Generator, character: Character, background: Optional[str] = None,
               start_x: Optional[float] = None, kinds: Sequence[str] = MOTIONS,
               scene: Optional[Scene] = None) -> ClipSpec:
        """A single-character clip of ``character`` in a random scene (or ``scene``) with a random motion."""
        if scene is None:
            scene = Scene.random(rng, background)
        elif background is not None and background != scene.background:
            raise WorldError(f"background {background!r} contradicts the given scene's {scene.background!r}")
        motion = Motion.random(rng, start_x=start_x, kinds=kinds)
        return cls((character,), scene, (motion,), seed=int(rng.integers(2 ** 31)))
