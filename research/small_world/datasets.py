"""Toy-world data on disk: clustered single-shot training clips and held-out story scripts with their ground
truth.

**Training clips** (:func:`make_clip_dataset`): ``num_identities`` characters, ``clips_per_identity`` clips
each (different scenes and motions); the clips of one character form one group, the cluster that
``train_lora.py prepare`` pairs targets with memory frames from. Layout::

    out_dir/
      clips/<group>/<group>_NN.mp4    H.264 clips
      clips/<group>/<group>_NN.txt    their captions (so ``--clips out_dir/clips`` works too)
      masks/<group>/<group>_NN.mp4    with ``subject_masks``: white where the character is
      manifest.jsonl                  {"file", "caption", "group"[, "mask"]} per clip: ``prepare --manifest``
      labels.jsonl                    {"file", "group", "identity", "character", "clip", "caption_mode"}
      dataset.json                    the generation settings and the identities

**Stories** (:func:`make_story`, :func:`make_story_set`): ST-Bench-form scripts in which a main character
appears (and is continued with ``cut: false``), another character takes over for a scene, and the main
character returns; the ground truth says which identity every shot should show and holds the
:class:`~research.small_world.world.ClipSpec` that renders a reference version of the shot. Layout::

    out_dir/
      stories/story_NNN.json          the scripts (``infer_story.py --story``)
      truth/story_NNN.json            per-shot ground truth
      index.json                      one entry per story

Everything is a function of the seed; outputs are written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from storymem.atomic import atomic_write_json, atomic_write_text

from .world import (
    BACKGROUNDS,
    MOTIONS,
    Character,
    ClipSpec,
    Motion,
    Scene,
    WorldError,
    compatible_together,
    first_frame_caption,
)

__all__ = [
    "ClipDataset",
    "ClipRecord",
    "DatasetError",
    "ToyStory",
    "make_clip_dataset",
    "make_story",
    "make_story_set",
    "read_labels",
    "render_story_truth",
]


class DatasetError(ValueError):
    """Bad settings for a toy dataset, or an output folder that holds a different one."""


# ---------------------------------------------------------------------------------------------- clips
@dataclass(frozen=True)
class ClipRecord:
    """One written clip: its file (relative to the dataset folder), caption, group and what it shows."""

    file: str
    caption: str
    group: str
    character: Character
    spec: ClipSpec
    caption_mode: str
    mask: Optional[str] = None  # the subject mask video, relative to the dataset folder

    @property
    def identity(self) -> str:
        return self.character.key

    def manifest_entry(self) -> dict:
        entry = {"file": self.file, "caption": self.caption, "group": self.group}
        if self.mask is not None:
            entry["mask"] = self.mask
        return entry

    def label_entry(self) -> dict:
        return {"file": self.file, "group": self.group, "identity": self.identity,
                "character": self.character.to_dict(), "clip": self.spec.to_dict(), "caption_mode": self.caption_mode}


@dataclass
class ClipDataset:
    """What :func:`make_clip_dataset` wrote."""

    root: Path
    records: list[ClipRecord]
    identities: list[Character]
    rendered: int = 0  # clips rendered by this call (the others already existed)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def labels(self) -> Path:
        return self.root / "labels.jsonl"

    def groups(self) -> dict[str, list[ClipRecord]]:
        out: dict[str, list[ClipRecord]] = {}
        for record in self.records:
            out.setdefault(record.group, []).append(record)
        return out


def _check_positive(name: str, value, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DatasetError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_frame_size(height, width):
    _check_positive("height", height, 16)
    _check_positive("width", width, 16)
    if height % 2 or width % 2:
        raise DatasetError(f"height and width must be even (H.264 yuv420p), got {height}x{width} (H x W)")


def _distinct_characters(rng: np.random.Generator, count: int, exclude: Sequence) -> list[Character]:
    """``count`` different characters, none in ``exclude``, spreading every attribute value evenly."""
    from .world import ACCESSORIES, COLOURS, PATTERNS, SHAPES

    excluded = {c.key if isinstance(c, Character) else str(c) for c in exclude}
    total = len(SHAPES) * len(COLOURS) * len(PATTERNS) * len(ACCESSORIES)
    if count > total - len(excluded):
        raise DatasetError(f"asked for {count} identities, but the world has only {total - len(excluded)} left")

    def cycle(values):  # each value once per round, in a fresh order every round
        while True:
            yield from (values[i] for i in rng.permutation(len(values)))

    shapes, colours, patterns, accessories = (cycle(v) for v in (SHAPES, list(COLOURS), PATTERNS, ACCESSORIES))
    chosen: list[Character] = []
    seen = set(excluded)
    attempts = 0
    while len(chosen) < count:
        character = Character(next(shapes), next(colours), next(patterns), next(accessories))
        attempts += 1
        if character.key in seen:
            if attempts > 50 * count:  # the balanced cycles got stuck on taken combinations
                character = Character.random(rng, exclude=list(seen))
            else:
                continue
        seen.add(character.key)
        chosen.append(character)
    return chosen


def _caption_mode(rng: np.random.Generator, referential_prob: float) -> str:
    if rng.random() >= referential_prob:
        return "first"
    return "same" if rng.random() < 0.5 else "named"


def _render_and_write(job: tuple) -> str:
    """Worker: render one clip and write its mp4 (atomic), caption and, if asked, subject mask video."""
    path, spec_dict, caption, num_frames, height, width, fps, crf, mask_path = job
    from storymem.video import write_video

    spec = ClipSpec.from_dict(spec_dict)
    if mask_path is None:
        frames = spec.render(num_frames, height, width)
    else:
        frames, mask = spec.render(num_frames, height, width, with_mask=True)
        write_video(mask_path, np.repeat(mask[..., None], 3, axis=-1).astype(np.uint8) * 255, fps=fps, crf=crf)
    write_video(path, frames, fps=fps, crf=crf)
    atomic_write_text(Path(path).with_suffix(".txt"), caption + "\n")
    return path


def make_clip_dataset(
    out_dir: str | os.PathLike,
    num_identities: int,
    clips_per_identity: int = 16,
    num_frames: int = 81,
    height: int = 480,
    width: int = 832,
    seed: int = 0,
    fps: float = 16.0,
    crf: int = 18,
    referential_prob: float = 0.25,
    exclude: Sequence[Character | str] = (),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    scenes_per_identity: Optional[int] = None,
    subject_masks: bool = False,
) -> ClipDataset:
    """Write clustered single-shot training clips of toy characters (see the module docstring for the layout).

    Each identity gets ``clips_per_identity`` clips in different scenes (backgrounds cycle through all of
    them) with random motions; its clips form one group. With ``scenes_per_identity`` = k, an identity's clips
    share k scenes instead (background and props; clip i in scene i mod k), as shots cut from one longer video
    do: memory drawn from a sibling in the same scene shows the character against the target's background,
    elsewhere in the frame. Captions introduce the character
    ("a red striped circle with a hat walks into the desert near a rock"); a share ``referential_prob`` of
    them refer to it instead ("the same character ..." or "the red striped circle with the hat ..."), as
    later shots of a story do. ``exclude`` keeps identities out (e.g. those of held-out stories).

    Running it again with the same settings keeps the clips already written (an interrupted run resumes);
    different settings in a folder that holds a dataset raise :class:`DatasetError` unless ``overwrite``.
    ``workers`` > 1 renders and encodes clips in that many processes. ``subject_masks`` also writes, per
    clip, a video of where the character is (the world knows what it drew), listed as the manifest's
    ``mask`` for ``train_lora.py train --subject-loss-weight``.
    """
    _check_positive("num_identities", num_identities)
    _check_positive("clips_per_identity", clips_per_identity)
    _check_positive("num_frames", num_frames)
    _check_frame_size(height, width)
    _check_positive("workers", workers)
    if scenes_per_identity is not None:
        _check_positive("scenes_per_identity", scenes_per_identity)
    if not 0.0 <= referential_prob <= 1.0:
        raise DatasetError(f"referential_prob must be in [0, 1], got {referential_prob!r}")
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise DatasetError(f"fps must be a positive number, got {fps!r}")
    root = Path(out_dir)
    settings = {"kind": "storymem-toy-clips", "num_identities": int(num_identities),
                "clips_per_identity": int(clips_per_identity), "num_frames": int(num_frames), "height": int(height),
                "width": int(width), "seed": int(seed), "fps": float(fps), "crf": int(crf),
                "referential_prob": float(referential_prob),
                "scenes_per_identity": None if scenes_per_identity is None else int(scenes_per_identity),
                "exclude": sorted(c.key if isinstance(c, Character) else str(c) for c in exclude)}
    if subject_masks:  # only when set: folders written before masks existed keep their settings
        settings["subject_masks"] = True
    info_path = root / "dataset.json"
    if info_path.exists() and not overwrite:
        try:
            previous = json.loads(info_path.read_text(encoding="utf-8")).get("settings", {})
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetError(f"{info_path}: unreadable ({err}); pass overwrite=True to replace it") from None
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            raise DatasetError(f"{root} holds a toy clip dataset made with other settings ({', '.join(changed)}); "
                               "pass overwrite=True to replace it, or use another folder")

    rng = np.random.default_rng(seed)
    identities = _distinct_characters(rng, num_identities, exclude)
    records: list[ClipRecord] = []
    for number, character in enumerate(identities):
        group = f"id{number:04d}-{character.key}"
        backgrounds = [BACKGROUNDS[i] for i in rng.permutation(len(BACKGROUNDS))]
        scenes = None
        if scenes_per_identity is not None:
            scenes = [Scene.random(rng, backgrounds[k % len(backgrounds)]) for k in range(scenes_per_identity)]
        for k in range(clips_per_identity):
            if scenes is None:
                spec = ClipSpec.random(rng, character, background=backgrounds[k % len(backgrounds)])
            else:
                spec = ClipSpec.random(rng, character, scene=scenes[k % len(scenes)])
            mode = _caption_mode(rng, referential_prob)
            file = f"clips/{group}/{group}_{k:02d}.mp4"
            mask = f"masks/{group}/{group}_{k:02d}.mp4" if subject_masks else None
            records.append(ClipRecord(file, spec.caption(mode), group, character, spec, mode, mask))

    atomic_write_json(info_path, {"settings": settings, "complete": False,
                                  "identities": [c.key for c in identities]})
    jobs = []
    for record in records:
        path = root / record.file
        mask = None if record.mask is None else root / record.mask
        done = path.is_file() and path.with_suffix(".txt").is_file() and (mask is None or mask.is_file())
        if overwrite or not done:
            jobs.append((str(path), record.spec.to_dict(), record.caption, int(num_frames), int(height), int(width),
                         float(fps), int(crf), None if mask is None else str(mask)))
    _run_jobs(jobs, workers, progress)

    atomic_write_text(root / "manifest.jsonl", "".join(json.dumps(r.manifest_entry()) + "\n" for r in records))
    atomic_write_text(root / "labels.jsonl", "".join(json.dumps(r.label_entry()) + "\n" for r in records))
    atomic_write_json(info_path, {"settings": settings, "complete": True, "identities": [c.key for c in identities],
                                  "clips": len(records)})
    return ClipDataset(root=root, records=records, identities=identities, rendered=len(jobs))


def _run_jobs(jobs: list, workers: int, progress: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="toy clips", disable=not progress)
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                _render_and_write(job)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_render_and_write, jobs, chunksize=4):
                    bar.update()
    finally:
        bar.close()


def read_labels(path: str | os.PathLike) -> list[dict]:
    """The entries of a ``labels.jsonl``, with ``character`` and ``clip`` as world objects."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entry["character"] = Character.from_dict(entry["character"])
            entry["clip"] = ClipSpec.from_dict(entry["clip"])
        except (json.JSONDecodeError, KeyError, TypeError, WorldError) as err:
            raise DatasetError(f"{path}:{number}: not a toy clip label ({type(err).__name__}: {err})") from None
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------- stories
@dataclass
class ToyStory:
    """A generated story: the ST-Bench-form ``script`` and its ``truth``.

    ``truth`` holds ``characters`` (role -> character), ``shots`` (per shot: ``index``, ``scene_num``,
    ``shot_in_scene``, ``cut``, ``role``, ``identity`` key, ``character``, ``caption_mode`` and the ``clip``
    spec that renders a reference version) and ``returns`` (indices of the shots where the main character
    comes back after another character's shots).
    """

    script: dict
    truth: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.script["story_name"]

    def expected_identities(self) -> list[str]:
        """The identity key each shot should show, in story order."""
        return [shot["identity"] for shot in self.truth["shots"]]

    def clip_specs(self) -> list[ClipSpec]:
        return [ClipSpec.from_dict(shot["clip"]) for shot in self.truth["shots"]]


