"""Takes: every rendered version of a shot is kept, and the story continues from the one the user picks.

The render folder always holds the *current* take of each shot in its usual places (``shots/SS_NN.mp4``,
``keyframes/SS_NN/``, ``samples/SS_NN/``, ``memory/after_SS_NN/``, its manifest entry), so the CLI, the
story video and the contact sheet see the picks. The studio keeps the others beside it::

    takes/SS_NN/takes.json            {"current": 2, "takes": [{"take": 1, "video_sha256": ..., ...}, ...]}
    takes/SS_NN/take-1/               shot.mp4, keyframes/, samples/, memory/ (the bank after it),
                                      memory_seen/ (copies of the memory frames it saw), entry.json, scores.json

A take is registered when :func:`sync` first sees its video (by content), and archived (copied into
``take-N/``) before anything replaces it: before a re-render (:func:`archive_from`) and before another take
is picked (:func:`pick`). A take also records its *basis*, the content hash of the memory bank it was drawn
from (``memory/after_`` of the shot before): when that bank changes (another take picked upstream, a memory
edit), the shot is *stale* until it is rendered again.

Callers hold the render folder's lock around :func:`archive_from` and :func:`pick`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_json, swap_in_folder
from .runner import bank_folder, read_manifest, refresh_outputs, scores_path, shot_parts, write_manifest

__all__ = ["TakeError", "sync", "takes_of", "archive_from", "pick", "bank_hash", "basis_of", "is_stale",
           "take_folder"]

BANK_MANIFEST = "memory_bank.json"
_lock = threading.RLock()  # takes.json of one process's handlers and its render thread
_hashes: dict = {}


class TakeError(ValueError):
    """A take that cannot be picked (unknown, lost, or of a shot the story does not reach)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_hash(path: Path) -> Optional[str]:
    """sha256 of a file (cached by size and modification time); None when it is missing."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def bank_hash(folder: Path, stem: str) -> Optional[str]:
    """Content hash of the memory bank saved after shot ``stem`` (its manifest names every frame by hash)."""
    return file_hash(bank_folder(folder, stem) / BANK_MANIFEST)


def _stems(manifest: dict) -> list[str]:
    from ..story import Story

    return [shot.file_stem for shot in Story.from_dict(manifest["story"])]


def basis_of(folder: Path, manifest: dict, index: int) -> Optional[str]:
    """The bank shot ``index`` is drawn from now (None for the first shot)."""
    return bank_hash(folder, _stems(manifest)[index - 1]) if index > 0 else None


def take_folder(folder: Path, stem: str, take: int) -> Path:
    return Path(folder) / "takes" / stem / f"take-{take}"


def _index_path(folder: Path, stem: str) -> Path:
    return Path(folder) / "takes" / stem / "takes.json"


def _load_index(folder: Path, stem: str) -> dict:
    try:
        data = json.loads(_index_path(folder, stem).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("takes"), list):
            return data
    except (OSError, ValueError):
        pass
    return {"current": None, "takes": []}


def _record(index: dict, take: Optional[int]) -> Optional[dict]:
    return next((t for t in index["takes"] if t["take"] == take), None)


def sync(folder: Path, manifest: Optional[dict] = None) -> dict[str, dict]:
    """Register the current take of every finished shot (a video not seen before is a new take); returns
    ``{stem: takes index}`` for the shots of the manifest."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    out: dict[str, dict] = {}
    if not manifest:
        return out
    with _lock:
        for position, entry in enumerate(manifest.get("shots", [])):
            stem = entry.get("stem")
            digest = file_hash(folder / str(entry.get("file", "")))
            if not stem or digest is None:
                continue
            index = _load_index(folder, stem)
            current = _record(index, index["current"])
            if current is None or current["video_sha256"] != digest:
                known = next((t for t in index["takes"] if t["video_sha256"] == digest), None)
                if known is None:
                    if current is not None and not current.get("archived"):
                        current["lost"] = True  # replaced outside the studio before it was archived
                    known = {"take": max((t["take"] for t in index["takes"]), default=0) + 1,
                             "video_sha256": digest, "seed": entry.get("seed"), "mode": entry.get("mode"),
                             "finished": entry.get("finished"), "registered": _now(),
                             "basis": basis_of(folder, manifest, position), "archived": False}
                    index["takes"].append(known)
                index["current"] = known["take"]
                atomic_write_json(_index_path(folder, stem), index)
            out[stem] = index
    return out


def takes_of(folder: Path, stem: str) -> dict:
    """The takes index of one shot (``current`` None when it was never rendered)."""
    return _load_index(Path(folder), stem)


