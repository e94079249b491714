"""What a render will do, worked out before any model loads: the options resolved and checked, the input images
read, the output folder checked, and - when the folder holds a render - where it resumes.

The folder's ``manifest.json`` (format ``storymem-render``, version 3) lists the finished shots, each with the
settings that decided its pixels and the memory RoPE mode it was rendered with, and (``settings``) the settings of
the latest run. Versions 1 and 2 are migrated by :func:`migrate_manifest` (version 2 recorded the settings once,
for every shot; version 1 also the RoPE mode); any other version is refused. A manifest written before the speed settings were recorded
gets the values its render had (:func:`~storymem.render.speed.fill_legacy_speed_settings`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import models
from .options import RenderError, RenderOptions, check_model_capacity
from .speed import fill_legacy_speed_settings, prepare_speed

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "MANIFEST_VERSION", "OUTPUT_FOLDERS", "OUTPUT_FILES", "RenderPlan",
           "prepare", "read_manifest", "migrate_manifest", "new_manifest", "continued_manifest", "check_memory_rope",
           "now"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "storymem-render"
MANIFEST_VERSION = 3
# What a render writes in its folder besides the manifest (folders of per-shot files, then per-story files).
OUTPUT_FOLDERS = ("shots", "keyframes", "samples", "memory", "references")
OUTPUT_FILES = ("story.mp4", "contact_sheet.png", "index.html")


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
    # --force over a render: its files go once the new manifest is written (a longer story's would stay behind).
    clear_previous: bool = False
    # The --lora adapter's config as its files were checked (None: no adapter, or one still to be downloaded).
    adapter: Any = None

    @property
    def manifest_path(self) -> Path:
        return Path(self.options.out_dir) / MANIFEST_NAME


# ---------------------------------------------------------------------------------------------- manifest
def migrate_manifest(manifest: dict) -> dict:
    """A version-1 or version-2 manifest as version 3 (a new dict; a version-3 one is returned as a copy).

    Version 1 recorded the memory RoPE mode once, in ``runtime.memory_rope``, for the whole render; version 2
    records it per shot (``shots[i].memory_rope``; None for a shot the T2V model drew), so that mode becomes each
    shot's. Version 1 also recorded the ``--memory-rope`` option among the settings (dropped: the per-shot mode is
    what a resume checks) and left four settings out while they had their default values (written out here).
    Version 3 records the settings per shot (``shots[i].settings``), as ``--from-shot`` may have changed them
    halfway; versions 1 and 2 recorded them once, so that record becomes every shot's."""
    migrated = copy.deepcopy(manifest)
    version = migrated.get("version")
    settings = migrated.get("settings")
    shots = migrated.get("shots")
    shots = [shot for shot in shots if isinstance(shot, dict)] if isinstance(shots, list) else []
    if version == 1:
        if isinstance(settings, dict):
            settings.pop("memory_rope", None)
            settings.setdefault("lora_scale", 1.0)
            settings.setdefault("first_shot", "m2v")
            settings.setdefault("memory_guidance", 1.0)
            settings.setdefault("memory_retrieval", {"mode": "window", "min_relevance": 0.0,
                                                     "relative_relevance": 0.0})
        runtime = migrated.get("runtime")
        mode = runtime.get("memory_rope") if isinstance(runtime, dict) else None
        for shot in shots:
            shot.setdefault("memory_rope", None if shot.get("mode") == "t2v" else mode)
    if version in (1, 2):
        for shot in shots:
            shot.setdefault("settings", copy.deepcopy(settings) if isinstance(settings, dict) else {})
    migrated["version"] = MANIFEST_VERSION
    return migrated


