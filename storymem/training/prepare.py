"""Preparing a training set: clips -> clusters -> cached latents and text embeddings (the layout of
:mod:`storymem.training.cache`).

Training never runs the VAE or the text encoder. :func:`prepare_dataset` encodes everything once, with the same
functions inference uses:

* the target clip: ``num_frames`` frames VAE-encoded as one video (posterior mode, normalised);
* memory candidates: a few frames of each clip, each encoded on its own as a one-frame video with
  :func:`storymem.conditioning.encode_memory_frames` after the pipeline's own memory-image preprocessing;
* video conditions: the clip's first frame (MI2V) and first five frames (MM2V) through
  :func:`~storymem.conditioning.encode_video_condition` with Wan I2V's preprocessing, and the all-zeros M2V
  condition once per dataset (one resolution per dataset);
* the caption through the pipeline's ``encode_prompt`` (stored without its zero padding).

It runs in two passes. The scan reads every source once to check and embed it, skipping with a reason the clips
that are too short, lack a caption, cannot be decoded, have a mask that does not match them, or end up alone in
their cluster; only then does the encoding pass decode the kept clips again and run the encoders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..atomic import atomic_write_json, jsonable
from ..devices import resolve_device, torch_dtype
from .cache import CACHE_FORMAT, CACHE_VERSION, CONTEXT_KINDS, INDEX_NAME, SHARED_NAME, save_safetensors
from .clustering import cluster_embeddings, clusters_from_groups
from .config import PrepareConfig
from .errors import DataError, TrainingConfigError
from .sources import (
    ClipSource,
    Skipped,
    clip_name,
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

__all__ = ["PrepareSummary", "prepare_dataset", "encode_clip", "encode_clips", "trim_text_embedding"]

EMBED_BATCH_CLIPS = 64  # clips whose memory candidates are embedded in one call while scanning


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
        return clip_name(self.source.path, self.start, self.end)


# ---------------------------------------------------------------------------------------------- prepare
def prepare_dataset(config: PrepareConfig, embedder=None, progress: Optional[bool] = None) -> PrepareSummary:
    """Scan, cluster and encode clips into ``config.output_dir`` (layout: :mod:`storymem.training.cache`).

    Args:
        embedder: a frame embedder (``.embed(images) -> [N, D]``); default from ``config.embedder``.
        progress: show progress bars (default ``config.progress``).
    Raises:
        TrainingConfigError: an invalid setting.
        DataError: a malformed manifest, an existing dataset without ``overwrite``, or nothing left to train on.
    """
    from .models import check_base_available, check_sizes_fit_base

    started = time.time()
    config.validate()
    config = config.resolved()  # sizes and embedder left to the base, filled in
    progress = config.progress if progress is None else progress
    out = Path(config.output_dir)
    if (out / INDEX_NAME).exists() and not config.overwrite:
        raise DataError(f"{out}: already holds a prepared dataset; pass overwrite=True (--overwrite) to replace it")
    check_sizes_fit_base(config.base, config.height, config.width, config.num_frames)
    if config.split_shots:
        try:
            import scenedetect  # noqa: F401
        except ImportError:
            raise ImportError("--split-shots needs PySceneDetect: pip install scenedetect[opencv]") from None
    sources = discover_sources(config.clips_dir, config.manifest, config.caption_ext)
    if not sources:
        raise DataError(f"{config.manifest or config.clips_dir}: no videos found")
    check_base_available(config.base)  # before the scan, which may take a while
    embedder = embedder if embedder is not None else _make_embedder(config)
    with _claim_output(out):
        return _prepare(config, sources, embedder, progress, started)


@contextlib.contextmanager
def _claim_output(out: Path):
    """The output folder, created and locked (one writer at a time) for the duration."""
    from ..locking import FolderLock, FolderLockError

    try:
        lock = FolderLock(out, owner="storymem prepare", purpose="prepare").acquire()
    except FolderLockError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise TrainingConfigError(f"cannot create {e.filename or out} ({e.strerror or e})", option="output_dir") \
            from None
    try:
        yield
    finally:
        lock.release()


def _prepare(config: PrepareConfig, sources: list[ClipSource], embedder, progress: bool,
             started: float) -> PrepareSummary:
    """The two passes of :func:`prepare_dataset`, once its settings and inputs are checked."""
    out = Path(config.output_dir)
    positions = memory_candidate_positions(config.num_frames, config.memory_candidates)

    # Pass 1: check every source, cut its clips, embed them, cluster them. No VAE yet.
    clips, skipped = _scan(sources, config, positions, embedder, progress)
    scan_seconds = time.time() - started
    clusters = _cluster(clips, config, skipped)
    if not clusters:
        raise _nothing_to_train(len(sources), len(clips), skipped)

    # Clip ids follow the clusters; shards are filled in reading order.
    kept = [clips[i] for members in clusters for i in members]
    cluster_lists, n = [], 0
    for members in clusters:
        cluster_lists.append(list(range(n, n + len(members))))
        n += len(members)
    clip_entries = [{
        "id": f"c{j:06d}", "source": str(c.source.path), "start": c.start, "end": c.end,
        "caption": c.source.caption, "cluster": k, "shard": None,
        "frames": [int(f) for f in c.frame_indices], "group": c.source.group,
    } for k, members in enumerate(cluster_lists) for j, c in ((j, kept[j]) for j in members)]

    # Pass 2: encode, after clearing what an earlier run left.
    encode_started = time.time()
    if config.overwrite:
        for stale in [out / INDEX_NAME, out / SHARED_NAME, *sorted((out / "shards").glob("shard-*.safetensors"))]:
            stale.unlink(missing_ok=True)
    encoded = _encode(kept, clip_entries, config, positions, progress)
    encode_seconds = time.time() - encode_started

    atomic_write_json(out / INDEX_NAME, {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "base": _base_identity(config.base),
        "height": config.height, "width": config.width, "num_frames": config.num_frames, "fps": config.fps,
        "latent_shape": encoded.latent_shape,  # [z_dim, f, h, w]
        "text_dim": encoded.text_dim,
        "max_sequence_length": config.max_sequence_length,
        "dtype": config.cache_dtype,
        "contexts": list(config.contexts),
        "memory_positions": positions,
        "subject_masks": any(c.source.mask is not None for c in kept),
        "embedder": _embedder_name(config, embedder),
        "cluster_size": config.cluster_size,
        "shared": {"file": SHARED_NAME, "sha256": encoded.shared_sha256},
        "shards": encoded.shards,
        "clips": clip_entries,
        "clusters": cluster_lists,
        "skipped": [s.to_dict() for s in skipped],
        "prepare_config": jsonable(dataclasses.asdict(config)),
    })
    return PrepareSummary(output_dir=out, num_sources=len(sources), num_clips=len(kept),
                          num_clusters=len(cluster_lists), num_shards=len(encoded.shards), skipped=skipped,
                          seconds=time.time() - started, scan_seconds=scan_seconds, encode_seconds=encode_seconds)


def _base_identity(base: str) -> str:
    from .models import base_identity

    return base_identity(base)


def _nothing_to_train(num_sources: int, num_clips: int, skipped: list[Skipped]) -> DataError:
    """The error of a scan that left no cluster: how many of what was skipped, with one example of each."""
    reasons = []
    for reason, count in Counter(s.reason for s in skipped).most_common():
        example = next(s for s in skipped if s.reason == reason)
        reasons.append(f"{count} {reason} (e.g. {example.source}" + (f": {example.detail})" if example.detail else ")"))
    return DataError(f"nothing to train on: {num_sources} sources, {num_clips} usable clips, no cluster with two "
                     "or more clips" + ("; skipped " + ", ".join(reasons) if reasons else ""))


def _make_embedder(config: PrepareConfig):
    """The frame embedder of ``config.embedder``, its weights loaded now: weights that cannot be had fail here,
    in one line saying which and how to get them, before any clip is read."""
    if config.embedder == "pixel":
        from ..memory import PixelEmbedder

        return PixelEmbedder()
    try:
        from ..memory import OpenCLIPEmbedder

        embedder = OpenCLIPEmbedder(config.clip_model, pretrained=config.clip_pretrained, device=config.device)
    except ImportError:
        raise ImportError("--embedder clip needs open_clip (pip install open_clip_torch); --embedder pixel needs "
                          "nothing") from None
    except FileNotFoundError as e:
        raise TrainingConfigError(str(e), option="clip_pretrained") from None
    except ValueError as e:  # an unknown model name or pretrained tag
        raise TrainingConfigError(str(e), option="clip_pretrained" if "tag" in str(e) else "clip_model") from None
    try:
        with _without_open_clip_logs():  # it logs the failure it then raises: one message is enough
            return embedder.load()
    except (RuntimeError, OSError, ValueError) as e:
        reason = _first_line(e).split(": ")[0]
        if config.clip_pretrained and Path(config.clip_pretrained).is_file():
            raise TrainingConfigError(f"{config.clip_pretrained}: cannot load it as {config.clip_model} weights "
                                      f"({reason})", option="clip_pretrained") from None
        name, tag = config.clip_model, config.clip_pretrained
        raise TrainingConfigError(
            f"the open_clip weights {name} / {tag} are not downloaded and could not be fetched ({reason}); download "
            f"them once while online: python -c \"import open_clip; open_clip.create_model('{name}', "
            f"pretrained='{tag}')\" (later runs, offline too, find them in the cache), or give a checkpoint file "
            "with --clip-pretrained FILE, or use --embedder pixel (no weights)", option="embedder") from None


@contextlib.contextmanager
def _without_open_clip_logs():
    def not_open_clip(record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname

    root = logging.getLogger()
    root.addFilter(not_open_clip)
    try:
        yield
    finally:
        root.removeFilter(not_open_clip)


def _embedder_name(config: PrepareConfig, embedder) -> str:
    if config.embedder == "clip":
        return f"open_clip:{config.clip_model}/{config.clip_pretrained}"
    return repr(embedder)


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


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# ---------------------------------------------------------------------------------------------- pass 1: scan
def _scan(sources: list[ClipSource], config: PrepareConfig, positions: Sequence[int], embedder,
          progress: bool) -> tuple[list[_Clip], list[Skipped]]:
    """The usable clips of every source, each with the embedding of its memory candidates, and what was skipped.

    Videos decode in threads (the decoder is an ffmpeg subprocess); embedding stays here, in source order, so the
    result does not depend on them. It goes in batches of clips: one call per clip would keep this thread busy
    with small calls while the decoding threads wait for it, on many cores the slowest part of the pass.
    """
    from tqdm.auto import tqdm

    skipped: list[Skipped] = []
    clips: list[_Clip] = []
    to_embed: list[tuple[_Clip, np.ndarray]] = []

    def embed_pending():
        embeddings = embedder.embed(np.concatenate([c for _, c in to_embed])).float()
        start = 0
        for clip, candidates in to_embed:
            part = embeddings[start:start + len(candidates)]
            clip.embedding = torch.nn.functional.normalize(part.mean(0), dim=0)
            start += len(candidates)
        to_embed.clear()

    scanned = _ordered_map(lambda source: _scan_source(source, config, positions), sources, config.decode_workers)
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
    return clips, skipped


def _segments(source: ClipSource, config: PrepareConfig) -> list[tuple[Optional[float], Optional[float]]]:
    if source.start is not None or source.end is not None:
        return [(source.start, source.end)]
    if config.split_shots:
        shots = detect_shots(source.path, config.shot_threshold, config.min_shot_seconds)
        if shots:
            return shots
    return [(None, None)]


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
        return [], [Skipped(source.name, "unreadable", _first_line(e))]
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
                                                           f"need {config.num_frames} (--num-frames)"))
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
        return f"{mask}: unreadable ({_first_line(e)})"
    if len(frames) != shape[0]:
        return f"{mask}: {len(frames)} frames, the video has {shape[0]}"
    if frames.shape[1:3] != tuple(shape[1:3]):
        return f"{mask}: {frames.shape[2]}x{frames.shape[1]} pixels, the video is {shape[2]}x{shape[1]}"
    return None


def _cluster(clips: list[_Clip], config: PrepareConfig, skipped: list[Skipped]) -> list[list[int]]:
    """Clusters of two or more clips (given groups, or embedding similarity); clips left alone are skipped."""
    if not clips:
        return []
    if clips[0].source.group is not None:
        clusters = clusters_from_groups([c.source.group for c in clips])
    else:
        clusters = cluster_embeddings(torch.stack([c.embedding for c in clips]), config.cluster_size,
                                      config.max_cluster_size, seed=config.seed)
    kept = []
    for members in clusters:
        if len(members) < 2:
            skipped.append(Skipped(clips[members[0]].name, "cluster of one", "no related clip to draw memory from"))
        else:
            kept.append(members)
    return kept


# ---------------------------------------------------------------------------------------------- pass 2: encode
class _ShardWriter:
    """Collects the tensors of clips and writes them ``shard_size`` clips to a safetensors shard."""

    def __init__(self, out: Path, dtype: torch.dtype, shard_size: int):
        self.out, self.dtype, self.shard_size = out, dtype, shard_size
        self.entries: list[dict] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._clips = 0

    def add(self, clip_entry: dict, tensors: dict[str, torch.Tensor]):
        """Buffer one clip's tensors and record its shard in ``clip_entry``."""
        for name, value in tensors.items():
            self._tensors[f"{clip_entry['id']}.{name}"] = value.to(self.dtype)
        clip_entry["shard"] = len(self.entries)
        self._clips += 1
        if self._clips >= self.shard_size:
            self.flush()

    def flush(self):
        if self._clips:
            name = f"shards/shard-{len(self.entries):05d}.safetensors"
            sha = save_safetensors(self.out / name, self._tensors, metadata={"format": CACHE_FORMAT})
            self.entries.append({"file": name, "clips": self._clips, "sha256": sha})
            self._tensors, self._clips = {}, 0


