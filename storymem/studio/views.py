"""HTML of the page's read-only panels (progress, shots, memory bank, takes, edits, story issues).

Files are linked through the studio's file route (``/studio/file/<workspace path>``), which serves only what
is inside the workspace; every text from a story or a manifest is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

import numpy as np

__all__ = ["FILE_ROUTE", "file_url", "progress_html", "shots_html", "bank_html", "takes_html", "edits_html",
           "issues_html", "PAGE_CSS"]

FILE_ROUTE = "/studio/file/"
THUMB = 72

PAGE_CSS = """
.sm-shots { display: flex; flex-direction: column; gap: 10px; }
.sm-shot { display: flex; gap: 14px; border: 1px solid var(--border-color-primary); border-radius: 8px;
           padding: 10px; }
.sm-shot video { width: 240px; min-width: 240px; align-self: flex-start; background: #000; border-radius: 4px;
                 image-rendering: pixelated; }
.sm-shot .sm-wait { width: 240px; min-width: 240px; height: 135px; display: flex; align-items: center;
                    justify-content: center; background: var(--background-fill-secondary); border-radius: 4px; }
.sm-meta { flex: 1; min-width: 0; } .sm-meta h4 { margin: 0 0 4px; }
.sm-tag { display: inline-block; padding: 0 6px; margin-right: 4px; border-radius: 4px; font-size: 12px;
          background: var(--background-fill-secondary); }