def is_stale(folder: Path, manifest: dict, position: int) -> bool:
    """The current take of shot ``position`` was drawn from another bank than the one before it now."""
    entry = manifest["shots"][position]
    index = _load_index(Path(folder), entry["stem"])
    current = _record(index, index["current"])
    if current is None or position == 0:
        return False
    return current.get("basis") is not None and current["basis"] != basis_of(folder, manifest, position)


# ---------------------------------------------------------------------------------------------- archiving
def _copy_folder(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary sibling (``target`` appears complete or not at all)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        swap_in_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    try:
        shutil.copyfile(source, name)
        os.replace(name, target)
    finally:
        if os.path.exists(name):
            os.unlink(name)


def _archive(folder: Path, entry: dict, index: dict) -> None:
    """Copy the current take of ``entry``'s shot into its take folder (once)."""
    current = _record(index, index["current"])
    if current is None or current.get("archived"):
        return
    stem = entry["stem"]
    parts = shot_parts(folder, entry)
    if file_hash(parts["video"]) != current["video_sha256"]:
        current["lost"] = True
        return
    target = take_folder(folder, stem, current["take"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        shutil.copyfile(parts["video"], tmp / "shot.mp4")
        for name in ("keyframes", "samples", "memory"):
            if parts[name].is_dir():
                shutil.copytree(parts[name], tmp / name)
        # The memory frames it saw live in other shots' folders, which later takes replace: keep copies.
        saw = json.loads(json.dumps(entry))
        for i, record in enumerate(saw.get("memory", [])):
            source = folder / str(record.get("file") or "")
            if record.get("file") and source.is_file():
                name = f"{i:02d}-{source.name}"
                (tmp / "memory_seen").mkdir(exist_ok=True)
                shutil.copyfile(source, tmp / "memory_seen" / name)
                record["file"] = f"takes/{stem}/take-{current['take']}/memory_seen/{name}"
        scores = scores_path(folder, stem)
        if scores.is_file():
            shutil.copyfile(scores, tmp / "scores.json")
        atomic_write_json(tmp / "entry.json", saw)
        swap_in_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    current["archived"] = True


def archive_from(folder: Path, start: int) -> list[str]:
    """Before a render from shot ``start`` (0-based): archive the current take of every listed shot from there
    on, which the render will replace. Returns their stems."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest:
        return []
    archived = []
    with _lock:
        sync(folder, manifest)
        for entry in manifest.get("shots", [])[start:]:
            index = _load_index(folder, entry["stem"])
            _archive(folder, entry, index)
            atomic_write_json(_index_path(folder, entry["stem"]), index)
            archived.append(entry["stem"])
    return archived


def pick(folder: Path, stem: str, take: int) -> dict:
    """Make take ``take`` of shot ``stem`` the current one: its files go back in place, its entry into the
    manifest, and the story video and contact sheet are rebuilt. Returns the new manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest:
        raise TakeError(f"{folder.name}: no render to pick takes in")
    stems = _stems(manifest)
    if stem not in stems:
        raise TakeError(f"shot {stem!r} is not in the story")
    position = stems.index(stem)
    shots = manifest.setdefault("shots", [])
    if position > len(shots):
        raise TakeError(f"shot {stem} follows unfinished shots; render up to shot {len(shots) + 1} first")
    with _lock:
        sync(folder, manifest)
        index = _load_index(folder, stem)
        if position < len(shots):
            _archive(folder, shots[position], index)
            atomic_write_json(_index_path(folder, stem), index)
        chosen = _record(index, take)
        if chosen is None:
            raise TakeError(f"shot {stem} has no take {take}")
        source = take_folder(folder, stem, take)
        if not chosen.get("archived") or not (source / "entry.json").is_file():
            raise TakeError(f"take {take} of shot {stem} was replaced outside the studio and cannot be restored")
        entry = json.loads((source / "entry.json").read_text(encoding="utf-8"))
        parts = shot_parts(folder, entry)
        _copy_file(source / "shot.mp4", parts["video"])
        for name in ("keyframes", "samples", "memory"):
            if (source / name).is_dir():
                _copy_folder(source / name, parts[name])
        if (source / "scores.json").is_file():
            _copy_file(source / "scores.json", scores_path(folder, stem))
        if position < len(shots):
            shots[position] = entry
        else:
            shots.append(entry)
        manifest["finished"] = len(shots) == manifest.get("num_shots")
        write_manifest(folder, manifest)
        index["current"] = take
        atomic_write_json(_index_path(folder, stem), index)
    refresh_outputs(folder, manifest)
    return manifest
