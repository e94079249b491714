"""Preparing a training set: clips -> clusters -> cached latents and text embeddings (safetensors shards).

Training never runs the VAE or the text encoder. ``prepare_dataset`` encodes everything once, with the same
functions inference uses:

* the target clip: ``num_frames`` frames VAE-encoded as one video (posterior mode, normalised);
* memory candidates: a few frames of each clip, each encoded on its own as a one-frame video with
  :func:`storymem.conditioning.encode_memory_frames` after the pipeline's own memory-image preprocessing;
* video conditions: the clip's first frame (MI2V) and first five frames (MM2V) through
  :meth:`StoryMemPipeline.prepare_memory_condition` (so :func:`encode_video_condition` with Wan I2V's
  preprocessing), and the all-zeros M2V condition once per dataset (one resolution per dataset);
* the caption through the pipeline's ``encode_prompt`` (stored without its zero padding).

Layout of a prepared folder::

    index.json                 sizes, base, clips (caption, source, cluster, shard), clusters, skipped items
    shared.safetensors         "m2v": M2V video condition [16, f, h, w]; "empty_text": embedding of ""
    shards/shard-00000.safetensors
                               per clip id c: "c.latents" [16, f, h, w], "c.memory" [16, K, h, w],
                               "c.mi2v" / "c.mm2v" [16, f, h, w], "c.text" [n_tokens, text_dim],
                               "c.subject" [f, h, w] (1 where the clip's subject mask touches a latent
                               cell; only when the manifest gives masks)

Preparation reads every source once to check and embed it (skipping, with a reason, clips that are too
short, lack a caption, cannot be decoded, have a mask that does not match them, or end up alone in their
cluster) before any VAE work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..atomic import atomic_write, atomic_write_json
from .clustering import cluster_embeddings, clusters_from_groups
from .errors import DataError
from .sources import (
    ClipSource,
    Skipped,
    check_sizes,
    detect_shots,
    discover_sources,
    mask_latent_cells,
    memory_candidate_positions,
    read_clip,
    resample_indices,
    resize_and_crop,
    select_window,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "CONTEXT_KINDS",
    "PrepareConfig",
    "PrepareSummary",
    "PreparedDataset",
    "prepare_dataset",
]

CACHE_FORMAT = "storymem-train-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
SHARED_NAME = "shared.safetensors"
# Cached video conditions, by name, and the number of leading frames each conditions on.
CONTEXT_KINDS = {"mi2v": 1, "mm2v": 5}
EMBED_BATCH_CLIPS = 64  # clips whose memory candidates are embedded in one call while scanning
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PrepareConfig:
    """What :func:`prepare_dataset` builds. Sizes must match what the adapter will be trained and used at."""

    output_dir: Path
    clips_dir: Optional[Path] = None
    manifest: Optional[Path] = None
    base: str = "toy"
    caption_ext: str = ".txt"
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: float = 16.0
    window: str = "center"
    memory_candidates: int = 4
    cluster_size: int = 16
    max_cluster_size: Optional[int] = None
    embedder: str = "clip"  # "clip" (open_clip) or "pixel"
    clip_model: str = "ViT-B-32"
    clip_pretrained: Optional[str] = "openai"
    split_shots: bool = False
    shot_threshold: float = 27.0
    min_shot_seconds: float = 1.0
    contexts: Sequence[str] = ("mi2v",)
    cache_dtype: str = "bfloat16"
    shard_size: int = 32
    max_sequence_length: int = 512
    device: Optional[str] = None
    seed: int = 0
    overwrite: bool = False
    decode_workers: int = 4  # threads decoding videos (each an ffmpeg process)
    encode_batch_size: int = 1  # clips per VAE / text-encoder call (raise it for small sizes)

    def validate(self):
        check_sizes(self.height, self.width, self.num_frames)
        if self.clips_dir is None and self.manifest is None:
            raise DataError("give a clips folder or a manifest")
        if self.fps <= 0:
            raise DataError(f"fps must be > 0, got {self.fps}")
        if self.memory_candidates < 1:
            raise DataError(f"memory_candidates must be >= 1, got {self.memory_candidates}")
        if self.cluster_size < 2:
            raise DataError(f"cluster_size must be >= 2 (memory comes from other clips), got {self.cluster_size}")
        unknown = [c for c in self.contexts if c not in CONTEXT_KINDS]
        if unknown:
            raise DataError(f"unknown contexts {unknown}; expected a subset of {sorted(CONTEXT_KINDS)}")
        for c in self.contexts:
            if CONTEXT_KINDS[c] >= self.num_frames:
                raise DataError(f"context {c!r} needs more than {CONTEXT_KINDS[c]} frames, got {self.num_frames}")
        if self.cache_dtype not in DTYPES:
            raise DataError(f"cache_dtype must be one of {sorted(DTYPES)}, got {self.cache_dtype!r}")
        if self.encode_batch_size < 1:
            raise DataError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
        if self.decode_workers < 1:
            raise DataError(f"decode_workers must be >= 1, got {self.decode_workers}")
        if self.shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.embedder not in ("clip", "pixel"):
            raise DataError(f"embedder must be 'clip' or 'pixel', got {self.embedder!r}")
        if self.window not in ("center", "start"):
            raise DataError(f"window must be 'center' or 'start', got {self.window!r}")


@dataclass
class PrepareSummary:
    output_dir: Path
    num_sources: int
    num_clips: int
    num_clusters: int
    num_shards: int
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    scan_seconds: float = 0.0  # pass 1: decode, check and embed every source
    encode_seconds: float = 0.0  # pass 2: decode again and encode with the VAE and text encoder

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def format(self) -> str:
        lines = [f"prepared {self.output_dir}: {self.num_clips} clips in {self.num_clusters} clusters "
                 f"({self.num_shards} shards) from {self.num_sources} sources in {self.seconds:.1f}s "
                 f"(scan {self.scan_seconds:.1f}s, encode {self.encode_seconds:.1f}s)"]
        counts = self.skipped_counts()
        if counts:
            lines.append(f"skipped {len(self.skipped)}: " + ", ".join(f"{n} {r}" for r, n in sorted(counts.items())))
            for s in self.skipped[:20]:
                lines.append(f"  {s.reason}: {s.source}" + (f" ({s.detail})" if s.detail else ""))
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more (see index.json)")
        return "\n".join(lines)


@dataclass
class _Clip:
    source: ClipSource
    start: Optional[float]
    end: Optional[float]
    frame_indices: list[int]  # frames of the training window, counted from ``start``
    embedding: Optional[torch.Tensor] = None

    @property
    def name(self) -> str:
        if self.start is None and self.end is None:
            return self.source.name
        end = "end" if self.end is None else f"{self.end:.2f}s"
        return f"{self.source.path}[{self.start or 0:.2f}s-{end}]"


# ---------------------------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_safetensors(path: Path, tensors: dict, metadata: Optional[dict] = None) -> str:
    """Write tensors atomically; return the file's sha256."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return _sha256(path)