.sm-tag.stale { background: #b45309; color: #fff; } .sm-tag.current { background: #2563eb; color: #fff; }
.sm-group { margin-top: 6px; font-size: 12px; color: var(--body-text-color-subdued); }
.sm-thumbs { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 2px; }
.sm-thumb { display: flex; flex-direction: column; align-items: center; font-size: 11px; }
.sm-thumb img { height: 72px; image-rendering: pixelated; border: 3px solid transparent; border-radius: 3px; }
.sm-thumb.mem img { border-color: #3478f6; } .sm-thumb.key img { border-color: #f58c1e; }
.sm-thumb.ref img { border-color: #16a34a; } .sm-thumb.out img { opacity: 0.45; }
.sm-bar { height: 10px; background: var(--background-fill-secondary); border-radius: 5px; overflow: hidden;
          margin: 3px 0 8px; }
.sm-bar span { display: block; height: 100%; background: #2563eb; }
.sm-bar.step span { background: #f58c1e; }
.sm-issues li.bad { color: #dc2626; } .sm-ok { color: #16a34a; }
.sm-takes { display: flex; flex-wrap: wrap; gap: 12px; }
.sm-take { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px; width: 260px; }
.sm-take video { width: 100%; background: #000; image-rendering: pixelated; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def file_url(workspace_root: Path, path: Path) -> str:
    """URL of a workspace file, versioned by its modification time so a new take is not read from cache."""
    path = Path(path)
    try:
        relative = path.resolve().relative_to(workspace_root).as_posix()
    except ValueError:  # a manifest naming a file outside the workspace: the page shows nothing for it
        return ""
    try:
        version = path.stat().st_mtime_ns
    except OSError:
        version = 0
    return f"{FILE_ROUTE}{quote(relative)}?v={version}"


def _data_uri(frame: np.ndarray, height: int = THUMB) -> str:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame))
    width = max(1, round(image.width * height / image.height))
    image = image.resize((width, height), Image.NEAREST if image.height < height else Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image.width * image.height < 20000 else "JPEG")
    kind = "png" if image.width * image.height < 20000 else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}"


# ---------------------------------------------------------------------------------------------- progress
def progress_html(status: dict) -> str:
    state = status.get("state", "idle")
    if state == "idle":
        return '<div id="sm-progress" data-state="idle">No render is running.</div>'
    done, total = status.get("done", 0), max(1, status.get("total", 1))
    step, steps = status.get("step", 0), max(1, status.get("steps") or 1)
    shot = status.get("shot")
    parts = [f'<div id="sm-progress" data-state="{_e(state)}" data-done="{done}" data-total="{total}">',
             f"<b>{_e(status.get('run'))}</b>: {_e(state)}"]
    if status.get("elapsed") is not None:
        parts.append(f" &middot; {status['elapsed']:.0f} s")
    if status.get("message"):
        parts.append(f'<div class="sm-message">{_e(status["message"])}</div>')
    parts.append(f'<div>shots: {done} of {total} finished</div>'
                 f'<div class="sm-bar"><span style="width:{100 * done / total:.0f}%"></span></div>')
    if state in ("rendering", "stopping", "loading"):
        label = f"shot {shot + 1} ({status.get('stem')})" if shot is not None else "preparing"
        parts.append(f"<div>{_e(label)}: {_e(status.get('phase', ''))}, step {step} of {steps}</div>"
                     f'<div class="sm-bar step"><span style="width:{100 * step / steps:.0f}%"></span></div>')
    parts.append("</div>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- shots
def _thumbs(root: Path, folder: Path, records: Sequence[dict], css: str, caption) -> str:
    items = []
    for record in records:
        if not record.get("file"):
            continue
        url = file_url(root, folder / record["file"])
        if not url:
            continue
        items.append(f'<div class="sm-thumb {css}"><img src="{url}" alt="" loading="lazy">'
                     f"<span>{_e(caption(record))}</span></div>")
    return f'<div class="sm-thumbs">{"".join(items)}</div>' if items else '<div class="sm-thumbs">none</div>'


def _memory_caption(record: dict) -> str:
    if record.get("kind") == "reference":
        return str(record.get("id", "reference"))
    return f"{record.get('shot_stem')} f{record.get('frame')}"


def shots_html(root: Path, state: dict, status: Optional[dict] = None) -> str:
    """One card per shot of the run: its video as soon as it lands, the memory it saw, the keyframes it gave
    with their scores, and which take it is."""
    manifest = state.get("manifest")
    if not manifest:
        return '<div id="sm-shots" class="sm-shots">Nothing rendered in this run yet.</div>'
    from ..story import Story

    folder: Path = state["folder"]
    story = Story.from_dict(manifest["story"])
    entries = {e["stem"]: e for e in manifest.get("shots", [])}
    rendering = status if status and status.get("run") == folder.name and status.get("state") in (
        "rendering", "stopping") else None
    parts = ['<div id="sm-shots" class="sm-shots">']
    links = []
    for name, label in (("story.mp4", "story video"), ("contact_sheet.png", "contact sheet"),
                        ("index.html", "render page")):
        if (folder / name).is_file():
            links.append(f'<a href="{file_url(root, folder / name)}" target="_blank">{label}</a>')
    if links:
        parts.append(f"<div>{' &middot; '.join(links)}</div>")
    for shot in story:
        stem = shot.file_stem
        entry = entries.get(stem)
        index = state["takes"].get(stem, {})
        count = len(index.get("takes", []))
        tags = [f'<span class="sm-tag">{_e(entry["mode"]).upper()}</span>',
                f'<span class="sm-tag">seed {_e(entry["seed"])}</span>'] if entry else []
        if entry and count:
            tags.append(f'<span class="sm-tag current" data-takes="{count}">take {index.get("current")} of '
                        f"{count}</span>")
        if stem in state["stale"]:
            tags.append('<span class="sm-tag stale">memory changed since: re-render from here</span>')
        parts.append(f'<div class="sm-shot" data-stem="{_e(stem)}" data-finished="{int(entry is not None)}">')
        if entry:
            parts.append(f'<video src="{file_url(root, folder / entry["file"])}" controls loop muted autoplay '
                         'playsinline></video>')
        else:
            busy = rendering and rendering.get("shot") == shot.index
            text = (f"rendering: step {rendering.get('step', 0)} of {rendering.get('steps', '?')}" if busy
                    else "not rendered")
            parts.append(f'<div class="sm-wait">{_e(text)}</div>')
        parts.append(f'<div class="sm-meta"><h4>shot {shot.index + 1} &middot; {_e(stem)} {"".join(tags)}</h4>'
                     f"<div>{_e(shot.prompt)}</div>")
        if entry:
            scores = state["scores"].get(stem, {})

            def key_caption(record, scores=scores):
                score = scores.get(record.get("frame"), {})
                text = f"f{record.get('frame')}"
                if score.get("aesthetic") is not None:
                    text += f" a{score['aesthetic']:.2f}"
                if score.get("memory_similarity") is not None:
                    text += f" s{score['memory_similarity']:.2f}"
                return text

            parts.append(f'<div class="sm-group">memory it saw ({len(entry.get("memory", []))})'
                         f'{_thumbs(root, folder, entry.get("memory", []), "mem", _memory_caption)}</div>')
            legend = [text for key, text in (("aesthetic", "a: aesthetic score"),
                                             ("memory_similarity", "s: closest similarity to the memory"))
                      if any(v.get(key) is not None for v in scores.values())]
            count = len(entry.get("keyframes", []))
            parts.append(f'<div class="sm-group">keyframes it gave ({"; ".join([str(count), *legend])})'
                         f'{_thumbs(root, folder, entry.get("keyframes", []), "key", key_caption)}</div>')
        parts.append("</div></div>")
    parts.append("</div>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- memory
def bank_html(items, shot: int) -> str:
    if not items:
        return f'<div id="sm-bank">The memory before shot {shot} is empty.</div>'
    cells = []
    for item in items:
        css = "ref" if item.kind == "reference" else "key"
        if not item.in_window:
            css += " out"
        cells.append(f'<div class="sm-thumb {css}" data-key="{_e(item.key)}"><img src="{_data_uri(item.frame)}" '
                     f'alt=""><span>{_e(item.label)}</span></div>')
    return (f'<div id="sm-bank"><div class="sm-group">memory shot {shot} is drawn from: green = reference '
            f'(pinned), orange = keyframe, faded = outside the window</div><div class="sm-thumbs">{"".join(cells)}'
            "</div></div>")


def edits_html(edits: Sequence[dict]) -> str:
    if not edits:
        return '<div id="sm-edits">No memory edits in this run.</div>'
    rows = []
    for record in edits:
        ops = []
        for op in record.get("operations", []):
            entry = op.get("entry", {})
            what = (f"{entry.get('shot_stem')} f{entry.get('frame')}" if entry.get("kind") == "keyframe"
                    else op.get("name") or "reference")
            ops.append(f"{op['op'].replace('_', ' ')} {what}")
        state = "in effect" if record.get("in_effect") else "replaced since (the bank was saved again)"
        rows.append(f"<li>#{record['id']} before shot {_e(record['shot'])}: {_e(', '.join(ops))} "
                    f"<i>({_e(state)})</i></li>")
    return f'<div id="sm-edits"><ul>{"".join(rows)}</ul></div>'


# ---------------------------------------------------------------------------------------------- takes
def takes_html(root: Path, folder: Path, stem: str, index: dict, edits: Sequence[dict] = ()) -> str:
    from .takes import take_folder

    drawn_from = {e.get("bank_after", {}).get("sha256"): e["id"] for e in edits if e.get("shot") == stem}
    takes = index.get("takes", [])
    if not takes:
        return f'<div id="sm-takes">Shot {_e(stem)} has no takes yet.</div>'
    cards = []
    for take in takes:
        current = take["take"] == index.get("current")
        source = folder / "shots" / f"{stem}.mp4" if current else take_folder(folder, stem, take["take"]) / "shot.mp4"
        video = (f'<video src="{file_url(root, source)}" controls loop muted playsinline></video>'
                 if source.is_file() else "<div>files replaced outside the studio</div>")
        tags = '<span class="sm-tag current">current</span>' if current else ""
        if take.get("basis") in drawn_from:
            tags += f'<span class="sm-tag">memory edit #{drawn_from[take["basis"]]}</span>'
        if take.get("lost"):
            tags += '<span class="sm-tag stale">lost</span>'
        cards.append(f'<div class="sm-take" data-take="{take["take"]}">{video}<div><b>take {take["take"]}</b> {tags}'
                     f'</div><div class="sm-group">seed {_e(take.get("seed"))} &middot; {_e(take.get("mode"))} '
                     f'&middot; {_e(take.get("registered", ""))}</div></div>')
    return f'<div id="sm-takes" class="sm-takes" data-count="{len(takes)}">{"".join(cards)}</div>'


def issues_html(issues, story=None) -> str:
    if story is not None:
        scenes = len(story.scene_numbers)
        return (f'<div id="sm-issues" class="sm-ok" data-ok="1">The story is valid: {len(story)} shots in {scenes} '
                f'scene{"s" if scenes != 1 else ""}.</div>')
    if not issues:
        return '<div id="sm-issues"></div>'
    items = "".join(f'<li class="bad">{_e(issue)}</li>' for issue in issues)
    return f'<div id="sm-issues" class="sm-issues" data-ok="0"><ul>{items}</ul></div>'
