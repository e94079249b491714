"""Story scripts: the schema, its validation and the `Story` / `Shot` objects the renderer and the evaluator use.

Two forms are accepted.

**ST-Bench form** (the benchmark's JSON schema)::

    {
      "story_name": "Stroke of Clarity",
      "story_overview": "In a bright, spacious studio, ...",
      "scenes": [
        {"scene_num": 1,
         "video_prompts": ["Medium shot of ...", "Close-up of ..."],
         "first_frame_prompt": ["Artist-centered view ...", "..."],
         "cut": [true, false]}
      ]
    }

`scenes`, `scene_num`, `video_prompts` and `cut` are required; `cut` holds one JSON boolean per video prompt
(true: the shot starts fresh from memory; false: it continues the previous shot). `first_frame_prompt` is
optional; when present it has one string (or null) per video prompt. `story_name` defaults to the file's stem
and `story_overview` to "" (the evaluator then skips the global prompt-following metric). Scene numbers are
non-negative integers that strictly increase through the file, so the renderer's file names
(`SS_NN.mp4`) sort in story order.

**Plain form**: a JSON list of prompt strings; or a JSON object
``{"prompts": [...], "cuts": [...], "first_frame_prompts": [...], "name": ..., "overview": ...}`` where
everything but `prompts` is optional; or a ``.txt`` file with one prompt per line (blank lines and lines
starting with ``#`` are skipped). All shots of a plain story belong to scene 1; without `cuts` every shot is
a cut.

**Unknown fields** are refused, naming the nearest known one (``"video_prompt"``: did you mean
``"video_prompts"``?): a misspelt field would otherwise be ignored, or reported as missing.

**The first shot.** A story's first shot has nothing to continue, so its `cut` must be true. A script that
says false there is rejected with a `StoryError` (in both forms) rather than silently rewritten: the value
is almost always a slip (a shifted `cut` list, a script cut out of a longer story) that the author wants to
hear about. Later scenes may start with false, which continues the last shot of the previous scene.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Shot", "Story", "StoryError", "load_story"]


class StoryError(ValueError):
    """A story script is missing, unreadable or does not follow the schema.

    The message names the file and, where it applies, the scene, the shot and the field at fault.
    """


@dataclass(frozen=True)
class Shot:
    """One shot of a story.

    Attributes:
        index: 0-based position in the whole story.
        scene: the scene's `scene_num` from the script (1 for plain stories).
        shot_in_scene: 0-based position inside its scene.
        prompt: the text prompt the shot is rendered from.
        cut: True when the shot starts fresh (memory only); False when it continues the previous shot.
        first_frame_prompt: the script's description of the shot's first frame, if it has one.
    """

    index: int
    scene: int
    shot_in_scene: int
    prompt: str
    cut: bool = True
    first_frame_prompt: str | None = None

    @property
    def file_stem(self) -> str:
        """The stem of the shot's video file, ``SS_NN``: scene number, then 1-based shot within the scene."""
        return f"{self.scene:02d}_{self.shot_in_scene + 1:02d}"


@dataclass
class Story:
    """A story script: its shots in story order plus the name and overview of the whole story."""

    shots: list[Shot]
    name: str = "story"
    overview: str = ""
    path: Path | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_prompts(
        cls,
        prompts: Sequence[str],
        cuts: Sequence[bool] | None = None,
        name: str = "story",
        overview: str = "",
        first_frame_prompts: Sequence[str | None] | None = None,
    ) -> Story:
        """Build a one-scene story from a list of prompts (every shot a cut unless `cuts` says otherwise)."""
        data: dict[str, Any] = {"prompts": list(prompts), "name": name, "overview": overview}
        if cuts is not None:
            data["cuts"] = list(cuts)
        if first_frame_prompts is not None:
            data["first_frame_prompts"] = list(first_frame_prompts)
        return _parse_plain(data, source="<prompts>", default_name=name)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> Story:
        """Parse an already-decoded script (either form, or the output of `to_dict`)."""
        label = str(source) if source is not None else "<story>"
        default_name = Path(source).stem if source is not None else "story"
        if isinstance(data, dict) and ("scenes" in data or "prompts" not in data and _ST_BENCH_KEYS & data.keys()):
            story = _parse_scenes(data, source=label, default_name=default_name)
        else:
            story = _parse_plain(data, source=label, default_name=default_name)
        if source is not None:
            story.path = Path(source)
        elif isinstance(data, dict) and isinstance(data.get("path"), str):
            story.path = Path(data["path"])
        return story

    # ------------------------------------------------------------------ views

    def __len__(self) -> int:
        return len(self.shots)

    def __iter__(self) -> Iterator[Shot]:
        return iter(self.shots)

    def __getitem__(self, index: int) -> Shot:
        return self.shots[index]

    @property
    def prompts(self) -> list[str]:
        return [shot.prompt for shot in self.shots]

    @property
    def scene_numbers(self) -> list[int]:
        """Scene numbers in story order."""
        return list(dict.fromkeys(shot.scene for shot in self.shots))

    def scene(self, scene_num: int) -> list[Shot]:
        """The shots of one scene, in order."""
        shots = [shot for shot in self.shots if shot.scene == scene_num]
        if not shots:
            raise KeyError(f"story {self.name!r} has no scene {scene_num}")
        return shots

    def to_dict(self) -> dict[str, Any]:
        """The story in the ST-Bench schema (plus ``path``), suitable for manifests; `from_dict` reads it back."""
        scenes = []
        for scene_num in self.scene_numbers:
            shots = self.scene(scene_num)
            entry: dict[str, Any] = {
                "scene_num": scene_num,
                "video_prompts": [shot.prompt for shot in shots],
                "first_frame_prompt": [shot.first_frame_prompt for shot in shots],
                "cut": [shot.cut for shot in shots],
            }
            if all(shot.first_frame_prompt is None for shot in shots):
                del entry["first_frame_prompt"]
            scenes.append(entry)
        return {
            "story_name": self.name,
            "story_overview": self.overview,
            "scenes": scenes,
            "path": str(self.path) if self.path is not None else None,
        }


