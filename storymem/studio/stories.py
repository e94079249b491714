"""The page's story editor: a table of shots (scene, cut, prompt, first-frame prompt) <-> a story script.

The table is what people edit; :func:`check_rows` turns it into a :class:`~storymem.story.Story` or into a list
of :class:`Issue` s, each naming the row (shot) and the column (field) at fault, so the page can show the
problem beside it. The story module stays the one judge of the schema: rows that pass the checks here are
parsed by it, and an error it still finds is mapped back to its shot and field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..atomic import atomic_write_json
from ..story import Story, StoryError

__all__ = ["COLUMNS", "Issue", "StoryDraft", "check_rows", "rows_from_story", "story_dict_from_rows",
           "issues_column", "save_story"]

COLUMNS = ["scene", "cut", "prompt", "first frame prompt", "check"]
FIELDS = {"scene": 0, "cut": 1, "prompt": 2, "first frame prompt": 3}
CUT_WORDS = {"cut": True, "yes": True, "true": True, "1": True, "new": True,
             "continue": False, "cont": False, "no": False, "false": False, "0": False}


@dataclass
class Issue:
    """One problem of the table: ``row`` (0-based; None for the story as a whole), ``field``, ``message``."""

    row: Optional[int]
    field: str
    message: str

    def __str__(self) -> str:
        where = f"shot {self.row + 1}" if self.row is not None else "story"
        return f"{where}, {self.field}: {self.message}"


@dataclass
class StoryDraft:
    """What the editor holds: the title, the overview and the table rows."""

    name: str
    overview: str
    rows: list[list]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from an emptied table cell
        return ""
    return str(value).strip()


def _is_blank(row: Sequence[Any]) -> bool:
    return all(not _text(v) for v in list(row)[:4])


def rows_from_story(story: Story) -> list[list]:
    """The table of ``story``: one row per shot."""
    return [[shot.scene, "cut" if shot.cut else "continue", shot.prompt, shot.first_frame_prompt or "", ""]
            for shot in story]


def _parse_row(position: int, row: Sequence[Any], issues: list[Issue], previous_scene: int) -> Optional[tuple]:
    """(scene, cut, prompt, first-frame prompt) of a row; an empty scene cell is the previous row's scene."""
    row = list(row) + [""] * (4 - len(row))
    scene_text, cut_text, prompt, first = (_text(v) for v in row[:4])
    scene = previous_scene
    if scene_text:
        try:
            scene = int(float(scene_text))
            if scene < 0 or float(scene_text) != scene:
                raise ValueError
        except ValueError:
            issues.append(Issue(position, "scene", f"{scene_text!r} is not a scene number (0, 1, 2, ...)"))
            scene = None
    cut = CUT_WORDS.get(cut_text.lower()) if cut_text else True
    if cut is None:
        issues.append(Issue(position, "cut", f"{cut_text!r}: write 'cut' (a new shot) or 'continue' (continues the "
                                             "previous shot)"))
    if not prompt:
        issues.append(Issue(position, "prompt", "is empty"))
    if scene is None or cut is None or not prompt:
        return None
    return scene, cut, prompt, first or None


