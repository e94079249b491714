"""Keyframe selection: the frames of a finished shot that go into the memory bank, picked as the StoryMem
release picks them.

The release's algorithm, step by step, on a shot's N frames:

1. Resize the frames with Qwen's `smart_resize` (area <= 256*28*28 and >= 48*28*28, sides multiples of 28;
   bilinear, antialiased). The resized frames are what gets scored and compared.
2. First keyframe: the first frame, from frame 0 on, whose aesthetic score (HPSv3) is >= 3.0; none -> no
   keyframes at all.
3. For i = 2 .. N-1 (the release skips frame 1): sim = cos(emb(last keyframe), emb(frame i)); when
   sim < threshold and score(frame i) >= 3.0, frame i becomes a keyframe and the new last keyframe.
4. Adaptive threshold: start at 0.9; while there are more than 3 keyframes, lower it by 0.01 and redo 2-3.
5. Drop every keyframe whose embedding (of the full-size frame) has cosine > 0.9 with any keyframe already
   in the story's memory (the whole history, not only the current window).

The release re-encodes both frames of every comparison, re-scores frames on every pass, and reloads HPSv3 for
every shot. `KeyframeSelector` picks the same frames with each frame embedded once (batched) and scored at
most once (lazily, cached across the adaptive passes):

* Embeddings: all N resized frames in `ceil(N / batch_size)` embedder calls up front (every pass compares
  against them, so all are needed), plus one call for the <= max_keyframes full-size keyframes (step 5, and
  the embeddings handed to the memory bank) and one for memory frames given as images.
* Scores, the expensive part, are only computed for frames the algorithm actually asks about, in the order it
  asks. With `score_batch_size=1` (default) every scorer call holds exactly one frame and the set of scored
  frames equals the set the release scores. With `score_batch_size=B > 1` a call for frame i also scores up to
  B-1 further frames the scan would ask about next if frame i fails the bar (the next frames of the first-
  keyframe search, or the next frames below the threshold against the current last keyframe): fewer, fuller
  calls, at the price of occasionally scoring a frame the release would not have.

Two details are defined here and documented as such: a frame is never compared with itself (the release
compares the first keyframe with itself when it lies at index >= 2, which can only matter for a threshold
above ~1.0), and with `skip_second_frame=False` the scan of step 3 starts at frame 1 instead of 2. Frames
before the first keyframe are never picked in step 3 (they all failed the aesthetic bar), so the scan
effectively starts right after the first keyframe either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..images import uint8_images, uint8_video
from .images import resize_for_scoring
from .scorers import check_scores


@dataclass
class KeyframeStats:
    """What one `KeyframeSelector.extract` call cost."""

    frames: int = 0
    embed_calls: int = 0  # calls to embedder.embed
    embedded_images: int = 0
    embed_forwards: int = 0  # model forwards, when the embedder counts them (else = embed_calls)
    score_calls: int = 0  # calls to scorer.score
    scored_frames: int = 0
    passes: int = 0  # scans of step 3 (1 + number of threshold decrements)
    threshold: float = float("nan")  # the similarity threshold the final pass used


@dataclass
class KeyframeSelection:
    """Result of `KeyframeSelector.extract`."""

    indices: list[int]  # keyframes kept after the memory dedup, in frame order
    candidates: list[int]  # keyframes before the memory dedup
    embeddings: torch.Tensor  # [len(indices), D], embeddings of the kept full-size frames (for the bank)
    scores: dict[int, float]  # every aesthetic score computed, by frame index
    threshold: float
    stats: KeyframeStats = field(default_factory=KeyframeStats)


class KeyframeSelector:
    """Select a shot's keyframes exactly as the StoryMem release does, with far less model work.

    Args:
        embedder: frames -> L2-normalised embeddings (`OpenCLIPEmbedder` = the release's CLIP ViT-B/32).
            Default: `OpenCLIPEmbedder()` (loaded on first use).
        scorer: aesthetic scorer (`HPSv3Scorer` in the release; `NullScorer` to skip the aesthetic filter).
            Default: `HPSv3Scorer()` (loaded on first use).
        threshold: initial similarity threshold (0.9).
        threshold_step: how much the threshold drops per adaptive pass (0.01).
        max_keyframes: at most this many keyframes per shot before the memory dedup (3).
        aesthetic_threshold: minimum aesthetic score of a keyframe (3.0).
        dedup_threshold: a keyframe is dropped when its cosine with a memory keyframe exceeds this (0.9).
        skip_second_frame: skip frame 1 in the similarity scan, as the release does.
        batch_size: frames per embedder call.
        score_batch_size: frames per scorer call (see the module doc; 1 = only what the release scores).
    """

    def __init__(
        self,
        embedder: Any = None,
        scorer: Any = None,
        threshold: float = 0.9,
        threshold_step: float = 0.01,
        max_keyframes: int = 3,
        aesthetic_threshold: float = 3.0,
        dedup_threshold: float = 0.9,
        skip_second_frame: bool = True,
        batch_size: int = 32,
        score_batch_size: int = 1,
    ):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
        if not (math.isfinite(threshold_step) and threshold_step > 0):
            raise ValueError(f"threshold_step must be > 0 (the adaptive loop must end), got {threshold_step}")
        if max_keyframes < 1:
            raise ValueError(f"max_keyframes must be >= 1, got {max_keyframes}")
        if not math.isfinite(aesthetic_threshold):
            raise ValueError(f"aesthetic_threshold must be finite, got {aesthetic_threshold}")
        if not -1.0 <= dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold must be a cosine similarity in [-1, 1], got {dedup_threshold}")
        if batch_size < 1 or score_batch_size < 1:
            raise ValueError(
                f"batch sizes must be >= 1, got batch_size={batch_size}, score_batch_size={score_batch_size}"
            )
        if embedder is None:
            from .embedders import OpenCLIPEmbedder

            embedder = OpenCLIPEmbedder()
        if scorer is None:
            from .hpsv3 import HPSv3Scorer

            scorer = HPSv3Scorer()
        self.embedder = embedder
        self.scorer = scorer
        self.threshold = float(threshold)
        self.threshold_step = float(threshold_step)
        self.max_keyframes = int(max_keyframes)
        self.aesthetic_threshold = float(aesthetic_threshold)
        self.dedup_threshold = float(dedup_threshold)
        self.skip_second_frame = bool(skip_second_frame)
        self.batch_size = int(batch_size)
        self.score_batch_size = int(score_batch_size)
        self.last_stats = KeyframeStats()

    # ------------------------------------------------------------------------------------------ public

    def select(self, frames: Any, memory: Any = ()) -> list[int]:
        """Indices of the new keyframes of `frames` (uint8 [N, H, W, 3] RGB, or a list of same-sized RGB
        images), after dropping those already in `memory` (the story's remembered keyframes as images, or
        their embeddings as a float tensor [M, D] computed by the same embedder on the full-size frames)."""
        return self.extract(frames, memory).indices

    def extract(self, frames: Any, memory: Any = ()) -> KeyframeSelection:
        """Like `select`, with the embeddings of the kept keyframes, the scores and the costs."""
        video = uint8_video(frames)
        memory = _check_memory(memory)
        self.last_stats = stats = KeyframeStats(frames=len(video))
        forwards_before = getattr(self.embedder, "num_forwards", None)

        resized = resize_for_scoring(video)
        emb = self._embed(resized, stats, "frames")
        state = _ScanState(emb, resized)

        first = self._first_keyframe(state, stats)
        threshold = self.threshold
        candidates: list[int] = []
        if first is not None:
            while True:
                stats.passes += 1
                candidates = self._scan(state, first, threshold, stats)
                if len(candidates) <= self.max_keyframes:
                    break
                threshold -= self.threshold_step  # repeated subtraction, as the release (same float values)
        stats.threshold = threshold

        kept: list[int] = []
        kept_emb = torch.zeros(0, emb.shape[1])
        if candidates:
            full = self._embed(video[candidates], stats, "keyframes")
            keep = [True] * len(candidates)
            if memory is not None and len(memory) > 0:
                mem = memory if isinstance(memory, torch.Tensor) else self._embed(memory, stats, "memory")
                if mem.shape[1] != full.shape[1]:
                    raise ValueError(
                        f"memory embeddings have {mem.shape[1]} dims but the embedder gives {full.shape[1]}"
                    )
                mem = F.normalize(mem.float(), dim=-1)
                for j in range(len(candidates)):
                    sims = (F.normalize(full[j : j + 1], dim=-1) * mem).sum(dim=-1)
                    keep[j] = not bool((sims > self.dedup_threshold).any())
            kept = [c for c, k in zip(candidates, keep) if k]
            kept_emb = full[[j for j, k in enumerate(keep) if k]]

        if forwards_before is not None:
            stats.embed_forwards = self.embedder.num_forwards - forwards_before
        else:
            stats.embed_forwards = stats.embed_calls
        return KeyframeSelection(
            indices=kept, candidates=candidates, embeddings=kept_emb, scores=dict(state.scores),
            threshold=threshold, stats=stats,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ steps

    def _embed(self, images: Any, stats: KeyframeStats, what: str) -> torch.Tensor:
        images = images if isinstance(images, np.ndarray) else uint8_images(images, what)
        rows = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out = self.embedder.embed(chunk)
            stats.embed_calls += 1
            stats.embedded_images += len(chunk)
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(chunk):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"embedder returned {shape} for {len(chunk)} {what}; expected [N, D]")
            out = out.detach().float().cpu()
            if not torch.isfinite(out).all():
                raise ValueError(f"embedder returned non-finite embeddings for {what}")
            rows.append(out)
        return torch.cat(rows)

    def _score(self, state: "_ScanState", indices: Sequence[int], stats: KeyframeStats) -> None:
        images = [state.resized[i] for i in indices]
        scores = check_scores(self.scorer.score(images, None), len(images), "scorer")
        stats.score_calls += 1
        stats.scored_frames += len(images)
        for i, value in zip(indices, scores):
            state.scores[i] = value

    def _passes(self, state: "_ScanState", i: int, lookahead: Sequence[int], stats: KeyframeStats) -> bool:
        """Whether frame i reaches the aesthetic bar, scoring it (and `lookahead`) if not done yet."""
        if i not in state.scores:
            extra = [j for j in lookahead if j not in state.scores][: self.score_batch_size - 1]
            self._score(state, [i, *extra], stats)
        return state.scores[i] >= self.aesthetic_threshold

    def _first_keyframe(self, state: "_ScanState", stats: KeyframeStats) -> int | None:
        n = len(state.resized)
        for m in range(n):
            if self._passes(state, m, range(m + 1, n), stats):
                return m
        return None

    def _scan(self, state: "_ScanState", first: int, threshold: float, stats: KeyframeStats) -> list[int]:
        n = len(state.resized)
        start = 2 if self.skip_second_frame else 1
        picks, last = [first], first
        for i in range(max(start, first + 1), n):
            sims = state.similarities(last)
            if sims[i] < threshold:
                lookahead = [j for j in range(i + 1, n) if sims[j] < threshold] if self.score_batch_size > 1 else ()
                if self._passes(state, i, lookahead, stats):
                    picks.append(i)
                    last = i
        return picks


class _ScanState:
    """Per-shot caches: resized frames, their embeddings, scores, and similarity rows by keyframe."""

    def __init__(self, emb: torch.Tensor, resized: np.ndarray):
        self.emb = F.normalize(emb, dim=-1)
        self.resized = resized
        self.scores: dict[int, float] = {}
        self._rows: dict[int, list[float]] = {}

    def similarities(self, anchor: int) -> list[float]:
        """Cosine of frame `anchor` with every frame (computed as the release does: elementwise product, sum)."""
        row = self._rows.get(anchor)
        if row is None:
            row = (self.emb[anchor : anchor + 1] * self.emb).sum(dim=-1).tolist()
            self._rows[anchor] = row
        return row


def _check_memory(memory: Any):
    """Validate `memory` up front: None/empty, images, or a float embedding tensor [M, D]."""
    if memory is None:
        return None
    if isinstance(memory, torch.Tensor) and memory.is_floating_point() and memory.ndim == 2:
        if not torch.isfinite(memory).all():
            raise ValueError("memory embeddings contain non-finite values")
        return memory.detach().float().cpu()
    if isinstance(memory, (list, tuple)) and len(memory) == 0:
        return None
    return uint8_images(memory, "memory")