# ---------------------------------------------------------------------- loading


def load_story(path: str | Path) -> Story:
    """Load and validate a story script (ST-Bench JSON, plain JSON, or a ``.txt`` with one prompt per line)."""
    path = Path(path)
    if not path.exists():
        raise StoryError(f"{path}: story file not found")
    if not path.is_file():
        raise StoryError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise StoryError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise StoryError(f"{path}: cannot read story file: {err.strerror or err}") from None

    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
        prompts = [line for line in prompts if line and not line.startswith("#")]
        story = _parse_plain(prompts, source=str(path), default_name=path.stem)
        story.path = path
        return story

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise StoryError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    return Story.from_dict(data, source=path)


# ---------------------------------------------------------------------- parsing helpers


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_prompt(value: Any, where: str, what: str = "prompt") -> str:
    if not isinstance(value, str):
        raise StoryError(f"{where}: {what} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise StoryError(f"{where}: {what} is empty")
    return value


def _check_optional_text(data: dict, key: str, source: str, default: str) -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise StoryError(f"{source}: field '{key}' must be a string, got {_type_name(value)}")
    return value


def _check_cuts(cuts: Any, count: int, where: str, key: str) -> list[bool]:
    if not isinstance(cuts, list):
        raise StoryError(f"{where}: field '{key}' must be a list of booleans, got {_type_name(cuts)}")
    if len(cuts) != count:
        raise StoryError(f"{where}: field '{key}' has {len(cuts)} entries but there are {count} prompts")
    for i, value in enumerate(cuts):
        if not isinstance(value, bool):
            raise StoryError(
                f"{where}, shot {i + 1}: field '{key}' must be a JSON boolean (true/false), "
                f"got {value!r} ({_type_name(value)})"
            )
    return list(cuts)


def _check_first_frame_prompts(values: Any, count: int, where: str, key: str) -> list[str | None]:
    if values is None:
        return [None] * count
    if not isinstance(values, list):
        raise StoryError(f"{where}: field '{key}' must be a list of strings, got {_type_name(values)}")
    if len(values) == 0:
        return [None] * count
    if len(values) != count:
        raise StoryError(f"{where}: field '{key}' has {len(values)} entries but there are {count} prompts")
    out: list[str | None] = []
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise StoryError(f"{where}, shot {i + 1}: field '{key}' entries must be strings, got {_type_name(value)}")
        out.append(value if value is None or value.strip() else None)
    return out


def _check_first_cut(shots: list[Shot], source: str) -> None:
    first = shots[0]
    if not first.cut:
        raise StoryError(
            f"{source}, scene {first.scene}, shot 1: 'cut' is false, but the first shot of a story has no "
            "previous shot to continue; set it to true"
        )


_ST_BENCH_KEYS = {"story_name", "story_overview", "scenes"}
# The fields each object of a script may have ("path": where a manifest's copy of the story came from).
_ST_BENCH_FIELDS = ("story_name", "story_overview", "scenes", "path")
_SCENE_FIELDS = ("scene_num", "video_prompts", "first_frame_prompt", "cut")
_PLAIN_FIELDS = ("prompts", "cuts", "first_frame_prompts", "name", "overview", "path")


def _check_fields(data: dict, known: Sequence[str], where: str) -> None:
    """Refuse a field the schema does not have (a misspelt one would otherwise be ignored, or reported as the
    field it was meant to be going missing), naming the nearest known one."""
    forms = {_ST_BENCH_FIELDS: "ST-Bench", _PLAIN_FIELDS: "plain"}
    for key in data:
        if key in known:
            continue
        other = next((fields for fields in forms if fields is not known and key in fields), None)
        if other is not None and known in forms:
            hint = (f"'{key}' belongs to the {forms[other]} form, but this script is in the {forms[known]} form "
                    f"(fields: {', '.join(known)})")
        else:
            # (a misspelt 'scenes' makes a script look like the plain form: look in both)
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6) or \
                difflib.get_close_matches(str(key), [*_ST_BENCH_FIELDS, *_PLAIN_FIELDS], n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(known)}"
        raise StoryError(f"{where}: unknown field '{key}'; {hint}")


