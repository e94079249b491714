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

Characters and their geometry are defined in :mod:`.characters`, scenes in :mod:`.scenes`; this module adds
motion, clips (:func:`render_clip`, :class:`ClipSpec`) and captions, and is the one import for all of it. The
same clip renders at any size from 32x32 to 480x832 and beyond.

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

# The world's characters and scenes, re-exported: ``world`` is the one import for all of it.
from .characters import (
    ACCESSORIES,
    BODY_BOTTOM,
    BODY_SIZE,
    COLOURS,
    GROUND_Y,
    PATTERN_SHADE,
    PATTERNS,
    SHAPES,
    Character,
    Pose,
    WorldError,
    accessory_colour,
    accessory_mask,
    body_mask,
    character_colours,
    character_layers,
    check_choice,
    compatible_together,
    draw_character,
    pattern_mask,
    shape_symmetry,
)
from .scenes import (
    BACKGROUND_MAX_SATURATION,
    BACKGROUND_MAX_VALUE,
    BACKGROUNDS,
    PROPS,
    Prop,
    Scene,
    check_size,
    render_background,
)

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
        check_choice(self.kind, MOTIONS, "motion")
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
    bottom = BODY_BOTTOM.get(character.shape, 1.0)
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
        check_choice(motion, MOTIONS, "motion")
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
    check_size(height, width)
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