def _blocks(rng: np.random.Generator, num_shots: int) -> list[tuple[str, int]]:
    """Scene blocks (role, number of shots): main (2-3 shots), other (1-2), then main and other alternate in
    blocks of 1-3 shots until ``num_shots``."""
    first = 2 if num_shots < 7 else int(rng.integers(2, 4))
    blocks = [("main", first), ("other", int(rng.integers(1, 3)))]
    left = num_shots - sum(size for _, size in blocks)
    role = "main"
    while left > 0:
        size = min(left, int(rng.integers(1, 4)))
        blocks.append((role, size))
        left -= size
        role = "other" if role == "main" else "main"
    return blocks


def make_story(seed: int, num_shots: int = 6, exclude: Sequence[Character | str] = (),
               main: Optional[Character] = None, other: Optional[Character] = None) -> ToyStory:
    """A story script of ``num_shots`` (>= 6) shots and its ground truth (see :class:`ToyStory`).

    A main character appears (first shot; the next shot continues it with ``cut: false``), another character
    takes over for a scene, the main character returns in a new scene, and the two alternate after that.
    Each scene is a new background; inside a scene, shots mostly continue the previous one (``cut: false``,
    the character picks up where it was). ``exclude`` keeps identities out of the story (e.g. the training
    identities, for held-out evaluation); ``main``/``other`` fix the characters.
    """
    _check_positive("num_shots", num_shots, 6)
    rng = np.random.default_rng(seed)
    excluded = [c.key if isinstance(c, Character) else str(c) for c in exclude]
    main = main or Character.random(rng, exclude=excluded)
    if other is None:
        for _ in range(10_000):
            other = Character.random(rng, exclude=excluded + [main.key])
            if compatible_together(main, other) and other.shape != main.shape:
                break
        else:  # pragma: no cover - the world has far more characters than this needs
            raise DatasetError("found no second character that differs enough from the main one")
    if main.key == other.key:
        raise DatasetError(f"main and other character are the same ({main.key})")
    cast = {"main": main, "other": other}

    scenes, shots = [], []
    introduced: set[str] = set()
    last_role: Optional[str] = None
    backgrounds: list[str] = []
    for scene_num, (role, size) in enumerate(_blocks(rng, num_shots), start=1):
        character = cast[role]
        choices = [b for b in BACKGROUNDS if b not in backgrounds[-2:]]
        scene = Scene.random(rng, choices[int(rng.integers(len(choices)))])
        backgrounds.append(scene.background)
        prompts, first_frames, cuts = [], [], []
        motion: Optional[Motion] = None
        clip_seed = int(rng.integers(2 ** 31))
        for k in range(size):
            last = k == size - 1
            # The first scene's second shot always continues the first: every story has a continuation.
            cut = k == 0 or (not (scene_num == 1 and k == 1) and rng.random() < 0.3)
            kinds = tuple(m for m in MOTIONS if m not in ("enter", "leave")) + (("leave",) if last else ())
            if cut:
                if k > 0:
                    clip_seed = int(rng.integers(2 ** 31))
                first_kinds = ("enter", "enter") + kinds if k == 0 else kinds
                motion = Motion.random(rng, kinds=first_kinds)
            else:
                motion = Motion.random(rng, start_x=round(motion.end_x, 3), kinds=kinds)
            if role not in introduced:
                mode = "first"
            elif k == 0 and last_role is not None and last_role != role:
                mode = "returns"
            elif not cut:
                mode = "same"
            else:
                mode = "named"
            spec = ClipSpec((character,), scene, (motion,), seed=clip_seed)
            prompts.append(spec.caption(mode))
            if mode == "same":
                first_frames.append(f"the same character {scene.style.where}"
                                    + (f" near a {scene.landmark}" if scene.landmark else ""))
            else:
                first_frames.append(first_frame_caption(character, scene, definite=mode != "first"))
            cuts.append(bool(cut))
            shots.append({"index": len(shots), "scene_num": scene_num, "shot_in_scene": k, "cut": bool(cut),
                          "role": role, "identity": character.key, "character": character.to_dict(),
                          "caption_mode": mode, "prompt": prompts[-1], "clip": spec.to_dict()})
            introduced.add(role)
        # A continuation after a "leave" would start off screen: the motion chooser only leaves on a scene's
        # last shot, and the next scene starts with a cut.
        scenes.append({"scene_num": scene_num, "video_prompts": prompts, "first_frame_prompt": first_frames,
                       "cut": cuts})
        last_role = role

    returns = [s["index"] for s in shots if s["role"] == "main" and s["caption_mode"] == "returns"]
    style = {b: Scene(b).style for b in backgrounds[:3]}
    # No punctuation: the toy tokenizer knows words only.
    overview = (f"{main.description()} appears {style[backgrounds[0]].where} then {other.description()} appears "
                f"{style[backgrounds[1]].where} and then {main.description(definite=True)} returns "
                f"{style[backgrounds[2]].where}")
    name = f"the {main.colour} {main.shape} and the {other.colour} {other.shape}"
    script = {"story_name": name, "story_overview": overview, "scenes": scenes}
    truth = {"story_name": name, "seed": int(seed), "characters": {r: c.to_dict() for r, c in cast.items()},
             "identities": {r: c.key for r, c in cast.items()}, "returns": returns, "shots": shots}
    return ToyStory(script=script, truth=truth)