def _make_embedder(config: PrepareConfig):
    if config.embedder == "pixel":
        from ..memory import PixelEmbedder

        return PixelEmbedder()
    from ..memory import OpenCLIPEmbedder

    return OpenCLIPEmbedder(config.clip_model, pretrained=config.clip_pretrained, device=config.device)


def _embedder_name(config: PrepareConfig, embedder) -> str:
    if config.embedder == "clip":
        return f"open_clip:{config.clip_model}/{config.clip_pretrained}"
    return repr(embedder)


def _segments(source: ClipSource, config: PrepareConfig) -> list[tuple[Optional[float], Optional[float]]]:
    if source.start is not None or source.end is not None:
        return [(source.start, source.end)]
    if config.split_shots:
        shots = detect_shots(source.path, config.shot_threshold, config.min_shot_seconds)
        if shots:
            return shots
    return [(None, None)]


def _clip_key(clip: _Clip) -> tuple:
    return (clip.source.path, clip.start, clip.end)


def _ordered_map(fn, items: Sequence, workers: int, ahead: int = 2) -> Iterator:
    """``map(fn, items)`` computed by ``workers`` threads, in order, at most ``ahead x workers`` results held
    (decoded videos are large)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _scan_source(source: ClipSource, config: PrepareConfig,
                 positions: Sequence[int]) -> tuple[list[tuple[_Clip, np.ndarray]], list[Skipped]]:
    """The usable clips of one source with their memory-candidate frames (resized), and what was skipped."""
    if source.caption is None:
        return [], [Skipped(source.name, "missing caption")]
    if not source.path.is_file():
        return [], [Skipped(source.name, "missing file", source.where)]
    try:
        segments = _segments(source, config)
    except (ValueError, OSError, RuntimeError) as e:
        return [], [Skipped(source.name, "unreadable", str(e).splitlines()[0] if str(e) else type(e).__name__)]
    found, skipped = [], []
    for start, end in segments:
        clip = _Clip(source=source, start=start, end=end, frame_indices=[])
        try:
            video, src_fps = read_clip(source.path, start, end)
        except (ValueError, OSError, RuntimeError) as e:  # VideoError is a ValueError
            skipped.append(Skipped(clip.name, "unreadable", str(e).splitlines()[0] if str(e) else ""))
            continue
        if source.mask is not None:
            problem = _mask_problem(source.mask, start, end, video.shape[:3])
            if problem:
                skipped.append(Skipped(clip.name, "bad mask", problem))
                continue
        indices = resample_indices(len(video), src_fps, config.fps)
        offset = select_window(len(indices), config.num_frames, config.window)
        if offset is None:
            skipped.append(Skipped(clip.name, "too short", f"{len(indices)} frames at {config.fps:g} fps, "
                                                           f"need {config.num_frames}"))
            continue
        clip.frame_indices = indices[offset:offset + config.num_frames]
        found.append((clip, resize_and_crop(video[[clip.frame_indices[p] for p in positions]], config.height,
                                            config.width)))
        del video
    return found, skipped


def _mask_problem(mask: Path, start: Optional[float], end: Optional[float], shape: tuple) -> Optional[str]:
    """Why a subject mask video cannot be used with a clip of ``shape`` (frames, height, width); None if it can."""
    if not mask.is_file():
        return f"{mask}: mask video not found"
    try:
        frames = read_clip(mask, start, end)[0]
    except (ValueError, OSError, RuntimeError) as e:
        return f"{mask}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if len(frames) != shape[0]:
        return f"{mask}: {len(frames)} frames, the video has {shape[0]}"
    if frames.shape[1:3] != tuple(shape[1:3]):
        return f"{mask}: {frames.shape[2]}x{frames.shape[1]} pixels, the video is {shape[2]}x{shape[1]}"
    return None


def _subject_cells(mask_frames: np.ndarray, height: int, width: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """A clip's window of mask frames (uint8 ``[F, H', W', 3]``) -> ``[f, h, w]`` latent cells of the subject."""
    frames = resize_and_crop(mask_frames, height, width)
    _, f, h, w = latent_shape
    pixels = torch.from_numpy(frames.mean(axis=-1) > 127.5)
    return mask_latent_cells(pixels, temporal_scale=(len(frames) - 1) // max(f - 1, 1), spatial_scale=height // h)


def trim_text_embedding(embedding: torch.Tensor) -> torch.Tensor:
    """Drop the zero rows Wan's ``encode_prompt`` pads to ``max_sequence_length`` (restored when loading)."""
    nonzero = embedding.abs().amax(dim=-1) > 0
    length = int(nonzero.nonzero().max()) + 1 if nonzero.any() else 0
    return embedding[:length]


# ---------------------------------------------------------------------------------------------- prepare
def prepare_dataset(config: PrepareConfig, embedder=None, progress: bool = True) -> PrepareSummary:
    """Scan, cluster and encode clips into ``config.output_dir`` (see the module docstring for the layout).

    Args:
        embedder: a frame embedder (``.embed(images) -> [N, D]``); default from ``config.embedder``.
    Raises:
        DataError: bad configuration, a malformed manifest, an existing dataset without ``overwrite``, or
            nothing left to train on.
    """
    from tqdm.auto import tqdm

    t_start = time.time()
    config.validate()
    out = Path(config.output_dir)
    if (out / INDEX_NAME).exists() and not config.overwrite:
        raise DataError(f"{out}: already holds a prepared dataset; pass overwrite=True (--overwrite) to replace it")
    if config.split_shots:
        try:
            import scenedetect  # noqa: F401
        except ImportError:
            raise ImportError("--split-shots needs PySceneDetect: pip install scenedetect[opencv]") from None
    sources = discover_sources(config.clips_dir, config.manifest, config.caption_ext)
    if not sources:
        where = config.manifest or config.clips_dir
        raise DataError(f"{where}: no videos found")
    embedder = embedder if embedder is not None else _make_embedder(config)

    # Pass 1: check every source, cut its clips, embed them. No VAE yet. Videos decode in threads (the decoder
    # is an ffmpeg subprocess); embedding stays here, in source order, so the result does not depend on them.
    # It goes in batches of clips: one call per clip would keep this thread busy with small calls while the
    # decoding threads wait for it, on many cores the slowest part of the pass.
    skipped: list[Skipped] = []
    clips: list[_Clip] = []
    positions = memory_candidate_positions(config.num_frames, config.memory_candidates)
    scanned = _ordered_map(lambda source: _scan_source(source, config, positions), sources, config.decode_workers)
    to_embed: list[tuple[_Clip, np.ndarray]] = []

    def embed_pending():
        embeddings = embedder.embed(np.concatenate([c for _, c in to_embed])).float()
        start = 0
        for clip, candidates in to_embed:
            part = embeddings[start:start + len(candidates)]
            clip.embedding = torch.nn.functional.normalize(part.mean(0), dim=0)
            start += len(candidates)
        to_embed.clear()

    for source_clips, source_skipped in tqdm(scanned, total=len(sources), desc="scanning clips",
                                             disable=not progress):
        skipped.extend(source_skipped)
        for clip, candidates in source_clips:
            clips.append(clip)
            to_embed.append((clip, candidates))
            if len(to_embed) >= EMBED_BATCH_CLIPS:
                embed_pending()
    if to_embed:
        embed_pending()
    scan_seconds = time.time() - t_start

    # Clusters: given groups, or embedding similarity.
    if clips and clips[0].source.group is not None:
        clusters = clusters_from_groups([c.source.group for c in clips])
    elif clips:
        clusters = cluster_embeddings(torch.stack([c.embedding for c in clips]), config.cluster_size,
                                      config.max_cluster_size, seed=config.seed)
    else:
        clusters = []
    kept_clusters = []
    for members in clusters:
        if len(members) < 2:
            skipped.append(Skipped(clips[members[0]].name, "cluster of one", "no related clip to draw memory from"))
        else:
            kept_clusters.append(members)
    if not kept_clusters:
        raise DataError(f"nothing to train on: {len(sources)} sources, {len(clips)} usable clips, no cluster with "
                        f"two or more clips; skipped: {dict(Counter(s.reason for s in skipped))}")

    # Clip ids follow the clusters; shards are filled in reading order.
    kept = [clips[i] for members in kept_clusters for i in members]
    cluster_lists, n = [], 0
    for members in kept_clusters:
        cluster_lists.append(list(range(n, n + len(members))))
        n += len(members)
    clip_entries = [{
        "id": f"c{j:06d}", "source": str(c.source.path), "start": c.start, "end": c.end,
        "caption": c.source.caption, "cluster": k, "shard": None,
        "frames": [int(f) for f in c.frame_indices], "group": c.source.group,
    } for k, members in enumerate(cluster_lists) for j, c in ((j, kept[j]) for j in members)]

    # Pass 2: encode. Clear what an earlier run left.
    if config.overwrite:
        for stale in [out / INDEX_NAME, out / SHARED_NAME, *sorted((out / "shards").glob("shard-*.safetensors"))]:
            if stale.exists():
                stale.unlink()
    device = torch.device(config.device) if config.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[config.cache_dtype]
    pipe = load_encoders_for_prepare(config.base, device)
    H, W, F_ = config.height, config.width, config.num_frames

    with torch.no_grad():
        m2v = pipe.prepare_memory_condition(None, None, None, None, 1, H, W, F_, device).latents[0]
        empty = _encode_text(pipe, "", config.max_sequence_length, device)
    shared_sha = _save_safetensors(out / SHARED_NAME, {"m2v": m2v.to(dtype), "empty_text": empty.to(dtype)})
    latent_shape = list(m2v.shape)

    shard_entries: list[dict] = []
    buffer: dict[str, torch.Tensor] = {}
    buffered = 0

    def flush():
        nonlocal buffer, buffered
        if buffered:
            name = f"shards/shard-{len(shard_entries):05d}.safetensors"
            sha = _save_safetensors(out / name, buffer, metadata={"format": CACHE_FORMAT})
            shard_entries.append({"file": name, "clips": buffered, "sha256": sha})
            buffer, buffered = {}, 0

    # Source order: a video cut into several clips is decoded once, a few videos ahead, in threads.
    by_source = sorted(range(len(kept)), key=lambda i: (str(kept[i].source.path), kept[i].start or 0.0))
    runs: list[list[int]] = []
    for j in by_source:
        if runs and _clip_key(kept[runs[-1][0]]) == _clip_key(kept[j]):
            runs[-1].append(j)
        else:
            runs.append([j])

    def load(run: list[int]):
        """The window of each clip of one source, at the training size, with its subject cells (in the decoding
        thread: resizing and pooling here leave the encoding thread free for the encoders)."""
        clip = kept[run[0]]
        try:
            video = read_clip(clip.source.path, clip.start, clip.end)[0]
            mask = None if clip.source.mask is None else read_clip(clip.source.mask, clip.start, clip.end)[0]
        except (ValueError, OSError, RuntimeError) as e:
            return DataError(f"{clip.name}: was readable while scanning but not now: {e}")
        return [(j, resize_and_crop(video[kept[j].frame_indices], H, W),
                 None if mask is None else _subject_cells(mask[kept[j].frame_indices], H, W, latent_shape))
                for j in run]

    bar = tqdm(total=len(kept), desc="encoding clips", disable=not progress)
    pending: list[tuple[int, np.ndarray, Optional[torch.Tensor]]] = []
    subject_masks = any(c.source.mask is not None for c in kept)

    def encode_pending():
        nonlocal buffered
        with torch.no_grad():
            encoded = encode_clips(pipe, [f for _, f, _ in pending], [kept[j].source.caption for j, _, _ in pending],
                                   positions, config.contexts, config.max_sequence_length, device)
        for (j, _, cells), tensors in zip(pending, encoded):
            cid = clip_entries[j]["id"]
            if cells is not None:
                tensors["subject"] = cells
            for name, value in tensors.items():
                buffer[f"{cid}.{name}"] = value.to(dtype)
            clip_entries[j]["shard"] = len(shard_entries)
            buffered += 1
            if buffered >= config.shard_size:
                flush()
        bar.update(len(pending))
        pending.clear()

    encode_start = time.time()
    for loaded in _ordered_map(load, runs, config.decode_workers):
        if isinstance(loaded, DataError):
            raise loaded
        for item in loaded:
            pending.append(item)
            if len(pending) >= config.encode_batch_size:
                encode_pending()
    if pending:
        encode_pending()
    bar.close()
    flush()
    encode_seconds = time.time() - encode_start

    text_dim = int(empty.shape[-1]) if empty.numel() else int(pipe.text_encoder.config.d_model)
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "base": _base_identity(config.base),
        "height": H, "width": W, "num_frames": F_, "fps": config.fps,
        "latent_shape": latent_shape,  # [z_dim, f, h, w]
        "text_dim": text_dim,
        "max_sequence_length": config.max_sequence_length,
        "dtype": config.cache_dtype,
        "contexts": list(config.contexts),
        "memory_positions": positions,
        "subject_masks": subject_masks,
        "embedder": _embedder_name(config, embedder),
        "cluster_size": config.cluster_size,
        "shared": {"file": SHARED_NAME, "sha256": shared_sha},
        "shards": shard_entries,
        "clips": clip_entries,
        "clusters": cluster_lists,
        "skipped": [s.to_dict() for s in skipped],
        "prepare_config": _jsonable(dataclasses.asdict(config)),
    }
    atomic_write_json(out / INDEX_NAME, index)
    return PrepareSummary(output_dir=out, num_sources=len(sources), num_clips=len(kept),
                          num_clusters=len(cluster_lists), num_shards=len(shard_entries), skipped=skipped,
                          seconds=time.time() - t_start, scan_seconds=scan_seconds, encode_seconds=encode_seconds)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _base_identity(base: str) -> str:
    from .models import base_identity

    return base_identity(base)


