"""Training clips from a folder of videos: discovery, captions, shot splitting, and frame preparation.

Captions come from a sidecar text file next to each video (``clip.mp4`` + ``clip.txt``; a subject mask, if any,
is the sidecar video ``clip.mask.mp4``) or from a JSONL manifest, one object per line::

    {"file": "clips/a.mp4", "caption": "a red circle walks into the desert"}
    {"file": "long.mp4", "caption": "...", "start": 3.0, "end": 8.5, "group": "episode-1"}

``file`` is relative to the manifest's folder (or absolute); ``start``/``end`` (seconds) cut one clip out of a
longer video; ``group`` (optional, on every entry or none) fixes the clusters instead of embedding similarity;
``mask`` (optional, on every entry or none) is a video of the same frames, white where the subject is (a
segmenter's output), which ``train_lora.py train --subject-loss-weight`` uses to weight the loss.

A clip becomes a training sample of ``num_frames`` frames at ``fps``: the source is resampled in time to
``fps`` (nearest earlier frame), a window of ``num_frames`` frames is taken (centred by default), and every
frame is resized to cover ``height x width`` (aspect kept, antialiased bilinear) and centre-cropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

__all__ = [
    "VIDEO_EXTENSIONS",
    "ClipSource",
    "Skipped",
    "clip_name",
    "discover_sources",
    "detect_shots",
    "resample_indices",
    "resize_and_crop",
    "select_window",
    "mask_latent_cells",
    "memory_candidate_positions",
    "read_clip",
]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
MASK_SUFFIX = ".mask"  # folder mode: ``clip.mask.mp4`` is the subject mask of ``clip.mp4``, not a clip


@dataclass
class ClipSource:
    """One video (or a time range of one) and its caption."""

    path: Path
    caption: Optional[str]
    start: Optional[float] = None
    end: Optional[float] = None
    group: Optional[str] = None
    where: str = ""  # where it was listed (manifest line), for messages
    mask: Optional[Path] = None  # subject mask video (white = subject), frame for frame with ``path``

    @property
    def name(self) -> str:
        return clip_name(self.path, self.start, self.end)


def clip_name(path: Path, start: Optional[float] = None, end: Optional[float] = None) -> str:
    """How messages name a video or a time range of one: ``clip.mp4`` or ``clip.mp4[1.00s-3.50s]``."""
    if start is None and end is None:
        return str(path)
    return f"{path}[{start or 0:.2f}s-{'end' if end is None else f'{end:.2f}s'}]"


@dataclass
class Skipped:
    """A source or clip left out of the dataset, and why (``reason`` is one of a few fixed labels)."""

    source: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"source": self.source, "reason": self.reason, "detail": self.detail}


def _read_caption(path: Path) -> Optional[str]:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _manifest_sources(manifest: Path) -> list[ClipSource]:
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest not found")
    sources = []
    with open(manifest, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{manifest}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise DataError(f"{where}: expected a JSON object with 'file' and 'caption'")
            if not isinstance(entry.get("file"), str) or not entry["file"]:
                raise DataError(f"{where}: field 'file' is missing or not a string")
            caption = entry.get("caption")
            if caption is not None and not isinstance(caption, str):
                raise DataError(f"{where}: field 'caption' must be a string")
            times = {}
            for key in ("start", "end"):
                value = entry.get(key)
                if value is not None and (not isinstance(value, (int, float)) or value < 0):
                    raise DataError(f"{where}: field '{key}' must be a non-negative number of seconds")
                times[key] = None if value is None else float(value)
            if times["start"] is not None and times["end"] is not None and times["end"] <= times["start"]:
                raise DataError(f"{where}: 'end' ({times['end']}) must be after 'start' ({times['start']})")
            group = entry.get("group")
            if group is not None and not isinstance(group, (str, int)):
                raise DataError(f"{where}: field 'group' must be a string or an integer")
            mask = entry.get("mask")
            if mask is not None and (not isinstance(mask, str) or not mask):
                raise DataError(f"{where}: field 'mask' must be the path of a mask video")
            path = Path(entry["file"])
            path = path if path.is_absolute() else manifest.parent / path
            if mask is not None:
                mask = Path(mask) if Path(mask).is_absolute() else manifest.parent / mask
            sources.append(ClipSource(path=path, caption=(caption or "").strip() or None, start=times["start"],
                                      end=times["end"], group=None if group is None else str(group), where=where,
                                      mask=mask))
    for key in ("group", "mask"):
        if len({getattr(s, key) is None for s in sources}) > 1:
            raise DataError(f"{manifest}: '{key}' must be given on every entry or on none")
    return sources


def discover_sources(clips_dir=None, manifest=None, caption_ext: str = ".txt") -> list[ClipSource]:
    """List the videos to prepare.

    With a ``manifest`` (JSONL), its entries; otherwise every video under ``clips_dir`` (recursively, sorted)
    with the caption read from the sidecar ``<stem><caption_ext>`` and the subject mask from the sidecar video
    ``<stem>.mask.<ext>`` (any video extension), on every clip or on none. A missing caption is kept as ``None``
    (the preparation skips and counts it); a malformed manifest, or masks on some clips only, raises
    :class:`DataError` naming the line or the clip.
    """
    if manifest is not None:
        return _manifest_sources(Path(manifest))
    if clips_dir is None:
        raise DataError("give a folder of clips or a manifest")
    clips_dir = Path(clips_dir)
    if not clips_dir.is_dir():
        raise DataError(f"{clips_dir}: clips folder not found")
    found = sorted(p for p in clips_dir.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                   and not p.name.startswith("."))
    masks = {p.with_suffix("").with_suffix(""): p for p in found if p.stem.endswith(MASK_SUFFIX)}
    videos = [p for p in found if not p.stem.endswith(MASK_SUFFIX)]
    sources = [ClipSource(path=p, caption=_read_caption(p.with_suffix(caption_ext)), where=str(p),
                          mask=masks.get(p.with_suffix(""))) for p in videos]
    with_mask = [s for s in sources if s.mask is not None]
    if with_mask and len(with_mask) < len(sources):
        lacking = next(s for s in sources if s.mask is None)
        raise DataError(f"{clips_dir}: {len(with_mask)} of {len(sources)} clips have a mask video "
                        f"(<name>{MASK_SUFFIX}.mp4); give one for every clip or none, e.g. for {lacking.path}")
    return sources


# ---------------------------------------------------------------------------------------------- shots
def detect_shots(path: Path, threshold: float = 27.0, min_seconds: float = 1.0) -> list[tuple[float, float]]:
    """Shot boundaries of a video, ``[(start_s, end_s), ...]``, with PySceneDetect's content detector.

    An empty list means no cut was found (the whole video is one shot).
    """
    try:
        from scenedetect import ContentDetector, detect
    except ImportError:
        raise ImportError("shot splitting needs PySceneDetect: pip install scenedetect[opencv]") from None
    scenes = detect(str(path), ContentDetector(threshold=threshold))
    shots = [(start.get_seconds(), end.get_seconds()) for start, end in scenes]
    return [(a, b) for a, b in shots if b - a >= min_seconds]


# ---------------------------------------------------------------------------------------------- frames
def resample_indices(num_source_frames: int, source_fps: float, target_fps: float,
                     start: Optional[float] = None, end: Optional[float] = None) -> list[int]:
    """Source frame indices at ``target_fps`` timestamps within ``[start, end)`` seconds (nearest earlier frame).

    An unknown source rate (``<= 0``) is taken as ``target_fps`` (every frame kept).
    """
    if source_fps <= 0:
        source_fps = target_fps
    t0 = start or 0.0
    duration = num_source_frames / source_fps
    t1 = duration if end is None else min(end, duration)
    indices = []
    k = 0
    while True:
        t = t0 + k / target_fps
        if t >= t1 - 1e-9:
            break
        index = int(math.floor(t * source_fps + 1e-6))
        if index >= num_source_frames:
            break
        indices.append(index)
        k += 1
    return indices


def select_window(length: int, num_frames: int, mode: str = "center") -> Optional[int]:
    """Start of a ``num_frames`` window in a sequence of ``length`` frames, or ``None`` if it is too short."""
    if length < num_frames:
        return None
    if mode == "start":
        return 0
    if mode == "center":
        return (length - num_frames) // 2
    raise ValueError(f"window must be 'center' or 'start', got {mode!r}")


def resize_and_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[N, h, w, 3]`` -> uint8 ``[N, height, width, 3]``: scale to cover (aspect kept), centre crop."""
    n, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return np.ascontiguousarray(frames)
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    for start in range(0, n, 16):  # bounded memory for long clips
        chunk = torch.from_numpy(frames[start:start + 16]).permute(0, 3, 1, 2).float()
        chunk = F.interpolate(chunk, size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=new_h < h or new_w < w)
        chunk = chunk[:, :, top:top + height, left:left + width].round().clamp(0, 255).to(torch.uint8)
        out[start:start + 16] = chunk.permute(0, 2, 3, 1).numpy()
    return out


