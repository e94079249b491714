"""Curating the memory: edit the bank a shot is drawn from, then re-render from that shot.

The renderer saves the bank after every shot (``memory/after_SS_NN``) and ``--from-shot K`` restores the one
saved after shot K-1. An edit rewrites that bank in place, through :class:`~storymem.memory.MemoryBank`'s own
API, so the studio's re-render and ``storymem render --from-shot K`` both draw shot K from the edited memory:

* **remove** a keyframe (or a reference image): it is gone from the memory of shot K on;
* **pin** a keyframe: it becomes one of the bank's reference images, which head the memory and are never
  evicted by the sliding window (the bank's sink);
* **add reference images**: uploaded images join the reference images.

Every edit is recorded, with the bank before and after it, in ``studio/edits/NNNN/`` (``edit.json``,
``before/``, ``after/``, ``added/``) and in the render manifest's ``edits`` list, so the render stays
reproducible. Reference images are written to ``references/ref_NN.png`` by their position in the bank, as
the renderer names them; a file that an edit replaces is kept under a new name for the shots that saw it.
Callers hold the render folder's lock.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_json
from ..memory import MemoryBank, MemoryBankError
from .runner import STUDIO_DIR, bank_folder, read_manifest, reference_file, write_manifest
from .takes import bank_hash, file_hash

__all__ = ["MemoryEditError", "BankItem", "bank_items", "apply_edit", "list_edits", "sync_manifest_edits",
           "frame_key"]

EDITS_DIR = "edits"


class MemoryEditError(ValueError):
    """An edit that cannot be made (unknown entry, nothing to edit, too many reference images, ...)."""


@dataclass
class BankItem:
    """One frame of a saved bank as the page lists it."""

    key: str  # "e03-1a2b3c4d": position in the bank + pixel hash (stable while the bank is unchanged)
    position: int
    kind: str  # "keyframe" | "reference"
    shot: Optional[int]
    stem: Optional[str]
    frame_index: Optional[int]
    in_window: bool  # among the frames the next shot sees with the sink + sliding window
    sha256: str
    frame: np.ndarray

    @property
    def label(self) -> str:
        where = (f"reference {self.position + 1}" if self.kind == "reference"
                 else f"shot {self.stem} frame {self.frame_index}")
        return f"{where}" + ("" if self.in_window else " (outside the window)")

    def describe(self) -> dict:
        return {"kind": self.kind, "shot": self.shot, "shot_stem": self.stem, "frame": self.frame_index,
                "sha256": self.sha256}


def frame_key(position: int, frame: np.ndarray) -> tuple[str, str]:
    h = hashlib.sha256(f"{frame.shape[0]}x{frame.shape[1]}:".encode())
    h.update(np.ascontiguousarray(frame).tobytes())
    digest = h.hexdigest()
    return f"e{position:02d}-{digest[:8]}", digest


def _story_stems(manifest: dict) -> list[str]:
    from ..story import Story

    return [shot.file_stem for shot in Story.from_dict(manifest["story"])]


def _bank_folder(folder: Path, manifest: dict, shot: int) -> tuple[Path, str]:
    """The bank shot ``shot`` (0-based) is drawn from: the one saved after the shot before it."""
    stems = _story_stems(manifest)
    finished = len(manifest.get("shots", []))
    if not 1 <= shot < len(stems):
        raise MemoryEditError(f"shot {shot + 1}: the memory can be edited for shots 2..{len(stems)} (shot 1 "
                              "starts from the reference images of the render settings)")
    if shot > finished:
        raise MemoryEditError(f"shot {shot + 1}: shot {shot} is not rendered yet, so there is no memory after it")
    stem = stems[shot - 1]
    return bank_folder(folder, stem), stem


def bank_items(folder: Path, shot: int, manifest: Optional[dict] = None) -> tuple[MemoryBank, list[BankItem]]:
    """The bank shot ``shot`` (0-based) is drawn from, and its frames as the page lists them."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    if not manifest:
        raise MemoryEditError(f"{Path(folder).name}: no render yet")
    bank_folder, _ = _bank_folder(folder, manifest, shot)
    try:
        bank = MemoryBank.load(bank_folder)
    except MemoryBankError as err:
        raise MemoryEditError(str(err)) from None
    stems = _story_stems(manifest)
    window = {id(e) for e in bank.entries()}
    items = []
    for position, entry in enumerate(bank.history()):
        key, digest = frame_key(position, entry.frame)
        items.append(BankItem(key=key, position=position, kind=entry.kind, shot=entry.shot,
                              stem=stems[entry.shot] if entry.shot is not None and entry.shot < len(stems) else None,
                              frame_index=entry.frame_index, in_window=id(entry) in window, sha256=digest,
                              frame=entry.frame))
    return bank, items


