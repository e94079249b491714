"""The toy world's scenes: a background (desert, forest, beach, city, ...) with a few props (trees, houses,
rocks, lamps, the sun, ...), drawn with numpy and PIL.

Every colour a background or prop uses is muted (HSV saturation <= :data:`BACKGROUND_MAX_SATURATION`) or dark
(value <= :data:`BACKGROUND_MAX_VALUE`), while characters use saturated colours only: that is what lets the
detector tell a character from the scene behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .characters import WorldError, check_choice

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_MAX_SATURATION",
    "BACKGROUND_MAX_VALUE",
    "PROPS",
    "Prop",
    "Scene",
    "check_size",
    "render_background",
]

#: Background colours are muted (saturation at most this) ...
BACKGROUND_MAX_SATURATION = 0.45
#: ... or dark (value at most this).
BACKGROUND_MAX_VALUE = 0.28

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
        check_choice(self.kind, PROPS, "prop")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "x": self.x, "scale": self.scale}


@dataclass(frozen=True)
class Scene:
    """A background and its props. ``detail_seed`` fixes the small random details (stars, dunes, windows)."""

    background: str
    props: tuple[Prop, ...] = ()
    detail_seed: int = 0

    def __post_init__(self):
        check_choice(self.background, BACKGROUNDS, "background")
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
        style = _STYLES[check_choice(background, BACKGROUNDS, "background")]
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

    check_size(height, width)
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


def check_size(height: int, width: int):
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))):
        raise WorldError(f"height and width must be integers, got {height!r} x {width!r}")
    if height < 16 or width < 16:
        raise WorldError(f"frames of the toy world are at least 16x16 pixels, got {height}x{width} (H x W)")