def story_dict_from_rows(name: str, overview: str, rows: Sequence[Sequence[Any]]) -> tuple[dict, list[Issue],
                                                                                          list[int]]:
    """(ST-Bench dict, issues, table row of each shot) of the table; blank rows are skipped."""
    issues: list[Issue] = []
    parsed, row_of_shot = [], []
    for position, row in enumerate(rows):
        if _is_blank(row):
            continue
        value = _parse_row(position, row, issues, parsed[-1][0] if parsed else 1)
        if value is not None:
            parsed.append(value)
            row_of_shot.append(position)
    if not parsed and not issues:
        issues.append(Issue(None, "shots", "the story has no shots; write a prompt in the table"))
    scenes: list[dict] = []
    for (scene, cut, prompt, first), position in zip(parsed, row_of_shot):
        if scenes and scene < scenes[-1]["scene_num"]:
            issues.append(Issue(position, "scene", f"scene {scene} comes after scene {scenes[-1]['scene_num']}; "
                                                   "scene numbers must not decrease down the table"))
            continue
        if not scenes or scenes[-1]["scene_num"] != scene:
            scenes.append({"scene_num": scene, "video_prompts": [], "first_frame_prompt": [], "cut": []})
        scenes[-1]["video_prompts"].append(prompt)
        scenes[-1]["first_frame_prompt"].append(first)
        scenes[-1]["cut"].append(cut)
    if parsed and not parsed[0][1]:
        issues.append(Issue(row_of_shot[0], "cut", "the first shot has no previous shot to continue; set it to 'cut'"))
    for scene in scenes:
        if all(f is None for f in scene["first_frame_prompt"]):
            del scene["first_frame_prompt"]
    data = {"story_name": _text(name) or "story", "story_overview": _text(overview), "scenes": scenes}
    return data, issues, row_of_shot


def _locate(message: str, data: dict, row_of_shot: list[int]) -> Issue:
    """Map a StoryError message ('..., scene 2, shot 1: field ...') back to its table row and column."""
    row = None
    match = re.search(r"scene (\d+), shot (\d+)", message)
    if match:
        scene_num, shot_in_scene = int(match.group(1)), int(match.group(2)) - 1
        index = 0
        for scene in data["scenes"]:
            if scene["scene_num"] == scene_num:
                index += shot_in_scene
                break
            index += len(scene["video_prompts"])
        if index < len(row_of_shot):
            row = row_of_shot[index]
    field = "story"
    for key, column in (("cut", "cut"), ("first_frame_prompt", "first frame prompt"), ("scene_num", "scene"),
                        ("video_prompts", "prompt"), ("prompt", "prompt")):
        if f"'{key}'" in message or f"{key} " in message:
            field = column
            break
    return Issue(row, field, message.split(": ", 1)[-1] if row is not None else message)


def check_rows(name: str, overview: str, rows: Sequence[Sequence[Any]]) -> tuple[Optional[Story], list[Issue]]:
    """The story the table describes, or None and every issue found (row and field of each)."""
    data, issues, row_of_shot = story_dict_from_rows(name, overview, rows)
    if issues:
        return None, issues
    try:
        story = Story.from_dict(data)
    except StoryError as err:
        return None, [_locate(str(err), data, row_of_shot)]
    story.path = None
    return story, []


def issues_column(rows: Sequence[Sequence[Any]], issues: Sequence[Issue]) -> list[list]:
    """The table with its last column ("check") saying what is wrong with each row, or "ok"."""
    by_row: dict[int, list[str]] = {}
    for issue in issues:
        if issue.row is not None:
            by_row.setdefault(issue.row, []).append(f"{issue.field}: {issue.message}")
    out = []
    for position, row in enumerate(rows):
        cells = [("" if _text(v) == "" else v) for v in list(row)[:4]] + [""] * max(0, 4 - len(row))
        check = "" if _is_blank(row) else ("; ".join(by_row[position]) if position in by_row else "ok")
        out.append(cells[:4] + [check])
    return out


def save_story(path, story: Story) -> None:
    """Write ``story`` as ST-Bench JSON (atomically): what `storymem render --story` reads."""
    data = story.to_dict()
    data.pop("path", None)
    atomic_write_json(path, data)


def draft_from_json_text(text: str) -> StoryDraft:
    """A draft from pasted story text: ST-Bench / plain JSON, or one prompt per line."""
    stripped = text.strip()
    try:
        if stripped.startswith(("{", "[")):
            story = Story.from_dict(json.loads(stripped))
        else:
            lines = [line.strip() for line in stripped.splitlines()]
            story = Story.from_prompts([line for line in lines if line and not line.startswith("#")])
    except json.JSONDecodeError as err:
        raise StoryError(f"pasted story: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    return StoryDraft(story.name, story.overview, rows_from_story(story))