def load_encoders_for_prepare(base: str, device):
    from .models import load_encoders

    return load_encoders(base, device=device)


def _encode_text(pipe, text: str, max_sequence_length: int, device) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False,
                                   max_sequence_length=max_sequence_length, device=device)
    return trim_text_embedding(embeds[0].float())


def encode_clip(pipe, frames: np.ndarray, caption: str, memory_positions: Sequence[int], contexts: Sequence[str],
                max_sequence_length: int, device) -> dict[str, torch.Tensor]:
    """Every cached tensor of one clip, from its ``num_frames`` uint8 frames ``[F, H, W, 3]``.

    Memory candidates and video conditions go through exactly the pipeline's inference path.
    """
    return encode_clips(pipe, [frames], [caption], memory_positions, contexts, max_sequence_length, device)[0]


def encode_clips(pipe, clips: Sequence[np.ndarray], captions: Sequence[str], memory_positions: Sequence[int],
                 contexts: Sequence[str], max_sequence_length: int, device) -> list[dict[str, torch.Tensor]]:
    """:func:`encode_clip` for several clips of one size, as one batch through each encoder (small VAEs are
    bound by kernel launches, not arithmetic: a batch costs about what one clip does)."""
    from ..conditioning import encode_memory_frames, encode_video_condition, normalize_latents
    from ..pipeline import preprocess_memory_images

    count = len(clips)
    num_frames, height, width, _ = clips[0].shape
    vae = pipe.vae
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # [B, 3, F, H, W]
    latents = normalize_latents(vae, vae.encode(video.to(device, vae.dtype)).latent_dist.mode().float())
    outs = [{"latents": latents[i]} for i in range(count)]
    positions = list(memory_positions)
    memory_images = torch.cat([preprocess_memory_images(list(frames[positions]), height, width) for frames in clips])
    memory = encode_memory_frames(vae, memory_images.to(device), batch_size=len(memory_images))[0]
    for i in range(count):
        outs[i]["memory"] = memory[:, i * len(positions):(i + 1) * len(positions)]
    for kind in contexts:
        k = CONTEXT_KINDS[kind]
        context = torch.cat([pipe.preprocess_context_frames(list(frames[:k]), height, width) for frames in clips])
        condition = encode_video_condition(vae, context.to(device), num_frames, height, width, count, device)
        for i in range(count):
            outs[i][kind] = condition[i]
    embeds, _ = pipe.encode_prompt(prompt=list(captions), do_classifier_free_guidance=False,
                                   max_sequence_length=max_sequence_length, device=device)
    for i in range(count):
        outs[i]["text"] = trim_text_embedding(embeds[i].float())
    return outs