def read_manifest(path) -> dict:
    """The render manifest at ``path`` as version 3 (versions 1 and 2 migrated, speed settings they lack filled
    in); a :class:`RenderError` naming the file for an unreadable one, another format or another version."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise RenderError(f"{path}: unreadable render manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise RenderError(f"{path}: not a storymem render manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    version = manifest.get("version")
    if type(version) is int and version in (1, 2):
        return migrate_manifest(fill_legacy_speed_settings(manifest))
    if type(version) is not int or version != MANIFEST_VERSION:
        raise RenderError(f"{path}: render manifest version {json.dumps(version)} is not supported; this storymem "
                          f"reads version {MANIFEST_VERSION} (and migrates versions 1 and 2)")
    return manifest


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
    """The manifest of a render that keeps the first ``start`` finished shots of ``previous`` (each with the
    settings it was rendered with; ``settings`` becomes this run's)."""
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


def _check_writable(out_dir: Path) -> None:
    """Every folder a render replaces files in must be writable (checked before any model loads, so a read-only
    folder is not found after the manifest was cut back)."""
    for name in OUTPUT_FILES + (MANIFEST_NAME,):
        if (out_dir / name).is_dir():
            raise RenderError(f"{out_dir / name}: a folder where the render writes its {name}; move it away")
    for name in OUTPUT_FOLDERS:
        top = out_dir / name
        if top.exists() and not top.is_dir():
            raise RenderError(f"{top}: a file where the render keeps its {name} folder; move it away")
        for folder, _, _ in os.walk(top):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise RenderError(f"{folder}: folder is not writable, and the render replaces files in it; change "
                                  "its permissions or choose another --out")


def _check_output_dir(out_dir: Path, force: bool) -> Optional[dict]:
    """Check the output folder can be written; return its manifest (as version 3) when it holds a render."""
    from ..locking import LOCK_NAME

    if out_dir.exists():
        if not out_dir.is_dir():
            raise RenderError(f"{out_dir}: output path exists and is not a folder")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise RenderError(f"{out_dir}: output folder is not writable")
        manifest_path = out_dir / MANIFEST_NAME
        previous = None
        if manifest_path.exists():
            try:
                previous = read_manifest(manifest_path)
            except RenderError as err:
                if not force:
                    raise RenderError(f"{err}; choose another --out or pass --force to start over in this folder") \
                        from None
        elif any(p.name != LOCK_NAME for p in out_dir.iterdir()) and not force:
            # (a lock file a killed render left behind does not make a folder someone else's)
            raise RenderError(f"{out_dir}: folder is not empty and holds no {MANIFEST_NAME}; choose another --out "
                              "(or pass --force to render into it)")
        _check_writable(out_dir)
        return previous
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RenderError(f"{out_dir}: cannot create the output folder: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RenderError(f"{out_dir}: cannot create the output folder: {parent} is not writable")
    return None


# ---------------------------------------------------------------------------------------------- resume
def _resolve_from_shot(value, story) -> int:
    """--from-shot as a 0-based index: a shot number 1..N (digits only, no sign, no leading zero) or exactly a
    file stem of the story such as 02_01."""
    text = str(value)
    stems = {shot.file_stem: shot.index for shot in story}
    if text in stems:
        return stems[text]
    if not re.fullmatch(r"[1-9][0-9]*", text):
        raise RenderError(f"--from-shot {text!r}: expected a shot number 1..{len(story)} or one of the story's file "
                          f"stems ({story[0].file_stem} .. {story[len(story) - 1].file_stem})")
    number = int(text)
    if number > len(story):
        raise RenderError(f"--from-shot {number}: the story has shots 1..{len(story)}")
    return number - 1


def _diff_settings(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def _story_key(story_dict: dict) -> dict:
    return {k: v for k, v in story_dict.items() if k != "path"}


def _finished_shots(manifest: dict, path: Path) -> list[dict]:
    """The manifest's finished shots whose videos are present: the longest such prefix (a shot whose file has
    gone is rendered again, and so is everything after it)."""
    shots = manifest.get("shots", [])
    if not isinstance(shots, list):
        raise RenderError(f"{path}: field 'shots' is not a list; pass --force to start over")
    finished = []
    for position, entry in enumerate(shots):
        if not isinstance(entry, dict) or entry.get("index") != position:
            raise RenderError(f"{path}: shots[{position}] is not the story's shot {position + 1}; pass --force to "
                              "start over")
        if not (path.parent / str(entry.get("file", ""))).is_file():
            break
        finished.append(entry)
    return finished


def _first_difference(finished: list[dict], story) -> Optional[tuple[int, str]]:
    """(0-based index, what differs) of the first finished shot that is not the story's shot as recorded."""
    for entry in finished:
        index = entry["index"]
        if index >= len(story):
            return index, f"the story has {len(story)} shots, the folder {len(finished)} finished ones"
        shot = story[index]
        for field, new in (("stem", shot.file_stem), ("prompt", shot.prompt), ("cut", shot.cut)):
            if entry.get(field) != new:
                return index, f"{field} {json.dumps(entry.get(field))} -> {json.dumps(new)}"
    return None


def _ways_out(latest: int) -> str:
    """How to go on in a folder whose shots 1..latest-1 may be kept (``latest``: the latest --from-shot)."""
    keep = (f"--from-shot K (K <= {latest}) to keep shots 1..K-1 and render the rest with this story and these "
            "options, or " if latest > 1 else "")
    return f"{keep}--force to start over (or choose another --out)"


def _resume_point(previous: dict, story, options: RenderOptions, from_index: Optional[int],
                  adapter_rope: Optional[str] = None) -> int:
    """The first shot to render in a folder that holds ``previous``; refuses changed settings unless
    ``--from-shot`` or ``--force`` says what to do with the finished shots, and refuses a ``--from-shot`` that
    would keep shots of another story."""
    path = Path(options.out_dir) / MANIFEST_NAME
    if options.force:
        return 0  # nothing of the folder is kept: whatever it holds is no obstacle
    finished = _finished_shots(previous, path)
    difference = _first_difference(finished, story)
    # The latest shot a render may restart at: the first that differs, else the first not finished.
    latest = difference[0] + 1 if difference else min(len(finished) + 1, len(story))
    if from_index is not None:
        if difference is not None and difference[0] < from_index:
            index, what = difference
            raise RenderError(f"--from-shot {options.from_shot}: shot {index + 1} of {path.parent} is not this "
                              f"story's ({what}), so keeping it would mix two stories; {_ways_out(latest)}")
        if from_index > len(finished):
            raise RenderError(f"--from-shot {options.from_shot}: only {len(finished)} shot(s) of {path} are "
                              f"finished; the render can restart at shot {len(finished) + 1} at the latest")
        return from_index
    # A resume continues the last finished shot: its own record is what this run must match.
    recorded = finished[-1].get("settings", {}) if finished else previous.get("settings", {})
    diffs = _diff_settings(recorded, options.settings())
    if difference is not None:
        diffs.insert(0, f"story: shot {difference[0] + 1}: {difference[1]}")
    elif _story_key(previous.get("story", {})) != _story_key(story.to_dict()):
        diffs.insert(0, "story: its name, overview, first-frame prompts or shots not rendered yet differ")
    if diffs:
        raise RenderError(f"{path} was rendered with other settings ({'; '.join(diffs)}); rerun with the same "
                          f"options to resume, {_ways_out(latest)}")
    # The mode of the shots still to render, where it is known before a model loads (else the renderer checks
    # once the adapter is loaded, before it writes anything).
    check_memory_rope(path, finished, options.memory_rope or adapter_rope)
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


def prepare(story, options: RenderOptions, selector=None, pipe=None) -> RenderPlan:
    """Resolve and validate everything (no model loads, nothing written) and work out where the render starts.

    Besides the options and the story: the input images are read, the ``--lora`` adapter's files are read and
    checked, the sizes are checked against the base's RoPE table where its config can be read, offline the
    weights to be downloaded are named, and the output folder is checked (writable, resumable).

    ``selector``: a :class:`~storymem.memory.KeyframeSelector` to use (e.g. one shared by several renders);
    default: built from the options when the memory takes keyframes. ``pipe``: the already loaded pipeline the
    render will use (then ``--base`` and ``--lora`` are not looked at: the renderer checks the sizes against
    that pipeline's model)."""
    from .parallel import check_parallel

    options = options.resolved()
    options.validate()
    first_image = _read_image(Path(options.first_image), "--first-image") if options.first_image else None
    references = [_read_image(Path(p), "--reference-images entry") for p in options.reference_images]
    size_from = None
    if options.height is None:
        image = first_image if first_image is not None else (references[0] if references else None)
        height, width = _default_size(options, image)
        options = dataclasses.replace(options, height=height, width=width)
        size_from = f"--area {options.area}"
        check_parallel(options)  # the token split needs the size
    if selector is None and options.memory_source == "keyframes":
        selector = models.build_selector(options)
    models.check_downloads(options, selector, models_given=pipe is not None)
    adapter = models.check_adapter(options) if pipe is None else None
    adapter_rope = adapter.memory_rope if adapter is not None else None
    _check_adapter_fit(options, adapter)
    configs = models.base_transformer_configs(options.base) if pipe is None else None
    for config in (configs or {}).values():
        if config is not None:
            check_model_capacity(options, config.get("rope_max_seq_len", 1024),
                                 tuple(config.get("patch_size", (1, 2, 2))),
                                 memory_rope=options.memory_rope or adapter_rope or "negative",
                                 model=f"--base {options.base}", size_from=size_from,
                                 memory_stride=adapter.memory_rope_stride if adapter is not None else None)
    speed = prepare_speed(options)  # distill LoRA files checked key by key, still before any model loads

    out_dir = Path(options.out_dir)
    previous = _check_output_dir(out_dir, options.force)
    from_index = _resolve_from_shot(options.from_shot, story) if options.from_shot is not None else None
    start, bank = 0, None
    if previous is not None:
        start = _resume_point(previous, story, options, from_index, adapter_rope)
        if start > 0:
            bank = _restore_bank(out_dir, story[start - 1], options)
    elif from_index is not None and from_index > 0:
        raise RenderError(f"--from-shot {options.from_shot}: {out_dir} holds no finished render to continue")
    return RenderPlan(story=story, options=options, start=start, previous=previous, bank=bank,
                      first_image=first_image, references=references, selector=selector,
                      resuming=previous is not None and from_index is None and not options.force,
                      clear_previous=options.force and previous is not None, adapter=adapter,
                      speed=speed)


def _check_adapter_fit(options: RenderOptions, adapter) -> None:
    """What the checked adapter's conditioning asks of the options (else found only once it is loaded)."""
    if adapter is None:
        return
    from ..defaults import MOTION_FRAMES

    mm2v = options.continuation == "mm2v" or options.continuation == "auto" and adapter.conditioning == "mm2v"
    if mm2v and options.frames < MOTION_FRAMES + 4:
        raise RenderError(f"--frames {options.frames}: the adapter continues shots with MM2V, which drops "
                          f"{MOTION_FRAMES} frames; use at least {MOTION_FRAMES + 4}")