def _rebuilt(bank: MemoryBank, items: list[BankItem], remove: set, pin: set,
             added: Sequence[np.ndarray]) -> MemoryBank:
    """A new bank: the kept references, the added images and the pinned keyframes as references, then the kept
    keyframes in story order, then the same shot-end frames."""
    import torch

    entries = bank.history()
    references = [e for e, i in zip(entries, items) if e.is_reference and i.key not in remove]
    pinned = [e for e, i in zip(entries, items) if not e.is_reference and i.key in pin]
    keyframes = [e for e, i in zip(entries, items)
                 if not e.is_reference and i.key not in remove and i.key not in pin]
    heads = [e.frame for e in references] + list(added) + [e.frame for e in pinned]
    if len(heads) > bank.max_memory:
        raise MemoryEditError(f"{len(heads)} reference images (kept, added and pinned) do not fit the memory of "
                              f"{bank.max_memory} frames")
    new = MemoryBank(max_memory=bank.max_memory, sink=bank.sink)
    head_embeddings = [e.embedding for e in references] + [None] * len(added) + [e.embedding for e in pinned]
    if heads:
        known = all(e is not None for e in head_embeddings)
        new.add_references(heads, embeddings=torch.stack(head_embeddings) if known else None)
    groups: list[list] = []
    for entry in keyframes:  # one add() per shot, as the renderer made them
        if groups and groups[-1][0].shot == entry.shot and groups[-1][0].text == entry.text:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    for group in groups:
        known = all(e.embedding is not None for e in group)
        indices = [e.frame_index for e in group]
        new.add([e.frame for e in group], shot=group[0].shot,
                embeddings=torch.stack([e.embedding for e in group]) if known else None,
                frame_indices=indices if all(i is not None for i in indices) else None, text=group[0].text)
    for n in range(5, 0, -1):
        try:
            new.set_last_frames(np.stack(bank.last_frames(n)), shot=bank.last_shot)
            break
        except MemoryBankError:
            continue
    return new


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_rgb(path: Path) -> Optional[np.ndarray]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except OSError:
        return None


def _write_reference_files(folder: Path, manifest: dict, references: list[np.ndarray]) -> None:
    """references/ref_NN.png = the bank's NN-th reference image; a replaced file is kept (renamed) for the
    manifest entries that point at it."""
    for i, frame in enumerate(references):
        name = reference_file(i)
        path = folder / name
        if path.is_file():
            old = _read_rgb(path)
            if old is not None and old.shape == frame.shape and np.array_equal(old, frame):
                continue
            _, digest = frame_key(i, old if old is not None else frame)
            keep = path.with_name(f"{path.stem}-{digest[:8]}{path.suffix}")
            os.replace(path, keep)
            new_name = str(Path(name).with_name(keep.name).as_posix())
            for shot in manifest.get("shots", []):
                for record in shot.get("memory", []):
                    if record.get("file") == name:
                        record["file"] = new_name
        atomic_write_bytes(path, _png(frame))


