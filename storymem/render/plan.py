"""What a render will do, worked out before any model loads: the options resolved and checked, the input images
read, the output folder checked, and - when the folder holds a render - where it resumes.

The folder's ``manifest.json`` (format ``storymem-render``, version 2) lists the settings that decide the pixels
and the finished shots, each with the memory RoPE mode it was rendered with. A version-1 manifest (one RoPE mode
recorded for the whole render) is migrated by :func:`migrate_manifest_v1`; any other version is refused. A
manifest written before the speed settings were recorded gets the values its render had
(:func:`~storymem.render.speed.fill_legacy_speed_settings`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import models
from .options import RenderError, RenderOptions
from .speed import fill_legacy_speed_settings, prepare_speed

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "MANIFEST_VERSION", "RenderPlan", "prepare", "read_manifest",
           "migrate_manifest_v1", "new_manifest", "continued_manifest", "check_memory_rope", "now"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "storymem-render"
MANIFEST_VERSION = 2


@dataclass
class RenderPlan:
    """What a validated render will do (built before any model loads)."""

    story: Any
    options: RenderOptions  # resolved, with the size decided
    start: int  # first shot to render (0-based)
    previous: Optional[dict]  # the existing manifest (as version 2), when continuing one
    bank: Any  # the memory bank restored for `start` (None: build a fresh one)
    first_image: Optional[np.ndarray]
    references: list[np.ndarray]
    selector: Any
    # Continuing the recorded shots as they are (no --from-shot, no --force): the shots still to render must
    # use the memory RoPE mode the finished ones were rendered with.
    resuming: bool = False
    speed: Any = None  # storymem.render.speed.RenderSpeed: the speed options prepared (default: when it runs)

    @property
    def manifest_path(self) -> Path:
        return Path(self.options.out_dir) / MANIFEST_NAME


# ---------------------------------------------------------------------------------------------- manifest
def migrate_manifest_v1(manifest: dict) -> dict:
    """A version-1 manifest as version 2 (a new dict).

    Version 1 recorded the memory RoPE mode once, in ``runtime.memory_rope``, for the whole render; version 2
    records it per shot (``shots[i].memory_rope``; None for a shot the T2V model drew), so that mode becomes each
    shot's. Version 1 also recorded the ``--memory-rope`` option among the settings (dropped: the per-shot mode is
    what a resume checks) and left four settings out while they had their default values (written out here)."""
    migrated = copy.deepcopy(manifest)
    settings = migrated.get("settings")
    if isinstance(settings, dict):
        settings.pop("memory_rope", None)
        settings.setdefault("lora_scale", 1.0)
        settings.setdefault("first_shot", "m2v")
        settings.setdefault("memory_guidance", 1.0)
        settings.setdefault("memory_retrieval", {"mode": "window", "min_relevance": 0.0, "relative_relevance": 0.0})
    runtime = migrated.get("runtime")
    mode = runtime.get("memory_rope") if isinstance(runtime, dict) else None
    shots = migrated.get("shots")
    if isinstance(shots, list):
        for shot in shots:
            if isinstance(shot, dict):
                shot.setdefault("memory_rope", None if shot.get("mode") == "t2v" else mode)
    migrated["version"] = MANIFEST_VERSION
    return migrated


def read_manifest(path) -> dict:
    """The render manifest at ``path`` as version 2 (a version-1 one migrated); a :class:`RenderError` naming the
    file for an unreadable one, another format or another version. Speed settings it lacks are filled in."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise RenderError(f"{path}: unreadable render manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise RenderError(f"{path}: not a storymem render manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    version = manifest.get("version")
    if type(version) is int and version == 1:
        manifest = migrate_manifest_v1(manifest)
    elif type(version) is not int or version != MANIFEST_VERSION:
        raise RenderError(f"{path}: render manifest version {json.dumps(version)} is not supported; this storymem "
                          f"reads version {MANIFEST_VERSION} (and migrates version 1)")
    return fill_legacy_speed_settings(manifest)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("storymem", "torch", "diffusers", "transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if out["storymem"] is None:
        from .. import __version__

        out["storymem"] = __version__
    return out


def _story_record(story) -> dict:
    record = story.to_dict()
    record["path"] = str(Path(story.path).resolve()) if story.path else None
    return record


def new_manifest(story, options: RenderOptions) -> dict:
    """The manifest of a render that starts at shot 1 (no shot finished yet)."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": now(),
        "updated": now(),
        "story": _story_record(story),
        "num_shots": len(story),
        "settings": options.settings(),
        "runtime": {},
        "versions": _versions(),
        "references": [{"id": f"ref_{i:02d}", "file": f"references/ref_{i:02d}.png", "source": str(p)}
                       for i, p in enumerate(options.reference_images)],
        "outputs": {"story_video": "story.mp4", "contact_sheet": "contact_sheet.png", "index": "index.html"},
        "shots": [],
        "finished": False,
        "timings": {},
    }


def continued_manifest(previous: dict, start: int, story, options: RenderOptions) -> dict:
    """The manifest of a render that keeps the first ``start`` finished shots of ``previous``."""
    return dict(previous, version=MANIFEST_VERSION, shots=list(previous["shots"][:start]),
                settings=options.settings(), story=_story_record(story), versions=_versions(), finished=False)


def _shot_span(numbers: list[int]) -> str:
    if len(numbers) == 1:
        return f"shot {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"shots {numbers[0]}-{numbers[-1]}"
    return "shots " + ", ".join(map(str, numbers))


def check_memory_rope(path: Path, finished: list[dict], mode: Optional[str]) -> None:
    """Refuse to continue ``finished`` shots (manifest entries) with another memory RoPE mode than the one the
    last of them was rendered with: the story would change its memory layout halfway, silently."""
    recorded = [(entry["index"] + 1, entry.get("memory_rope")) for entry in finished if entry.get("memory_rope")]
    if mode is None or not recorded or recorded[-1][1] == mode:
        return
    before = recorded[-1][1]
    span = _shot_span([number for number, value in recorded if value == before])
    raise RenderError(f"{path}: memory_rope: {span} were rendered with {before!r}, this run would use {mode!r}; "
                      f"pass --memory-rope {before} to resume, --from-shot K to re-render from shot K with "
                      f"{mode!r}, or --force to start over")


# ---------------------------------------------------------------------------------------------- inputs
def _read_image(path: Path, what: str) -> np.ndarray:
    """An RGB uint8 image, or a RenderError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise RenderError(f"{path}: {what} not found")
    if not path.is_file():
        raise RenderError(f"{path}: {what} is not a file")
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise RenderError(f"{path}: cannot read {what} ({err})") from None


def _default_size(options: RenderOptions, image: Optional[np.ndarray]) -> tuple[int, int]:
    from ..defaults import HEIGHT, WIDTH
    from ..pipeline import size_from_area

    aspect = image.shape[0] / image.shape[1] if image is not None else HEIGHT / WIDTH
    return size_from_area(aspect, area=options.area, multiple=16)


def _check_output_dir(out_dir: Path, force: bool) -> Optional[dict]:
    """Check the output folder can be written; return its manifest (as version 2) when it holds a render."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise RenderError(f"{out_dir}: output path exists and is not a folder")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise RenderError(f"{out_dir}: output folder is not writable")
        manifest_path = out_dir / MANIFEST_NAME
        if manifest_path.exists():
            try:
                return read_manifest(manifest_path)
            except RenderError as err:
                if force:
                    return None
                raise RenderError(f"{err}; choose another --out or pass --force to start over in this folder") \
                    from None
        if any(out_dir.iterdir()) and not force:
            raise RenderError(f"{out_dir}: folder is not empty and holds no {MANIFEST_NAME}; choose another --out "
                              "(or pass --force to render into it)")
        return None
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RenderError(f"{out_dir}: cannot create the output folder: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RenderError(f"{out_dir}: cannot create the output folder: {parent} is not writable")
    return None


# ---------------------------------------------------------------------------------------------- resume
def _resolve_from_shot(value: str, story) -> int:
    """--from-shot as a 0-based index: a 1-based shot number or a file stem like 02_01."""
    text = str(value).strip()
    stems = {shot.file_stem: shot.index for shot in story}
    if text in stems:
        return stems[text]
    try:
        number = int(text)
    except ValueError:
        raise RenderError(f"--from-shot {value!r}: expected a shot number 1..{len(story)} or a file stem "
                          f"such as {story[0].file_stem}") from None
    if not 1 <= number <= len(story):
        raise RenderError(f"--from-shot {number}: the story has shots 1..{len(story)}")
    return number - 1


def _diff_settings(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def _story_key(story_dict: dict) -> dict:
    return {k: v for k, v in story_dict.items() if k != "path"}


def _finished_shots(manifest: dict, path: Path, story) -> list[dict]:
    """The manifest's finished shots whose videos are present: the longest such prefix of the story (a shot
    whose file has gone is rendered again, and so is everything after it)."""
    shots = manifest.get("shots", [])
    if not isinstance(shots, list):
        raise RenderError(f"{path}: field 'shots' is not a list; pass --force to start over")
    finished = []
    for position, entry in enumerate(shots):
        if not isinstance(entry, dict) or entry.get("index") != position or position >= len(story):
            raise RenderError(f"{path}: shots[{position}] is not shot {position + 1} of the story; pass --force to "
                              "start over")
        if not (path.parent / str(entry.get("file", ""))).is_file():
            break
        finished.append(entry)
    return finished


def _resume_point(previous: dict, story, options: RenderOptions, from_index: Optional[int]) -> int:
    """The first shot to render in a folder that holds ``previous``; refuses changed settings unless
    ``--from-shot`` or ``--force`` says what to do with the finished shots."""
    path = Path(options.out_dir) / MANIFEST_NAME
    finished = _finished_shots(previous, path, story)
    if from_index is not None:
        if from_index > len(finished):
            raise RenderError(f"--from-shot {options.from_shot}: only {len(finished)} shot(s) of {path} are "
                              f"finished; the render can restart at shot {len(finished) + 1} at the latest")
        return from_index
    if options.force:
        return 0
    diffs = _diff_settings(previous.get("settings", {}), options.settings())
    if _story_key(previous.get("story", {})) != _story_key(story.to_dict()):
        diffs.insert(0, "story: the shots (prompts, cuts or scenes) differ")
    if diffs:
        raise RenderError(f"{path} was rendered with other settings:\n  " + "\n  ".join(diffs) +
                          "\nrerun with the same options to resume, --from-shot K to re-render from shot K with "
                          "these options, or --force to start over")
    # The mode of the shots still to render, where it is known before a model loads (else the renderer checks
    # once the adapter is loaded, before it writes anything).
    check_memory_rope(path, finished, options.memory_rope or models.adapter_memory_rope(options.lora))
    return len(finished)


def _restore_bank(out_dir: Path, shot, options: RenderOptions):
    """The memory bank saved after ``shot``, seen through the options' window."""
    from ..memory import MemoryBank, MemoryBankError

    try:
        bank = MemoryBank.load(out_dir / "memory" / f"after_{shot.file_stem}")
    except MemoryBankError as err:
        raise RenderError(f"cannot restore the memory saved after shot {shot.file_stem}: {err}") from None
    if (bank.max_memory, bank.sink) != (options.max_memory, options.sink):
        # --from-shot with a new window: the restored history is viewed through it from here on.
        if bank.num_references > options.max_memory:
            raise RenderError(f"--max-memory {options.max_memory}: the render's {bank.num_references} reference "
                              "images do not fit")
        bank.max_memory, bank.sink = options.max_memory, options.sink
    return bank


def prepare(story, options: RenderOptions, selector=None) -> RenderPlan:
    """Resolve and validate everything (no model loads, nothing written) and work out where the render starts.

    ``selector``: a :class:`~storymem.memory.KeyframeSelector` to use (e.g. one shared by several renders);
    default: built from the options when the memory takes keyframes."""
    from .parallel import check_parallel

    options = options.resolved()
    options.validate()
    first_image = _read_image(Path(options.first_image), "--first-image") if options.first_image else None
    references = [_read_image(Path(p), "--reference-images entry") for p in options.reference_images]
    if options.height is None:
        image = first_image if first_image is not None else (references[0] if references else None)
        height, width = _default_size(options, image)
        options = dataclasses.replace(options, height=height, width=width)
        check_parallel(options)  # the token split needs the size
    if selector is None and options.memory_source == "keyframes":
        selector = models.build_selector(options)
    speed = prepare_speed(options)  # distill LoRA files checked key by key, still before any model loads

    out_dir = Path(options.out_dir)
    previous = _check_output_dir(out_dir, options.force)
    from_index = _resolve_from_shot(options.from_shot, story) if options.from_shot is not None else None
    start, bank = 0, None
    if previous is not None:
        start = _resume_point(previous, story, options, from_index)
        if start > 0:
            bank = _restore_bank(out_dir, story[start - 1], options)
    elif from_index is not None and from_index > 0:
        raise RenderError(f"--from-shot {options.from_shot}: {out_dir} holds no finished render to continue")
    return RenderPlan(story=story, options=options, start=start, previous=previous, bank=bank,
                      first_image=first_image, references=references, selector=selector,
                      resuming=previous is not None and from_index is None and not options.force, speed=speed)
