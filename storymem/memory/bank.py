"""The story's memory bank: keyframes in story order, a sink + sliding window view, and shot-end frames.

* `add(keyframes, shot=i)` appends a shot's new keyframes (what `KeyframeSelector.extract` kept), with their
  frame indices within the shot and, when known, their embeddings (reused for the next shots' dedup).
* `frames()` / `entries()`: what the next shot is conditioned on. When the story holds more than
  `max_memory` keyframes, the first `sink` stay (the story's opening: characters, setting) and the most
  recent `max_memory - sink` follow, in story order.
* `retrieve(query, relevance)`: text-aware retrieval instead of the window: the frames whose take text (given
  to `add` as `text=`) is most relevant to the shot's (see `storymem.memory.retrieval`).
* `history()`: every keyframe ever added; keyframe dedup compares against all of it, as the release does.
* `set_last_frames(frames)`, `last_frame`, `last_frames(n)`: the end of the previous shot for MI2V (1 frame)
  and MM2V (5 frames).
* `add_references(images)`: MR2V reference images as the story's initial memory. They head the story order,
  count as sink and are never evicted: the pinned head is the first max(sink, number of references) entries.
  They take part in the dedup like any remembered keyframe. Their `shot` is None.

`save(folder)` writes a JSON manifest plus one PNG per frame; `MemoryBank.load(folder)` restores the bank and
refuses anything incomplete or altered (`MemoryBankError` naming the file). Saving never leaves a half-
written state: image files get content-derived names and are written through temporary files, and the
manifest, replaced atomically last, is the only thing that makes them part of the bank.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_write_bytes
from ..defaults import MOTION_FRAMES
from ..images import uint8_image, uint8_images, uint8_video

MANIFEST_NAME = "memory_bank.json"
FORMAT_NAME = "storymem-memory-bank"
FORMAT_VERSION = 1


class MemoryBankError(ValueError):
    """A memory bank operation or a saved bank that cannot be used as asked."""


@dataclass
class MemoryEntry:
    """One remembered frame."""

    frame: np.ndarray  # uint8 [H, W, 3]
    shot: int | None  # index of the shot it was taken from (None for a reference image)
    frame_index: int | None  # index of the frame within that shot (None when not known / reference)
    embedding: torch.Tensor | None = None  # [D], for dedup; None when not known
    kind: str = "keyframe"  # "keyframe" | "reference"
    text: str | None = None  # the text of the take it came from, for retrieval by prompt; None when not known

    @property
    def is_reference(self) -> bool:
        return self.kind == "reference"

    def describe(self) -> dict:
        """Where the frame came from, for render manifests."""
        return {"kind": self.kind, "shot": self.shot, "frame_index": self.frame_index}


class MemoryBank:
    """Memory frames for Memory-to-Video generation (see the module doc).

    Args:
        max_memory: frames the next shot sees at most (the release's example uses 10, its CLI 8).
        sink: the oldest frames always kept (3).
    """

    def __init__(self, max_memory: int = 10, sink: int = 3):
        if max_memory < 1:
            raise MemoryBankError(f"max_memory must be >= 1, got {max_memory}")
        if not 0 <= sink <= max_memory:
            raise MemoryBankError(f"sink must be in [0, max_memory={max_memory}], got {sink}")
        self.max_memory = int(max_memory)
        self.sink = int(sink)
        self._entries: list[MemoryEntry] = []
        self._last_frames: list[np.ndarray] = []
        self._last_shot: int | None = None

    # ------------------------------------------------------------------------------------------ adding

    @property
    def num_references(self) -> int:
        return sum(1 for e in self._entries if e.is_reference)

    def add_references(self, images: Any, embeddings: torch.Tensor | None = None) -> list[MemoryEntry]:
        """MR2V: reference images as the story's first memory entries (before any keyframe)."""
        images = uint8_images(images, "references")
        if any(not e.is_reference for e in self._entries):
            raise MemoryBankError("reference images must be added before any shot's keyframes")
        if self.num_references + len(images) > self.max_memory:
            raise MemoryBankError(
                f"{self.num_references + len(images)} reference images do not fit max_memory={self.max_memory}"
            )
        rows = _check_embeddings(embeddings, len(images), "reference embeddings")
        new = [
            MemoryEntry(frame=image.copy(), shot=None, frame_index=None, embedding=row, kind="reference")
            for image, row in zip(images, rows)
        ]
        self._entries.extend(new)
        return new

    def add(
        self,
        keyframes: Any,
        shot: int,
        embeddings: torch.Tensor | None = None,
        frame_indices: Sequence[int] | None = None,
        text: str | None = None,
    ) -> list[MemoryEntry]:
        """Append shot `shot`'s keyframes (uint8 [H, W, 3] images) in story order.

        `frame_indices`: each keyframe's index within the shot; `embeddings` [K, D]: their embeddings for
        the dedup of later shots (`KeyframeSelection.embeddings`); `text`: the text of the shot's take
        (`storymem.memory.retrieval.take_texts`), which `retrieve` compares with later shots'."""
        if isinstance(shot, bool) or not isinstance(shot, (int, np.integer)) or shot < 0:
            raise MemoryBankError(f"shot must be a non-negative int, got {shot!r}")
        shot = int(shot)
        latest = max((e.shot for e in self._entries if e.shot is not None), default=None)
        if latest is not None and shot < latest:
            raise MemoryBankError(f"keyframes of shot {shot} added after shot {latest}: the bank keeps story order")
        images = uint8_images(keyframes, f"keyframes of shot {shot}")
        if frame_indices is None:
            indices: list[int | None] = [None] * len(images)
        else:
            indices = [int(i) for i in frame_indices]
            if len(indices) != len(images) or any(i < 0 for i in indices):
                raise MemoryBankError(
                    f"shot {shot}: frame_indices must be {len(images)} non-negative ints, got {list(frame_indices)}"
                )
        rows = _check_embeddings(embeddings, len(images), f"embeddings of shot {shot}")
        if text is not None and not isinstance(text, str):
            raise MemoryBankError(f"shot {shot}: text must be a string or None, got {type(text).__name__}")
        new = [
            MemoryEntry(frame=image.copy(), shot=shot, frame_index=index, embedding=row, text=text)
            for image, index, row in zip(images, indices, rows)
        ]
        self._entries.extend(new)
        return new

    # ------------------------------------------------------------------------------------------ views

    def entries(self) -> list[MemoryEntry]:
        """The memory the next shot sees: pinned head (sink, references) + most recent, in story order."""
        entries = self._entries
        if len(entries) <= self.max_memory:
            return list(entries)
        pinned = max(self.sink, self.num_references)
        recent = self.max_memory - pinned
        return list(entries[:pinned]) + (list(entries[-recent:]) if recent > 0 else [])

    def frames(self) -> list[np.ndarray]:
        return [e.frame for e in self.entries()]

    def relevance(self, query: str, relevance: Callable[[str, Sequence[str | None]], Any]) -> list[float | None]:
        """One score per history entry for a shot whose take text is `query` (None for reference images), from
        `relevance(query, texts)`, e.g. a `storymem.memory.retrieval.TextRelevance` over the story's takes."""
        keyframes = [e for e in self._entries if not e.is_reference]
        missing = sorted({e.shot for e in keyframes if e.text is None})
        if missing:
            raise MemoryBankError(
                f"the keyframes of shot(s) {missing} have no text to compare with the prompt; add them with "
                "text=, or set it with fill_texts()"
            )
        scores = iter(float(s) for s in relevance(query, [e.text for e in keyframes]))
        return [None if e.is_reference else next(scores) for e in self._entries]

    def retrieve(
        self,
        query: str,
        relevance: Callable[[str, Sequence[str | None]], Any],
        min_relevance: float = 0.0,
        relative_relevance: float = 0.0,
    ) -> list[MemoryEntry]:
        """The memory the next shot sees when retrieved by prompt instead of the window: reference images, then
        the keyframes whose take is most relevant to `query` (up to `max_memory` in all), in story order; see
        `storymem.memory.retrieval.select_relevant` for the thresholds."""
        from .retrieval import select_relevant

        keep = select_relevant(self.relevance(query, relevance), self.max_memory, min_relevance, relative_relevance)
        return [self._entries[i] for i in keep]

    def fill_texts(self, texts: Callable[[int], str]) -> None:
        """Give keyframes without a take text (banks saved before texts were kept) `texts(shot)`."""
        for entry in self._entries:
            if entry.text is None and not entry.is_reference:
                entry.text = texts(entry.shot)

    def history(self) -> list[MemoryEntry]:
        """Every frame ever remembered, in story order (references first)."""
        return list(self._entries)

    def history_frames(self) -> list[np.ndarray]:
        return [e.frame for e in self._entries]

    def history_embeddings(self, embedder: Any = None) -> torch.Tensor | None:
        """[M, D] embeddings of the whole history, for keyframe dedup. Entries without one are embedded with
        `embedder` (and remember it); with no embedder and a missing embedding, raises. None when empty."""
        if not self._entries:
            return None
        missing = [e for e in self._entries if e.embedding is None]
        if missing:
            if embedder is None:
                raise MemoryBankError(
                    f"{len(missing)} memory entries have no embedding; pass an embedder or the frames themselves"
                )
            rows = embedder.embed([e.frame for e in missing])
            for entry, row in zip(missing, rows):
                entry.embedding = row.detach().float().cpu()
        dims = {e.embedding.shape[0] for e in self._entries}
        if len(dims) != 1:
            raise MemoryBankError(f"memory embeddings have different sizes {sorted(dims)}; were two embedders mixed?")
        return torch.stack([e.embedding for e in self._entries])

    def __len__(self) -> int:
        return len(self.entries())

    # ------------------------------------------------------------------------------------------ shot ends

    def set_last_frames(self, frames: Any, shot: int | None = None) -> None:
        """Keep the end of the shot just rendered (its last `MOTION_FRAMES` frames) for MI2V / MM2V."""
        video = uint8_video(frames, "last frames")
        self._last_frames = [f.copy() for f in video[-MOTION_FRAMES:]]
        self._last_shot = None if shot is None else int(shot)

    @property
    def last_frame(self) -> np.ndarray | None:
        """The previous shot's last frame (MI2V), None before any shot."""
        return self._last_frames[-1] if self._last_frames else None

    def last_frames(self, n: int = MOTION_FRAMES) -> list[np.ndarray]:
        """The previous shot's last `n` frames (MM2V: 5), oldest first."""
        if not self._last_frames:
            raise MemoryBankError("no shot has ended yet: set_last_frames() was never called")
        if not 1 <= n <= len(self._last_frames):
            raise MemoryBankError(f"asked for the last {n} frames, but only {len(self._last_frames)} are kept")
        return list(self._last_frames[-n:])

    @property
    def last_shot(self) -> int | None:
        return self._last_shot

    # ------------------------------------------------------------------------------------------ files

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the bank to `folder` (created if needed); returns the manifest path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for entry in self._entries:
            record = {**entry.describe(), **_write_png(folder, entry.frame)}
            if entry.text is not None:
                record["text"] = entry.text
            records.append(record)
        embedding_file = None
        if self._entries and all(e.embedding is not None for e in self._entries):
            embedding_file = _write_embeddings(folder, torch.stack([e.embedding for e in self._entries]))
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "max_memory": self.max_memory,
            "sink": self.sink,
            "entries": records,
            "embeddings": embedding_file,
            "last_frames": [_write_png(folder, f) for f in self._last_frames],
            "last_shot": self._last_shot,
        }
        path = folder / MANIFEST_NAME
        atomic_write_bytes(path, json.dumps(manifest, indent=2).encode("utf-8"))
        _remove_unreferenced(folder, manifest)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "MemoryBank":
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise MemoryBankError(f"memory bank manifest not found: {path}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MemoryBankError(f"{path}: corrupted memory bank manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise MemoryBankError(f"{path}: not a storymem memory bank manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise MemoryBankError(f"{path}: unsupported memory bank version {manifest.get('version')!r}")
        for key, kind in (("max_memory", int), ("sink", int), ("entries", list), ("last_frames", list)):
            if not isinstance(manifest.get(key), kind):
                raise MemoryBankError(f"{path}: field {key!r} missing or not a {kind.__name__}")
        try:
            bank = cls(manifest["max_memory"], manifest["sink"])
        except MemoryBankError as exc:
            raise MemoryBankError(f"{path}: {exc}") from exc

        embeddings = None
        if manifest.get("embeddings") is not None:
            embeddings = _read_embeddings(folder, manifest["embeddings"], len(manifest["entries"]), path)
        for i, record in enumerate(manifest["entries"]):
            where = f"{path}: entries[{i}]"
            if not isinstance(record, dict) or record.get("kind") not in ("keyframe", "reference"):
                raise MemoryBankError(f"{where}: not a memory entry")
            shot, index = record.get("shot"), record.get("frame_index")
            if record["kind"] == "keyframe" and not (isinstance(shot, int) and shot >= 0):
                raise MemoryBankError(f"{where}: field 'shot' must be a non-negative int")
            if index is not None and not (isinstance(index, int) and index >= 0):
                raise MemoryBankError(f"{where}: field 'frame_index' must be a non-negative int or null")
            text = record.get("text")
            if text is not None and not isinstance(text, str):
                raise MemoryBankError(f"{where}: field 'text' must be a string or null")
            frame = _read_png(folder, record, where)
            bank._entries.append(
                MemoryEntry(
                    frame=frame,
                    shot=shot if record["kind"] == "keyframe" else None,
                    frame_index=index,
                    embedding=None if embeddings is None else embeddings[i].clone(),
                    kind=record["kind"],
                    text=text,
                )
            )
        bank._last_frames = [
            _read_png(folder, record, f"{path}: last_frames[{i}]") for i, record in enumerate(manifest["last_frames"])
        ]
        last_shot = manifest.get("last_shot")
        if last_shot is not None and not isinstance(last_shot, int):
            raise MemoryBankError(f"{path}: field 'last_shot' must be an int or null")
        bank._last_shot = last_shot
        return bank

    def __repr__(self) -> str:
        return (
            f"MemoryBank(max_memory={self.max_memory}, sink={self.sink}, history={len(self._entries)}, "
            f"window={len(self.entries())})"
        )


# ---------------------------------------------------------------------------------------------- helpers


def _check_embeddings(embeddings: Any, count: int, what: str) -> list[torch.Tensor | None]:
    if embeddings is None:
        return [None] * count
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or embeddings.shape[0] != count:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise MemoryBankError(f"{what}: expected a tensor [{count}, D], got {shape}")
    embeddings = embeddings.detach().float().cpu()
    if not torch.isfinite(embeddings).all():
        raise MemoryBankError(f"{what}: non-finite values")
    return [row.clone() for row in embeddings]


def _digest(frame: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{frame.shape[0]}x{frame.shape[1]}:".encode())
    h.update(np.ascontiguousarray(frame).tobytes())
    return h.hexdigest()


def _write_png(folder: Path, frame: np.ndarray) -> dict:
    """Write `frame` under a name derived from its pixels (never overwriting a file another manifest uses)."""
    digest = _digest(frame)
    name = f"frame-{digest[:20]}.png"
    path = folder / name
    if not path.is_file():  # same name = same pixels; files only ever appear complete (atomic rename)
        import io

        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
    return {"file": name, "sha256": digest}


def _read_png(folder: Path, record: Any, where: str) -> np.ndarray:
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise MemoryBankError(f"{where}: field 'file' missing")
    name = record["file"]
    if Path(name).name != name:
        raise MemoryBankError(f"{where}: file name {name!r} must not contain a folder")
    path = folder / name
    if not path.is_file():
        raise MemoryBankError(f"{where}: image file missing: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != "RGB":
                raise MemoryBankError(f"{where}: {path} is a {image.mode} image, expected RGB")
            frame = np.asarray(image, dtype=np.uint8).copy()
    except MemoryBankError:
        raise
    except Exception as exc:  # PIL raises several types for truncated / invalid files
        raise MemoryBankError(f"{where}: cannot read image {path} ({exc})") from exc
    if record.get("sha256") != _digest(frame):
        raise MemoryBankError(f"{where}: {path} does not hold the frame the manifest recorded (checksum mismatch)")
    return uint8_image(frame, str(path))


def _write_embeddings(folder: Path, embeddings: torch.Tensor) -> dict:
    from safetensors.torch import save

    data = save({"embeddings": embeddings.contiguous()})
    digest = hashlib.sha256(data).hexdigest()
    name = f"embeddings-{digest[:20]}.safetensors"
    if not (folder / name).is_file():
        atomic_write_bytes(folder / name, data)
    return {"file": name, "sha256": digest}


def _read_embeddings(folder: Path, record: Any, count: int, manifest: Path) -> torch.Tensor:
    from safetensors.torch import load

    name = record.get("file") if isinstance(record, dict) else None
    if not isinstance(name, str) or Path(name).name != name:
        raise MemoryBankError(f"{manifest}: field 'embeddings' is malformed")
    path = folder / record["file"]
    if not path.is_file():
        raise MemoryBankError(f"{manifest}: embeddings file missing: {path}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise MemoryBankError(f"{path}: checksum mismatch with {manifest}")
    try:
        embeddings = load(data)["embeddings"]
    except Exception as exc:
        raise MemoryBankError(f"{path}: cannot read embeddings ({exc})") from exc
    if embeddings.ndim != 2 or embeddings.shape[0] != count:
        raise MemoryBankError(f"{path}: expected [{count}, D] embeddings, got {tuple(embeddings.shape)}")
    return embeddings.float()


def _remove_unreferenced(folder: Path, manifest: dict) -> None:
    """After the new manifest is in place, delete frame/embedding files only older manifests used."""
    keep = {r["file"] for r in manifest["entries"]} | {r["file"] for r in manifest["last_frames"]}
    if manifest["embeddings"] is not None:
        keep.add(manifest["embeddings"]["file"])
    for path in folder.iterdir():
        name = path.name
        ours = (name.startswith("frame-") and name.endswith(".png")) or (
            name.startswith("embeddings-") and name.endswith(".safetensors")
        )
        if ours and name not in keep and path.is_file():
            path.unlink()