def _next_edit_id(folder: Path) -> int:
    root = Path(folder) / STUDIO_DIR / EDITS_DIR
    ids = [int(p.name) for p in root.glob("[0-9]*") if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    return max(ids, default=0) + 1


def apply_edit(folder: Path, shot: int, remove: Sequence[str] = (), pin: Sequence[str] = (),
               added: Sequence[tuple[str, np.ndarray]] = ()) -> dict:
    """Edit the bank shot ``shot`` (0-based) is drawn from: remove / pin entries by :class:`BankItem` key, add
    ``(name, image)`` reference images. Saves the bank in place and records the edit; returns the record."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest:
        raise MemoryEditError(f"{folder.name}: no render yet")
    remove, pin = set(remove), set(pin)
    if not (remove or pin or added):
        raise MemoryEditError("nothing to edit: choose frames to remove or pin, or add reference images")
    bank, items = bank_items(folder, shot, manifest)
    by_key = {i.key: i for i in items}
    unknown = sorted((remove | pin) - by_key.keys())
    if unknown:
        raise MemoryEditError(f"memory frames {', '.join(unknown)} are not in the bank any more; reload the page")
    both = sorted(remove & pin)
    if both:
        raise MemoryEditError(f"{', '.join(by_key[k].label for k in both)}: both removed and pinned; choose one")
    for key in pin:
        if by_key[key].kind == "reference":
            raise MemoryEditError(f"{by_key[key].label} is a reference image: it is pinned already")
    bank_folder, after_stem = _bank_folder(folder, manifest, shot)
    try:
        new = _rebuilt(bank, items, remove, pin, [image for _, image in added])
    except MemoryBankError as err:
        raise MemoryEditError(str(err)) from None

    edit_id = _next_edit_id(folder)
    edit_dir = folder / STUDIO_DIR / EDITS_DIR / f"{edit_id:04d}"
    before_sha = bank_hash(folder, after_stem)
    bank.save(edit_dir / "before")
    operations = [{"op": "remove", "entry": by_key[k].describe()} for k in sorted(remove)]
    operations += [{"op": "pin", "entry": by_key[k].describe()} for k in sorted(pin)]
    for name, image in added:
        data = _png(image)
        digest = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(edit_dir / "added" / f"ref-{digest[:12]}.png", data)
        operations.append({"op": "add_reference", "name": Path(name).name,
                           "file": f"{STUDIO_DIR}/{EDITS_DIR}/{edit_id:04d}/added/ref-{digest[:12]}.png",
                           "sha256": digest, "size": [int(image.shape[1]), int(image.shape[0])]})
    new.save(edit_dir / "after")
    new.save(bank_folder)
    _write_reference_files(folder, manifest, [e.frame for e in new.history() if e.is_reference])
    stems = _story_stems(manifest)
    record = {
        "id": edit_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shot": stems[shot], "shot_index": shot, "bank": bank_folder.relative_to(folder).as_posix(),
        "operations": operations,
        "bank_before": {"folder": f"{STUDIO_DIR}/{EDITS_DIR}/{edit_id:04d}/before", "sha256": before_sha},
        "bank_after": {"folder": f"{STUDIO_DIR}/{EDITS_DIR}/{edit_id:04d}/after",
                       "sha256": bank_hash(folder, after_stem)},
        "window_after": [{"kind": e.kind, "shot": e.shot, "frame": e.frame_index} for e in new.entries()],
    }
    atomic_write_json(edit_dir / "edit.json", record)
    manifest["edits"] = [e for e in manifest.get("edits", []) if e.get("id") != edit_id] + [record]
    write_manifest(folder, manifest)
    return record


def list_edits(folder: Path) -> list[dict]:
    """Every recorded edit of the folder, oldest first, each with ``in_effect``: its bank is the one saved now."""
    root = Path(folder) / STUDIO_DIR / EDITS_DIR
    edits = []
    for path in sorted(root.glob("*/edit.json")) if root.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        saved = Path(folder) / record.get("bank", "") / "memory_bank.json"
        record["in_effect"] = saved.is_file() and file_hash(saved) == record.get("bank_after", {}).get("sha256")
        edits.append(record)
    return edits


def sync_manifest_edits(folder: Path, takes_by_stem: Optional[dict] = None) -> None:
    """Put the recorded edits into the manifest (a render from shot 1 starts a new manifest) with the takes drawn
    from each edited bank. Call with the folder's lock held and no render running."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest:
        return
    edits = list_edits(folder)
    for record in edits:
        record.pop("in_effect", None)
        index = (takes_by_stem or {}).get(record.get("shot"), {})
        drawn = [t["take"] for t in index.get("takes", []) if t.get("basis") == record["bank_after"]["sha256"]]
        if drawn:
            record["rendered_takes"] = drawn
    if edits and manifest.get("edits") != edits:
        manifest["edits"] = edits
        write_manifest(folder, manifest)