def mask_latent_cells(mask: torch.Tensor, temporal_scale: int = 4, spatial_scale: int = 8) -> torch.Tensor:
    """Which latent cells a pixel mask touches: ``mask`` ``[..., T, H, W]`` (T = 4n+1, nonzero = subject) ->
    float 0/1 ``[..., f, H/s, W/s]``. Latent frame 0 encodes pixel frame 0 and frame k the frames
    ``4k-3 .. 4k`` (the causal VAE), so a cell is 1 if any of its pixels, in any frame it encodes, is set."""
    cells = (mask != 0).float()
    lead = cells.shape[:-3]
    cells = cells.reshape(-1, *cells.shape[-3:])
    first, rest = cells[:, :1], cells[:, 1:]
    if rest.shape[1] % temporal_scale:
        raise ValueError(f"a mask of {cells.shape[1]} frames is not {temporal_scale}n+1 frames long")
    if rest.shape[1]:
        rest = rest.unflatten(1, (-1, temporal_scale)).amax(dim=2)
    cells = F.max_pool2d(torch.cat([first, rest], dim=1), kernel_size=spatial_scale)
    return cells.reshape(*lead, *cells.shape[1:])


def memory_candidate_positions(num_frames: int, count: int) -> list[int]:
    """``count`` evenly spread frame positions of a clip (centres of equal parts), used as memory images."""
    if count < 1:
        raise ValueError(f"need at least one memory candidate per clip, got {count}")
    positions = [min(num_frames - 1, int((i + 0.5) * num_frames / count)) for i in range(count)]
    return sorted(set(positions))


def read_clip(path: Path, start: Optional[float] = None, end: Optional[float] = None) -> tuple[np.ndarray, float]:
    """Decode a clip source: a video, or only its ``[start, end)`` seconds, with :func:`storymem.video.read_video`
    (ffmpeg seeks, so a shot of a long video does not decode the whole file). Returns ``(uint8 [N, H, W, 3],
    fps)``; raises :class:`storymem.video.VideoError`."""
    from ..video import read_video

    return read_video(path, start, end)