# ---------------------------------------------------------------------------------------------- reading
_REQUIRED_INDEX_FIELDS = {
    "format": str, "version": int, "height": int, "width": int, "num_frames": int, "latent_shape": list,
    "text_dim": int, "max_sequence_length": int, "dtype": str, "contexts": list, "memory_positions": list,
    "shared": dict, "shards": list, "clips": list, "clusters": list,
}


class PreparedDataset:
    """Read access to a prepared folder, checked when opened.

    Every shard's header is read (keys, shapes, dtypes; a truncated or garbled file fails here) and, with
    ``verify_checksums``, its sha256 compared with the index. A bad shard raises :class:`DataError` naming it;
    with ``skip_bad_shards`` its clips are dropped instead and counted in :attr:`dropped`. Clusters left with
    fewer than two clips are dropped too (memory must come from another clip).
    """

    def __init__(self, root, skip_bad_shards: bool = False, verify_checksums: bool = False):
        self.root = Path(root)
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise DataError(f"{self.root}: no {INDEX_NAME}; run `train_lora.py prepare` first")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{index_path}: not valid JSON ({e})") from None
        if not isinstance(index, dict):
            raise DataError(f"{index_path}: expected a JSON object")
        for key, kind in _REQUIRED_INDEX_FIELDS.items():
            if not isinstance(index.get(key), kind):
                raise DataError(f"{index_path}: field {key!r} is missing or not a {kind.__name__}")
        if index["format"] != CACHE_FORMAT or index["version"] != CACHE_VERSION:
            raise DataError(f"{index_path}: format {index['format']!r} v{index['version']} is not "
                            f"{CACHE_FORMAT!r} v{CACHE_VERSION}")
        if index["dtype"] not in DTYPES:
            raise DataError(f"{index_path}: field 'dtype' must be one of {sorted(DTYPES)}")
        self.index = index
        self.dropped: dict[str, int] = {}
        self.bad_shards: list[str] = []
        self._handles: dict = {}
        self._pid = None

        self.latent_shape = tuple(index["latent_shape"])
        z, f, h, w = self.latent_shape
        self.memory_count = len(index["memory_positions"])
        text_dim = index["text_dim"]
        dtype_name = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[index["dtype"]]

        self._check_file(index["shared"], {"m2v": (z, f, h, w), "empty_text": (None, text_dim)}, dtype_name,
                         verify_checksums, fatal=True)

        expected_per_clip = {"latents": (z, f, h, w), "memory": (z, self.memory_count, h, w),
                             "text": (None, text_dim)}
        expected_per_clip.update({c: (z, f, h, w) for c in index["contexts"]})
        self.has_subject_masks = bool(index.get("subject_masks"))
        if self.has_subject_masks:
            expected_per_clip["subject"] = (f, h, w)
        clips_by_shard: dict[int, list[int]] = {}
        for i, clip in enumerate(index["clips"]):
            for key in ("id", "caption", "cluster", "shard"):
                if key not in clip:
                    raise DataError(f"{index_path}: clips[{i}] has no field {key!r}")
            if not 0 <= clip["shard"] < len(index["shards"]):
                raise DataError(f"{index_path}: clips[{i}] refers to shard {clip['shard']}, which is not listed")
            clips_by_shard.setdefault(clip["shard"], []).append(i)

        valid = [True] * len(index["clips"])
        for s, shard in enumerate(index["shards"]):
            expected = {f"{index['clips'][i]['id']}.{k}": shape for i in clips_by_shard.get(s, [])
                        for k, shape in expected_per_clip.items()}
            ok = self._check_file(shard, expected, dtype_name, verify_checksums, fatal=not skip_bad_shards)
            if not ok:
                for i in clips_by_shard.get(s, []):
                    valid[i] = False
                self.dropped["bad shard"] = self.dropped.get("bad shard", 0) + len(clips_by_shard.get(s, []))

        self.clips = [c for c, ok in zip(index["clips"], valid) if ok]
        remap = {old: new for new, old in enumerate(i for i, ok in enumerate(valid) if ok)}
        clusters = []
        for members in index["clusters"]:
            if not isinstance(members, list) or not all(isinstance(m, int) and 0 <= m < len(valid) for m in members):
                raise DataError(f"{index_path}: clusters must be lists of clip indices")
            kept = [remap[m] for m in members if valid[m]]
            if len(kept) >= 2:
                clusters.append(kept)
            elif kept:
                self.dropped["cluster of one"] = self.dropped.get("cluster of one", 0) + len(kept)
        if not clusters:
            raise DataError(f"{self.root}: no cluster with two or more usable clips"
                            + (f" (dropped: {self.dropped})" if self.dropped else ""))
        self.clusters = clusters
        self.cluster_of = {m: k for k, members in enumerate(clusters) for m in members}

    # ------------------------------------------------------------------ checks
    def _check_file(self, entry: dict, expected: dict, dtype_name: str, verify: bool, fatal: bool) -> bool:
        from safetensors import safe_open

        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise DataError(f"{self.root / INDEX_NAME}: a shard entry has no 'file'")
        path = self.root / entry["file"]
        problem = None
        if not path.is_file():
            problem = "file not found"
        else:
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    missing = [k for k in expected if k not in keys]
                    if missing:
                        problem = f"{len(missing)} tensors missing (e.g. {missing[0]!r})"
                    else:
                        for key, shape in expected.items():
                            sl = f.get_slice(key)
                            got = tuple(sl.get_shape())
                            if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)):
                                problem = f"tensor {key!r} has shape {got}, expected {shape}"
                                break
                            if sl.get_dtype() != dtype_name:
                                problem = f"tensor {key!r} is {sl.get_dtype()}, expected {dtype_name}"
                                break
            except Exception as e:  # safetensors raises its own error types for garbled headers
                problem = f"cannot read safetensors header ({e})"
            if problem is None and verify and entry.get("sha256") and _sha256(path) != entry["sha256"]:
                problem = "checksum mismatch (file changed or corrupted since preparation)"
        if problem is None:
            return True
        message = f"{path}: corrupted or incomplete cache shard: {problem}"
        if fatal:
            raise DataError(message + ("; re-run prepare, or train with --skip-bad-shards to drop its clips"
                                       if entry.get("file") != SHARED_NAME else "; re-run prepare"))
        logger.warning(message + "; its clips are skipped")
        self.bad_shards.append(str(path))
        return False

    # ------------------------------------------------------------------ access
    @property
    def height(self) -> int:
        return self.index["height"]

    @property
    def width(self) -> int:
        return self.index["width"]

    @property
    def num_frames(self) -> int:
        return self.index["num_frames"]

    @property
    def contexts(self) -> list[str]:
        return list(self.index["contexts"])

    @property
    def max_sequence_length(self) -> int:
        return self.index["max_sequence_length"]

    @property
    def base(self) -> Optional[str]:
        return self.index.get("base")

    def __len__(self) -> int:
        return len(self.clips)

    def _handle(self, file: str):
        from safetensors import safe_open

        if self._pid != os.getpid():  # reopen in data-loader worker processes
            self._handles, self._pid = {}, os.getpid()
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.root / file), framework="pt")
        return self._handles[file]

    def _shard_file(self, clip: int) -> str:
        return self.index["shards"][self.clips[clip]["shard"]]["file"]

    def tensor(self, clip: int, key: str) -> torch.Tensor:
        """A cached tensor of a clip: ``latents``, ``memory``, ``text``, a context (``mi2v``/``mm2v``), or
        ``subject`` (with masks)."""
        return self._handle(self._shard_file(clip)).get_tensor(f"{self.clips[clip]['id']}.{key}")

    def memory_frame(self, clip: int, candidate: int) -> torch.Tensor:
        """One memory candidate latent ``[z, 1, h, w]``."""
        sl = self._handle(self._shard_file(clip)).get_slice(f"{self.clips[clip]['id']}.memory")
        return sl[:, candidate:candidate + 1]

    def shared(self, key: str) -> torch.Tensor:
        return self._handle(self.index["shared"]["file"]).get_tensor(key)

    def pad_text(self, embedding: torch.Tensor) -> torch.Tensor:
        """Restore the zero padding to ``max_sequence_length`` that Wan's ``encode_prompt`` produces."""
        length = self.max_sequence_length
        out = embedding.new_zeros(length, embedding.shape[-1])
        n = min(length, embedding.shape[0])
        out[:n] = embedding[:n]
        return out

    def summary(self) -> str:
        text = f"{self.root}: {len(self.clips)} clips in {len(self.clusters)} clusters, " \
               f"{self.num_frames} frames at {self.height}x{self.width}, contexts {self.contexts}"
        if self.dropped:
            text += f"; dropped {self.dropped}"
        return text