@dataclass
class _Encoded:
    latent_shape: list[int]
    text_dim: int
    shared_sha256: str
    shards: list[dict]


def _encode(kept: list[_Clip], clip_entries: list[dict], config: PrepareConfig, positions: Sequence[int],
            progress: bool) -> _Encoded:
    """Encode the shared tensors and every kept clip into ``config.output_dir`` (recording each clip's shard in
    its entry)."""
    from tqdm.auto import tqdm

    from .models import load_encoders

    out, device, dtype = Path(config.output_dir), resolve_device(config.device), torch_dtype(config.cache_dtype)
    height, width, num_frames = config.height, config.width, config.num_frames
    pipe = load_encoders(config.base, device=device, progress=progress)
    with torch.no_grad():
        m2v = pipe.prepare_memory_condition(None, None, None, None, 1, height, width, num_frames, device).latents[0]
        empty = _encode_text(pipe, "", config.max_sequence_length, device)
    shared_sha = save_safetensors(out / SHARED_NAME, {"m2v": m2v.to(dtype), "empty_text": empty.to(dtype)})
    latent_shape = list(m2v.shape)

    def load(run: list[int]):
        """The window of each clip of one source, at the training size, with its subject cells (in the decoding
        thread: resizing and pooling here leave the encoding thread free for the encoders)."""
        clip = kept[run[0]]
        try:
            video = read_clip(clip.source.path, clip.start, clip.end)[0]
            mask = None if clip.source.mask is None else read_clip(clip.source.mask, clip.start, clip.end)[0]
        except (ValueError, OSError, RuntimeError) as e:
            return DataError(f"{clip.name}: was readable while scanning but not now: {e}")
        return [(j, resize_and_crop(video[kept[j].frame_indices], height, width),
                 None if mask is None else _subject_cells(mask[kept[j].frame_indices], height, width, latent_shape))
                for j in run]

    writer = _ShardWriter(out, dtype, config.shard_size)
    bar = tqdm(total=len(kept), desc="encoding clips", disable=not progress)
    pending: list[tuple[int, np.ndarray, Optional[torch.Tensor]]] = []

    def encode_pending():
        with torch.no_grad():
            encoded = encode_clips(pipe, [f for _, f, _ in pending], [kept[j].source.caption for j, _, _ in pending],
                                   positions, config.contexts, config.max_sequence_length, device)
        for (j, _, cells), tensors in zip(pending, encoded):
            if cells is not None:
                tensors["subject"] = cells
            writer.add(clip_entries[j], tensors)
        bar.update(len(pending))
        pending.clear()

    for loaded in _ordered_map(load, _source_runs(kept), config.decode_workers):
        if isinstance(loaded, DataError):
            raise loaded
        for item in loaded:
            pending.append(item)
            if len(pending) >= config.encode_batch_size:
                encode_pending()
    if pending:
        encode_pending()
    bar.close()
    writer.flush()
    text_dim = int(empty.shape[-1]) if empty.numel() else int(pipe.text_encoder.config.d_model)
    return _Encoded(latent_shape, text_dim, shared_sha, writer.entries)


def _source_runs(kept: list[_Clip]) -> list[list[int]]:
    """Clips in source order, those of one video range together, so each range is decoded once, a few ahead."""
    order = sorted(range(len(kept)), key=lambda i: (str(kept[i].source.path), kept[i].start or 0.0))
    runs: list[list[int]] = []
    for j in order:
        if runs and _clip_key(kept[runs[-1][0]]) == _clip_key(kept[j]):
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs


def _clip_key(clip: _Clip) -> tuple:
    return (clip.source.path, clip.start, clip.end)


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