def _parse_scenes(data: dict, source: str, default_name: str) -> Story:
    _check_fields(data, _ST_BENCH_FIELDS, source)
    name = _check_optional_text(data, "story_name", source, default_name)
    overview = _check_optional_text(data, "story_overview", source, "")
    if "scenes" not in data:
        raise StoryError(f"{source}: missing field 'scenes'")
    scenes = data["scenes"]
    if not isinstance(scenes, list):
        raise StoryError(f"{source}: field 'scenes' must be a list, got {_type_name(scenes)}")
    if not scenes:
        raise StoryError(f"{source}: field 'scenes' is empty")

    shots: list[Shot] = []
    seen: dict[int, int] = {}
    for position, scene in enumerate(scenes):
        where = f"{source}, scenes[{position}]"
        if not isinstance(scene, dict):
            raise StoryError(f"{where}: a scene must be an object, got {_type_name(scene)}")
        _check_fields(scene, _SCENE_FIELDS, where)
        if "scene_num" not in scene:
            raise StoryError(f"{where}: missing field 'scene_num'")
        scene_num = scene["scene_num"]
        if isinstance(scene_num, bool) or not isinstance(scene_num, int) or scene_num < 0:
            raise StoryError(f"{where}: field 'scene_num' must be a non-negative integer, got {scene_num!r}")
        if scene_num in seen:
            raise StoryError(f"{where}: duplicate scene_num {scene_num} (also scenes[{seen[scene_num]}])")
        if seen and scene_num < max(seen):
            raise StoryError(
                f"{where}: scene_num {scene_num} comes after scene {max(seen)}; scene numbers must increase"
            )
        seen[scene_num] = position
        where = f"{source}, scene {scene_num}"

        for key in ("video_prompts", "cut"):
            if key not in scene:
                raise StoryError(f"{where}: missing field '{key}'")
        prompts = scene["video_prompts"]
        if not isinstance(prompts, list):
            raise StoryError(f"{where}: field 'video_prompts' must be a list of strings, got {_type_name(prompts)}")
        if not prompts:
            raise StoryError(f"{where}: field 'video_prompts' is empty")
        for i, prompt in enumerate(prompts):
            _check_prompt(prompt, f"{where}, shot {i + 1}", "video_prompts entry")
        cuts = _check_cuts(scene["cut"], len(prompts), where, "cut")
        first_frames = _check_first_frame_prompts(
            scene.get("first_frame_prompt"), len(prompts), where, "first_frame_prompt"
        )
        for i, (prompt, cut, first_frame) in enumerate(zip(prompts, cuts, first_frames, strict=True)):
            shots.append(Shot(len(shots), scene_num, i, prompt, cut, first_frame))

    _check_first_cut(shots, source)
    return Story(shots=shots, name=name, overview=overview)


def _parse_plain(data: Any, source: str, default_name: str) -> Story:
    cuts_key, first_key = "cuts", "first_frame_prompts"
    if isinstance(data, list):
        prompts, cuts, first_frames, name, overview = data, None, None, default_name, ""
    elif isinstance(data, dict):
        _check_fields(data, _PLAIN_FIELDS, source)
        if "prompts" not in data:
            raise StoryError(
                f"{source}: missing field 'prompts' (a story is either the ST-Bench schema with 'scenes', "
                "a list of prompts, or an object with 'prompts')"
            )
        prompts = data["prompts"]
        cuts = data.get(cuts_key)
        first_frames = data.get(first_key)
        name = _check_optional_text(data, "name", source, default_name)
        overview = _check_optional_text(data, "overview", source, "")
        if not isinstance(prompts, list):
            raise StoryError(f"{source}: field 'prompts' must be a list of strings, got {_type_name(prompts)}")
    else:
        raise StoryError(f"{source}: a story must be a JSON object or a list of prompts, got {_type_name(data)}")

    if not prompts:
        raise StoryError(f"{source}: the story has no prompts")
    for i, prompt in enumerate(prompts):
        _check_prompt(prompt, f"{source}, shot {i + 1}")
    cuts = [True] * len(prompts) if cuts is None else _check_cuts(cuts, len(prompts), source, cuts_key)
    first_frames = _check_first_frame_prompts(first_frames, len(prompts), source, first_key)
    shots = [Shot(i, 1, i, p, c, f) for i, (p, c, f) in enumerate(zip(prompts, cuts, first_frames, strict=True))]
    _check_first_cut(shots, source)
    return Story(shots=shots, name=name, overview=overview)