def make_story_set(out_dir: str | os.PathLike, count: int = 20, seed: int = 0, num_shots: int = 6,
                   max_shots: Optional[int] = None, exclude: Sequence[Character | str] = ()) -> list[Path]:
    """Write ``count`` stories (scripts, ground truth and an index; see the module docstring). Story ``i`` has
    between ``num_shots`` and ``max_shots`` shots and a main character no other story of the set uses.
    Returns the script paths."""
    _check_positive("count", count)
    _check_positive("num_shots", num_shots, 6)
    max_shots = num_shots if max_shots is None else max_shots
    if not isinstance(max_shots, int) or max_shots < num_shots:
        raise DatasetError(f"max_shots must be an integer >= num_shots ({num_shots}), got {max_shots!r}")
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    excluded = [c.key if isinstance(c, Character) else str(c) for c in exclude]
    mains: list[str] = []
    index: list[dict[str, Any]] = []
    paths = []
    for i in range(count):
        story_seed = int(rng.integers(2 ** 31))
        shots = int(rng.integers(num_shots, max_shots + 1))
        main = Character.random(np.random.default_rng(story_seed), exclude=excluded + mains)
        story = make_story(story_seed, shots, exclude=excluded, main=main)
        mains.append(main.key)
        stem = f"story_{i:03d}"
        script_path = atomic_write_json(root / "stories" / f"{stem}.json", story.script)
        atomic_write_json(root / "truth" / f"{stem}.json", story.truth)
        paths.append(script_path)
        index.append({"name": story.name, "story": f"stories/{stem}.json", "truth": f"truth/{stem}.json",
                      "seed": story_seed, "num_shots": shots, "identities": story.truth["identities"],
                      "returns": story.truth["returns"]})
    atomic_write_json(root / "index.json", {"kind": "storymem-toy-stories", "seed": int(seed), "count": count,
                                            "exclude": sorted(excluded), "stories": index})
    return paths


def render_story_truth(truth: dict, num_frames: int, height: int, width: int) -> list[np.ndarray]:
    """Reference renders of a story's shots from its ground truth (what a perfect model would show)."""
    _check_positive("num_frames", num_frames)
    try:
        specs = [ClipSpec.from_dict(shot["clip"]) for shot in truth["shots"]]
    except (KeyError, TypeError) as err:
        raise DatasetError(f"not a toy story ground truth: missing {err}") from None
    return [spec.render(num_frames, height, width) for spec in specs]
