"""Ground-truth identity detector of the toy world: which character (shape, colour, pattern, accessory) a
picture shows, with a confidence.

It knows what :mod:`research.small_world.world` draws and fits it (analysis by synthesis):

1. **Colour segmentation.** Backgrounds only use muted or dark colours, characters saturated palette
   colours, so every saturated pixel belongs to a character; its hue names the palette colour. The largest
   colour class is a body; the complementary class around it is its accessory (when the accessory has as
   many pixels as the body, both readings are tried and the better fit decides).
2. **Silhouette.** Each body shape is drawn as a template (from the world's own geometry) and fitted to the
   body pixels over rotation, scale and position (coarse grid, then local search); accessory pixels count
   for nothing there, since an accessory may hide part of the body.
3. **Shape and accessory together.** For the best few silhouettes, each accessory's template is compared
   with the accessory pixels (at every orientation the body's symmetry leaves open). The likeliest
   (shape, accessory) readings then compete on every pixel's label - body, accessory or neither - as the
   soft intersection over union of the observed colour memberships and the anti-aliased templates, with
   their poses refined. A small handicap keeps upside-down readings for frames that need them (spins).
4. **Pattern.** Inside the body the brightness is regressed on each pattern's dark-shade coverage (offset
   and contrast fitted, a small phase search for pose errors); the pattern that explains the most of the
   brightness variance wins, when it explains enough of it with a darker shade, else the body is plain.

Frames are first reduced so that a body is about ``working_scale`` pixels in half-size, which keeps the cost
per frame at a few tens of milliseconds at any resolution. A clip is judged on a few evenly spread frames
whose answers vote, weighted by their confidence. The detector works on frames decoded from H.264 (4:2:0
chroma; tested at crf 18, the clip datasets' setting, and holds up to crf 28 at 64x64); bodies smaller than
about 8 pixels in half-size (32x32 frames) lose their patterns and accessories to compression.

Frames that are not from the toy world (or from a model that has not learned it) simply yield low
confidences or no detection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .characters import (
    ACCESSORIES,
    COLOURS,
    PATTERNS,
    SHAPES,
    Character,
    Pose,
    accessory_colour,
    accessory_mask,
    body_mask,
    pattern_mask,
    shape_symmetry,
)
from .detection import (
    ATTRIBUTES,
    CharacterMatch,
    Detection,
    DetectorConfig,
    as_character,
    as_frames,
    rgb_to_hsv,
    softmax,
)

# The detection types are re-exported: ``detector`` is the one import for detecting.
__all__ = [
    "ATTRIBUTES",
    "CharacterMatch",
    "Detection",
    "DetectorConfig",
    "IdentityDetector",
    "as_character",
    "detect_identity",
    "identity_consistency",
    "same_character",
]

_COLOUR_NAMES = list(COLOURS)


@dataclass
class _Picture:
    """One frame reduced to the working scale: colour classes, brightness, and the reduction factor."""

    classes: np.ndarray  # int16 [H, W]: palette index, -1 for background / unclassified
    value: np.ndarray  # float32 [H, W]
    nearest: np.ndarray  # int16 [H, W]: nearest palette index of every pixel
    weight: np.ndarray  # float32 [H, W]: soft membership of every pixel in its nearest palette class
    factor: int


@dataclass
class _Crop:
    """The pixels around one candidate character (flattened), in working-scale picture coordinates."""

    bounds: tuple[int, int, int, int]  # y0, y1, x0, x1
    px: np.ndarray  # pixel centres
    py: np.ndarray
    body: np.ndarray  # bool: pixels of the body colour
    accessory: np.ndarray  # bool: pixels of its accessory colour
    count: int  # body pixels
    near_body: np.ndarray  # bool: pixels the silhouette fit looks at
    near: np.ndarray  # bool: pixels the accessory and joint fits look at
    soft_body: np.ndarray  # float: soft membership in the body colour
    soft_accessory: np.ndarray  # float: soft membership in the accessory colour
    at_border: bool  # the body touches the picture's border (it may be cut off)
    centroid: tuple[float, float]


@dataclass
class _Fit:
    shape: str
    iou: float
    x: float
    y: float
    scale: float
    angle: float


class IdentityDetector:
    """Recovers toy-world identities from frames. Templates are built once per detector object."""

    def __init__(self, config: Optional[DetectorConfig] = None):
        self.config = config or DetectorConfig()
        n = self.config.template_size
        self._extent = 2.2
        self._cell = 2 * self._extent / n
        centres = (np.arange(n, dtype=np.float32) + 0.5) * self._cell - self._extent
        u, v = np.meshgrid(centres, centres)
        bodies = {s: body_mask(s, u, v) for s in SHAPES}
        self._area = {s: float(m.sum()) * self._cell ** 2 for s, m in bodies.items()}
        self._centroid = {s: (float(u[m].mean()), float(v[m].mean())) for s, m in bodies.items()}
        self._body = {s: np.pad(m, 1) for s, m in bodies.items()}
        self._accessory = {(s, a): np.pad(accessory_mask(a, s, u, v), 1) for s in SHAPES for a in ACCESSORIES[1:]}
        hsv = rgb_to_hsv(np.array(list(COLOURS.values()), np.float32) / 255.0)
        self._palette_hue = hsv[0]
        self._complement = np.array([_COLOUR_NAMES.index(accessory_colour(c)) for c in _COLOUR_NAMES])

    # ------------------------------------------------------------------ pixels
    def _classes(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hard class or -1, value, nearest palette index, soft membership weight in [0, 1]) per pixel."""
        cfg = self.config
        hue, saturation, value = rgb_to_hsv(rgb)
        diff = np.abs(hue[..., None] - self._palette_hue)
        diff = np.minimum(diff, 360.0 - diff)
        nearest = diff.argmin(-1)
        distance = np.take_along_axis(diff, nearest[..., None], -1)[..., 0]
        ok = (saturation >= cfg.min_saturation) & (value >= cfg.min_value) & (distance <= cfg.max_hue_distance)
        # The soft weight ramps across each threshold: compression blurs colours at edges, and a pixel half
        # covered by a character is half a character pixel.
        weight = (np.clip((saturation - cfg.min_saturation) / 0.3 + 0.5, 0, 1)
                  * np.clip((value - cfg.min_value) / 0.16 + 0.5, 0, 1)
                  * np.clip((cfg.max_hue_distance - distance) / 16.0 + 0.5, 0, 1)).astype(np.float32)
        return np.where(ok, nearest, -1).astype(np.int16), value, nearest.astype(np.int16), weight

    def _picture(self, frame: np.ndarray) -> _Picture:
        rgb = frame.astype(np.float32) / 255.0
        classes, value, nearest, weight = self._classes(rgb)
        counts = np.bincount(classes[classes >= 0].ravel(), minlength=len(COLOURS))
        # Reduce big pictures so the largest body is about `working_scale` pixels in half-size.
        half_size = math.sqrt(counts.max() / 3.0) if counts.max() else 0.0
        factor = max(1, int(round(half_size / self.config.working_scale)))
        if factor > 1:
            h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
            small = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
            classes, value, nearest, weight = self._classes(small)
        return _Picture(classes, value, nearest, weight, factor)

    # ------------------------------------------------------------------ templates
    def _lookup(self, bitmap: np.ndarray, x, y, scale, angle, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Template values at picture points for a batch of poses: bool [poses, points].

        ``bitmap`` is a padded template (a False border one cell wide), so out-of-range points clip onto it.
        """
        a = np.radians(np.asarray(angle, np.float32))[:, None]
        k = 1.0 / (np.asarray(scale, np.float32)[:, None] * self._cell)
        cu, su = np.cos(a) * k, np.sin(a) * k
        x = np.asarray(x, np.float32)[:, None]
        y = np.asarray(y, np.float32)[:, None]
        offset = self._extent / self._cell + 1.0  # + 1: the padding
        fu = px[None, :] * cu + py[None, :] * su + (offset - x * cu - y * su)
        fv = py[None, :] * cu - px[None, :] * su + (offset - y * cu + x * su)
        n = bitmap.shape[0]
        np.clip(fu, 0, n - 1, out=fu)
        np.clip(fv, 0, n - 1, out=fv)
        index = fv.astype(np.int32)
        index *= n
        index += fu.astype(np.int32)
        return bitmap.ravel().take(index)

    def _centre_for(self, shape: str, cx: float, cy: float, scale, angle):
        """Pose centre (canonical origin) that puts the shape's centroid at (cx, cy)."""
        cu, cv = self._centroid[shape]
        a = np.radians(angle)
        return (cx - scale * (cu * np.cos(a) - cv * np.sin(a)), cy - scale * (cu * np.sin(a) + cv * np.cos(a)))

    def _rotate_about_centroid(self, shape: str, fit: _Fit, angle: float) -> tuple[float, float]:
        """Centre of the pose that keeps the centroid in place while turning the body to ``angle``."""
        cu, cv = self._centroid[shape]
        a = math.radians(fit.angle)
        gx = fit.x + fit.scale * (cu * math.cos(a) - cv * math.sin(a))
        gy = fit.y + fit.scale * (cu * math.sin(a) + cv * math.cos(a))
        x, y = self._centre_for(shape, gx, gy, fit.scale, angle)
        return float(x), float(y)

    # ------------------------------------------------------------------ fitting
    def _score(self, shape, x, y, scale, angle, px, py, body, care) -> np.ndarray:
        masks = self._lookup(self._body[shape], x, y, scale, angle, px, py)
        inter = (masks & body).sum(1)
        union = ((masks | body) & care).sum(1)
        return inter / np.maximum(union, 1)

    def _fit_shapes(self, body, care, px, py, starts: list[tuple[float, float, float, list[float]]]) -> list[_Fit]:
        """Fit every body shape; ``starts``: (centroid x, centroid y, pixel count, scale factors) guesses."""
        fits = []
        for shape in SHAPES:
            k = shape_symmetry(shape)
            angles = np.arange(0.0, 360.0 / k, 15.0) if k else np.zeros(1)
            poses = []
            for cx, cy, count, factors in starts:
                angle, scale = np.meshgrid(angles, math.sqrt(count / self._area[shape]) * np.array(factors))
                angle, scale = angle.ravel(), scale.ravel()
                x, y = self._centre_for(shape, cx, cy, scale, angle)
                poses.append(np.stack([x, y, scale, angle], 1))
            x, y, scale, angle = np.concatenate(poses).T
            iou = self._score(shape, x, y, scale, angle, px, py, body, care)
            i = int(iou.argmax())
            fits.append(_Fit(shape, float(iou[i]), float(x[i]), float(y[i]), float(scale[i]), float(angle[i])))
        # Refine the best few shapes by local search over position, scale and angle.
        fits.sort(key=lambda f: -f.iou)
        for fit in fits[:self.config.candidates]:
            def score(poses, shape=fit.shape):
                return self._score(shape, poses[:, 0], poses[:, 1], poses[:, 2], poses[:, 3], px, py, body, care)

            pose = np.array([fit.x, fit.y, fit.scale, fit.angle], np.float64)
            fit.iou, pose = self._local_search(score, pose, fit.iou, steps=(2.0, 1.0, 0.5))
            fit.x, fit.y, fit.scale, fit.angle = (float(v) for v in pose)
        fits.sort(key=lambda f: -f.iou)
        return fits

    def _orientations(self, fit: _Fit, step: float) -> list[float]:
        k = shape_symmetry(fit.shape)
        if k == 0:
            return [float(a) for a in np.arange(0.0, 360.0, step)]
        return [fit.angle + j * 360.0 / k for j in range(k)]

    def _fit_accessory(self, fit: _Fit, accessory_pixels, px, py, body_count: int) -> list[tuple[str, float, float]]:
        """(accessory, score, angle of its best orientation) for every accessory, best first. The score is the
        IoU of template and accessory pixels; for "none", how few accessory pixels there are."""
        seen = int(accessory_pixels.sum())
        none_score = float(np.clip(1.0 - seen / (0.05 * body_count), 0.0, 1.0))
        scores = [none_score]
        angles = [fit.angle]
        orientations = self._orientations(fit, 15.0)
        centres = [self._rotate_about_centroid(fit.shape, fit, a) for a in orientations]
        xs = np.array([c[0] for c in centres], np.float32)
        ys = np.array([c[1] for c in centres], np.float32)
        scale = np.full(len(orientations), fit.scale, np.float32)
        for accessory in ACCESSORIES[1:]:
            if seen == 0:
                scores.append(0.0)
                angles.append(fit.angle)
                continue
            masks = self._lookup(self._accessory[(fit.shape, accessory)], xs, ys, scale, np.array(orientations),
                                 px, py)
            iou = (masks & accessory_pixels).sum(1) / np.maximum((masks | accessory_pixels).sum(1), 1)
            i = int(iou.argmax())
            best, angle = float(iou[i]), orientations[i]
            if shape_symmetry(fit.shape) == 0:  # the accessory alone fixes the angle: refine it
                for step in (7.5, 3.75):
                    trial = [angle - step, angle, angle + step]
                    cs = [self._rotate_about_centroid(fit.shape, fit, a) for a in trial]
                    m = self._lookup(self._accessory[(fit.shape, accessory)], np.array([c[0] for c in cs]),
                                     np.array([c[1] for c in cs]), scale[:3], np.array(trial), px, py)
                    t_iou = (m & accessory_pixels).sum(1) / np.maximum((m | accessory_pixels).sum(1), 1)
                    j = int(t_iou.argmax())
                    if t_iou[j] >= best:
                        best, angle = float(t_iou[j]), trial[j]
            scores.append(best)
            angles.append(angle)
        return sorted(zip(ACCESSORIES, scores, angles), key=lambda r: -r[1])

    def _fit_pattern(self, fit: _Fit, accessory: str, angle_options: list[float], body_pixels, value, px, py):
        """(pattern, probabilities over PATTERNS): the brightness inside the body (away from its edges and the
        accessory) regressed on each pattern's dark-shade coverage, over the orientations the silhouette leaves
        open and a small phase search for pose errors.

        The fit has its own offset and contrast: a decoder or a codec blurs a pattern's dark shade towards the
        body colour, which lowers its contrast but keeps its layout, so the layout (the share of the brightness
        variance the pattern explains) decides, and contrast only has to reach ``pattern_min_contrast``."""
        cfg = self.config
        ss = 3
        offsets = (np.arange(ss, dtype=np.float32) + 0.5) / ss - 0.5
        ox, oy = np.meshgrid(offsets, offsets)
        ox, oy = ox.ravel(), oy.ravel()
        rim_x, rim_y = (a.ravel() for a in np.meshgrid(np.float32([-1, 0, 1]), np.float32([-1, 0, 1])))
        explained = {p: 0.0 for p in PATTERNS[1:]}
        judged = False
        for angle in angle_options:
            x, y = self._rotate_about_centroid(fit.shape, fit, angle)
            pose = Pose(x, y, fit.scale, angle)
            sx = px[:, None] + ox[None, :]
            sy = py[:, None] + oy[None, :]
            u, v = pose.to_canonical(sx, sy)
            # Judge only pixels a margin away from the body's edge and the accessory: blur carries the
            # background and the accessory into the body's rim, which a pattern would then be fitted to.
            inside = None
            for margin in (cfg.pattern_margin, 0.5):
                mu, mv = pose.to_canonical(px[:, None] + margin * rim_x[None, :], py[:, None] + margin * rim_y[None, :])
                inside = body_mask(fit.shape, mu, mv).all(1) & body_pixels
                if accessory != "none":
                    inside &= ~accessory_mask(accessory, fit.shape, mu, mv).any(1)
                if inside.sum() >= 6:
                    break
            if inside.sum() < 6:
                continue
            judged = True
            observed = value[inside]
            centred = observed - observed.mean()
            spread = float((centred * centred).sum())
            uu, vv = u[inside], v[inside]
            for pattern in PATTERNS[1:]:
                for phase in [(a, b) for a in (-0.15, 0.0, 0.15) for b in (-0.15, 0.0, 0.15)]:
                    dark = pattern_mask(pattern, uu, vv, phase).mean(1)
                    d = dark - dark.mean()
                    dd = float((d * d).sum())
                    if dd < 1e-6 or spread < 1e-9:
                        continue
                    slope = float((d * centred).sum()) / dd  # brightness change from body to dark shade
                    level = float(observed.mean()) - slope * float(dark.mean())  # the body's own brightness
                    if -slope < cfg.pattern_min_contrast * max(level, 1e-6):
                        continue
                    explained[pattern] = max(explained[pattern], slope * slope * dd / spread)
        if not judged:  # no interior pixels to judge by
            return "plain", np.full(len(PATTERNS), 1.0 / len(PATTERNS))
        # Plain scores the least explained share a pattern must reach.
        scores = np.array([cfg.pattern_min_fit] + [explained[p] for p in PATTERNS[1:]])
        probs = softmax(scores, cfg.pattern_sharpness)
        return PATTERNS[int(scores.argmax())], probs

    def _labels(self, shape: str, accessory: str, x, y, scale, angle, px, py) -> np.ndarray:
        """Rendered labels (1 body, 3 accessory, 0 neither) for a batch of poses: int8 [poses, points]."""
        labels = self._lookup(self._body[shape], x, y, scale, angle, px, py).astype(np.int8)
        if accessory != "none":
            on = self._lookup(self._accessory[(shape, accessory)], x, y, scale, angle, px, py)
            labels[on] = 3
        return labels

    def _joint_scorer(self, shape: str, accessory: str, soft_body, soft_accessory, px, py):
        """A function of poses [k, 4] (x, y, scale, angle) -> agreement of body and accessory layers: the soft
        intersection over union of the observed memberships and the rendered coverage (2 x 2 samples per
        pixel)."""
        sx = np.concatenate([px - 0.25, px + 0.25, px - 0.25, px + 0.25])
        sy = np.concatenate([py - 0.25, py - 0.25, py + 0.25, py + 0.25])
        n = px.shape[0]
        shown = soft_body + soft_accessory

        def score(poses: np.ndarray) -> np.ndarray:
            labels = self._labels(shape, accessory, poses[:, 0], poses[:, 1], poses[:, 2], poses[:, 3], sx, sy)
            labels = labels.reshape(len(poses), 4, n)
            cover_body = (labels == 1).mean(1, dtype=np.float32)
            cover_accessory = (labels == 3).mean(1, dtype=np.float32)
            inter = np.minimum(cover_body, soft_body).sum(1) + np.minimum(cover_accessory, soft_accessory).sum(1)
            union = np.maximum(cover_body + cover_accessory, shown).sum(1)
            return inter / np.maximum(union, 1e-6)

        return score

    @staticmethod
    def _local_search(score, pose: np.ndarray, best: float, steps=(1.0, 0.5)) -> tuple[float, np.ndarray]:
        """Hill-climb a pose (x, y, scale, angle): position, then scale and angle, at each step size (1: half
        a pixel, 2.5 % of the scale, 3 degrees)."""
        offsets = np.array([-1.0, 0.0, 1.0])
        for step in steps:
            for dims, sizes in (((0, 1), (0.5 * step, 0.5 * step)), ((2, 3), (0.025 * step * pose[2], 3.0 * step))):
                a, b = np.meshgrid(offsets * sizes[0], offsets * sizes[1])
                poses = np.repeat(pose[None], 9, 0)
                poses[:, dims[0]] += a.ravel()
                poses[:, dims[1]] += b.ravel()
                values = score(poses)
                i = int(values.argmax())
                if values[i] > best:
                    best, pose = float(values[i]), poses[i]
        return best, pose

    def _crop(self, picture: _Picture, colour: int, available: np.ndarray) -> Optional[_Crop]:
        """The pixels around the body of colour ``colour`` (those not yet explained by another character)."""
        classes = picture.classes
        body_full = (classes == colour) & available
        count = int(body_full.sum())
        if count < self.config.min_pixels:
            return None
        ys, xs = np.nonzero(body_full)
        height, width = classes.shape
        estimate = math.sqrt(count / 3.0)  # about the body's half-size
        margin = int(math.ceil(1.4 * estimate)) + 2  # room for a hat or a crown
        y0, y1 = max(0, ys.min() - margin), min(height, ys.max() + 1 + margin)
        x0, x1 = max(0, xs.min() - margin), min(width, xs.max() + 1 + margin)
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        px, py = gx.ravel(), gy.ravel()
        body = body_full[y0:y1, x0:x1].ravel()
        accessory = ((classes[y0:y1, x0:x1] == self._complement[colour]) & available[y0:y1, x0:x1]).ravel()
        # Silhouettes are fitted on the pixels near the body; accessories on those near body or accessory.
        pad = 0.3 * estimate + 2
        near_body = ((px >= xs.min() - pad) & (px <= xs.max() + 1 + pad) & (py >= ys.min() - pad)
                     & (py <= ys.max() + 1 + pad))
        shown = body | accessory
        near = ((px >= px[shown].min() - 3) & (px <= px[shown].max() + 3) & (py >= py[shown].min() - 3)
                & (py <= py[shown].max() + 3))
        nearest = picture.nearest[y0:y1, x0:x1].ravel()
        weight = picture.weight[y0:y1, x0:x1].ravel() * available[y0:y1, x0:x1].ravel()
        return _Crop(
            bounds=(y0, y1, x0, x1), px=px, py=py, body=body, accessory=accessory, count=count,
            near_body=near_body, near=near,
            soft_body=np.where(nearest == colour, weight, 0.0).astype(np.float32),
            soft_accessory=np.where(nearest == self._complement[colour], weight, 0.0).astype(np.float32),
            at_border=bool(ys.min() <= 0 or xs.min() <= 0 or ys.max() >= height - 1 or xs.max() >= width - 1),
            centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
        )

    def _read_silhouette(self, crop: _Crop) -> list[_Fit]:
        """Body shapes fitted to the body pixels (accessory pixels may hide body: they count for nothing)."""
        nb = crop.near_body
        # Start from the body's centroid and size, and from those of body and accessory together.
        factors = [0.97, 1.05, 1.14] + ([1.3, 1.5, 1.8] if crop.at_border else [])
        starts = [(*crop.centroid, crop.count, factors)]
        both = (crop.body | crop.accessory) & nb
        if (crop.accessory & nb).any():
            starts.append((float(crop.px[both].mean()), float(crop.py[both].mean()), int(both.sum()),
                           [0.85, 0.95, 1.05]))
        return self._fit_shapes(crop.body[nb], ~crop.accessory[nb], crop.px[nb], crop.py[nb], starts)

    def _read_shape_and_accessory(self, crop: _Crop, fits: list[_Fit]):
        """The best few silhouettes compete again with their likeliest accessories on every pixel's label
        (body, accessory, neither), so an accessory that hides part of the body no longer blurs shapes apart.
        Returns (score, fit, accessory, shape probabilities, accessory probabilities)."""
        near = crop.near
        px, py = crop.px[near], crop.py[near]
        soft_body, soft_accessory = crop.soft_body[near], crop.soft_accessory[near]
        readings = []  # [score, shape, accessory, pose, scorer]
        for fit in fits[:self.config.candidates]:
            ranked = self._fit_accessory(fit, crop.accessory[near], px, py, crop.count)
            for rank, (accessory, accessory_score, angle) in enumerate(ranked[:2]):
                if rank and (accessory_score <= 0.0 or accessory_score < 0.5 * ranked[0][1]):
                    continue
                x, y = self._rotate_about_centroid(fit.shape, fit, angle)
                pose = np.array([x, y, fit.scale, angle], np.float64)
                scorer = self._joint_scorer(fit.shape, accessory, soft_body, soft_accessory, px, py)
                readings.append([float(scorer(pose[None])[0]), fit.shape, accessory, pose, scorer])
        readings.sort(key=lambda r: -r[0])
        for reading in readings[:3]:  # refine the poses of the best few, then let them compete
            reading[0], reading[3] = self._local_search(reading[4], reading[3], reading[0])
        # Characters stand upright except while they spin: a reading that needs the character upside down
        # to explain the pixels pays a little (an upside-down square with a hat can mimic a star in a scarf).
        for reading in readings:
            reading.append(reading[0] - self.config.upright_prior * (1.0 - math.cos(math.radians(reading[3][3]))) / 2)
        readings.sort(key=lambda r: -r[5])
        score, shape, accessory, pose, _, _ = readings[0]
        shape_scores = np.full(len(SHAPES), -1.0)
        accessory_scores = np.full(len(ACCESSORIES), -1.0)
        for _, s, a, _, _, value in readings:
            shape_scores[SHAPES.index(s)] = max(shape_scores[SHAPES.index(s)], value)
            if s == shape:
                accessory_scores[ACCESSORIES.index(a)] = max(accessory_scores[ACCESSORIES.index(a)], value)
        fit = _Fit(shape, score, *(float(v) for v in pose))
        return (score, fit, accessory, softmax(shape_scores, self.config.sharpness),
                softmax(accessory_scores, self.config.sharpness))

    def _fit_character(self, picture: _Picture, colour: int, available: np.ndarray) -> Optional[tuple]:
        """Read the character whose body has colour ``colour``: (character, attribute probabilities, fit,
        pose, mask of the pixels it explains), or None when the colour blob is not a character."""
        crop = self._crop(picture, colour, available)
        if crop is None:
            return None
        fits = self._read_silhouette(crop)
        if fits[0].iou < self.config.min_fit:
            return None
        score, fit, accessory, shape_probs, accessory_probs = self._read_shape_and_accessory(crop, fits)
        y0, y1, x0, x1 = crop.bounds
        if accessory != "none":
            angle_options = [fit.angle]  # the accessory fixes the orientation
        elif shape_symmetry(fit.shape) == 0:
            angle_options = [float(a) for a in np.arange(0.0, 180.0, 15.0)]
        else:
            angle_options = self._orientations(fit, 15.0)
        pattern, pattern_probs = self._fit_pattern(fit, accessory, angle_options, crop.body,
                                                   picture.value[y0:y1, x0:x1].ravel(), crop.px, crop.py)
        # Colour: the share of the body's classified pixels (accessory colour aside) that have the body colour.
        pose = (fit.x, fit.y, fit.scale, fit.angle)
        rendered = self._lookup(self._body[fit.shape], *([v] for v in pose), crop.px, crop.py)[0]
        inside = picture.classes[y0:y1, x0:x1].ravel()[rendered]
        inside = inside[(inside >= 0) & (inside != self._complement[colour])]
        colour_prob = float((inside == colour).mean()) if inside.size else 0.0
        scores = {"shape": float(shape_probs.max()), "colour": colour_prob, "pattern": float(pattern_probs.max()),
                  "accessory": float(accessory_probs.max())}
        character = Character(shape=fit.shape, colour=_COLOUR_NAMES[colour], pattern=pattern, accessory=accessory)
        # What this character explains (grown by two pixels): colour blobs there later are its fringes.
        explained = rendered | crop.body | crop.accessory
        if accessory != "none":
            explained |= self._lookup(self._accessory[(fit.shape, accessory)], *([v] for v in pose), crop.px,
                                      crop.py)[0]
        explained = explained.reshape(y1 - y0, x1 - x0)
        for _ in range(2):
            grown = explained.copy()
            grown[1:] |= explained[:-1]
            grown[:-1] |= explained[1:]
            grown[:, 1:] |= explained[:, :-1]
            grown[:, :-1] |= explained[:, 1:]
            explained = grown
        mask = np.zeros_like(available)
        mask[y0:y1, x0:x1] = explained
        return character, scores, score, Pose(fit.x, fit.y, fit.scale, fit.angle % 360.0), mask

    # ------------------------------------------------------------------ public API
    def detect_frame(self, frame) -> list[Detection]:
        """Characters in one frame (uint8 [H, W, 3]), most confident first; empty when there is none."""
        frame = as_frames(frame)
        if frame.shape[0] != 1:
            raise ValueError(f"detect_frame takes one frame, got {frame.shape[0]}; use detect() for a clip")
        picture = self._picture(frame[0])
        available = np.ones(picture.classes.shape, bool)
        counts = np.bincount(picture.classes[picture.classes >= 0].ravel(), minlength=len(COLOURS))
        detections = []
        for colour in np.argsort(-counts, kind="stable"):
            colour = int(colour)
            if counts[colour] < self.config.min_pixels:
                break
            result = self._fit_character(picture, colour, available)
            # A character's accessory can outnumber its body's pixels (a small star with a big hat): when the
            # complementary colour is there too, the reading with the better fit decides which is the body.
            other = int(self._complement[colour])
            if counts[other] >= max(self.config.min_pixels, 0.5 * counts[colour]):
                swapped = self._fit_character(picture, other, available)
                if swapped is not None and (result is None or swapped[2] > result[2]):
                    result = swapped
            if result is None:
                continue
            character, scores, fit, pose, explained = result
            available &= ~explained
            f = picture.factor
            pose = Pose(pose.x * f, pose.y * f, pose.scale * f, pose.angle)
            confidence = fit * min(scores.values())
            detections.append(Detection(character, float(confidence), scores, float(fit), pose, 1))
        detections.sort(key=lambda d: -d.confidence)
        return detections

    def frame_indices(self, num_frames: int) -> list[int]:
        """The frames of a clip that :meth:`detect` analyses (evenly spread, ends included)."""
        count = min(num_frames, self.config.max_frames)
        return sorted({int(round(i)) for i in np.linspace(0, num_frames - 1, count)})

    def detect(self, frames) -> list[Detection]:
        """Characters of a clip (uint8 [N, H, W, 3]), most confident first: the analysed frames vote on each
        attribute, weighted by their confidence. One character per body colour (the world never shows two
        characters of one colour together)."""
        frames = as_frames(frames)
        indices = self.frame_indices(frames.shape[0])
        by_colour: dict[str, list[Detection]] = {}
        for i in indices:
            for detection in self.detect_frame(frames[i]):
                by_colour.setdefault(detection.character.colour, []).append(detection)
        results = []
        for seen in by_colour.values():
            weights = np.array([max(d.confidence, 1e-6) for d in seen])
            values, scores = {}, {}
            for attribute in ATTRIBUTES:
                tally: dict[str, float] = {}
                for d, w in zip(seen, weights):
                    value = getattr(d.character, attribute)
                    tally[value] = tally.get(value, 0.0) + float(w)
                winner = max(tally, key=tally.get)
                values[attribute] = winner
                scores[attribute] = tally[winner] / float(weights.sum())
            character = Character(**values)
            agreeing = sum(d.confidence for d in seen if d.character == character)
            results.append(Detection(character, float(agreeing / len(indices)), scores,
                                     float(np.mean([d.fit for d in seen])), seen[0].pose, len(seen)))
        results.sort(key=lambda d: -d.confidence)
        return results

    def identify(self, frames) -> Optional[Detection]:
        """The most prominent character of a clip (or a frame), or None."""
        detections = self.detect(frames)
        return detections[0] if detections else None

    def same_character(self, frames_a, frames_b) -> CharacterMatch:
        """Whether two shots show the same character (their most prominent ones)."""
        return _match(self.identify(frames_a), self.identify(frames_b))

    def identity_consistency(self, shot_frames_list: Sequence, expected_identities: Sequence) -> float:
        """Share of shots whose detected identity is the expected one.

        ``expected_identities[i]`` is a character (Character, key or dict), or a list of them for a shot that
        shows several: the shot then matches when its most prominent detections are exactly those.
        """
        shots = list(shot_frames_list)
        expected = list(expected_identities)
        if len(shots) != len(expected):
            raise ValueError(f"got {len(shots)} shots but {len(expected)} expected identities")
        if not shots:
            raise ValueError("identity_consistency needs at least one shot")
        hits = 0
        for frames, want in zip(shots, expected):
            wanted = [as_character(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
            found = [d.character.key for d in self.detect(frames)[:len(wanted)]]
            hits += sorted(found) == sorted(c.key for c in wanted)
        return hits / len(shots)

    def agreement_matrix(self, shot_frames_list: Sequence) -> np.ndarray:
        """[n, n] share of equal attributes between the most prominent characters of every pair of shots
        (0 where a shot has no detection; 1 on the diagonal where it has one)."""
        found = [self.identify(frames) for frames in shot_frames_list]
        n = len(found)
        matrix = np.zeros((n, n), np.float32)
        for i in range(n):
            for j in range(n):
                matrix[i, j] = _match(found[i], found[j]).agreement
        return matrix


def _match(a: Optional[Detection], b: Optional[Detection]) -> CharacterMatch:
    if a is None or b is None:
        return CharacterMatch(False, 0.0, 0.0, a, b)
    equal = [getattr(a.character, k) == getattr(b.character, k) for k in ATTRIBUTES]
    return CharacterMatch(all(equal), sum(equal) / len(equal), min(a.confidence, b.confidence), a, b)


def detect_identity(frames, detector: Optional[IdentityDetector] = None) -> Optional[Detection]:
    """The most prominent character of a clip or frame (see :meth:`IdentityDetector.identify`)."""
    return (detector or IdentityDetector()).identify(frames)


def identity_consistency(shot_frames_list: Sequence, expected_identities: Sequence,
                         detector: Optional[IdentityDetector] = None) -> float:
    """Share of shots whose detected identity matches the expected one (see
    :meth:`IdentityDetector.identity_consistency`)."""
    return (detector or IdentityDetector()).identity_consistency(shot_frames_list, expected_identities)


def same_character(frames_a, frames_b, detector: Optional[IdentityDetector] = None) -> CharacterMatch:
    """Whether the characters of two shots are the same (see :meth:`IdentityDetector.same_character`)."""
    return (detector or IdentityDetector()).same_character(frames_a, frames_b)
