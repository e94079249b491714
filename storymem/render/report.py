"""What a render shows of its work: a contact sheet (PNG) and an ``index.html`` that plays the shots.

Both are built from the render folder's ``manifest.json`` and the thumbnails the renderer saved beside it,
so they can be rebuilt at any time (``write_report(out_dir)``) without the models.

Contact sheet: one row per shot; each row is a label line (shot, mode, seed, prompt) over three groups of
thumbnails - the memory frames the shot saw (blue frame), sample frames of the shot itself, and the
keyframes the shot gave to the memory (orange frame).
"""

from __future__ import annotations

import functools
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_write_bytes

__all__ = ["FONT_PATH", "SheetRow", "build_contact_sheet", "write_contact_sheet", "write_index_html", "write_report",
           "rows_from_manifest"]

ImageSource = Union[str, os.PathLike, np.ndarray, Image.Image]

MEMORY_COLOUR = (52, 120, 246)
KEYFRAME_COLOUR = (245, 140, 30)
BACKGROUND = (24, 24, 27)
TEXT_COLOUR = (235, 235, 235)
DIM_TEXT = (160, 160, 170)


@dataclass
class SheetRow:
    """One shot's row of the contact sheet."""

    label: str
    memory: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    keyframes: list = field(default_factory=list)


# Noto Sans CJK SC, subset to Latin, Greek, Cyrillic, punctuation, kana, GB 2312 and KS X 1001 Hangul (OFL;
# fonts/README.md): prompts with em dashes, accents or CJK draw as text, not as empty boxes, on any machine.
FONT_PATH = Path(__file__).resolve().parent / "fonts" / "NotoSansCJKsc-Regular-subset.otf"


@functools.lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.truetype(str(FONT_PATH), size)
    except OSError:  # a copy of storymem without its font: Pillow's own (Latin only)
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has a single bitmap font
            return ImageFont.load_default()


def _open(image: ImageSource) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _thumbnail(image: ImageSource, height: int) -> Image.Image:
    im = _open(image)
    width = max(1, round(im.width * height / im.height))
    # Upscaled toy frames stay crisp; real frames are downscaled smoothly.
    resample = Image.NEAREST if im.height < height else Image.BICUBIC
    return im.resize((width, height), resample)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def build_contact_sheet(rows: Sequence[SheetRow], thumb_height: int = 96, title: Optional[str] = None,
                        gap: int = 6, group_gap: int = 24, border: int = 3) -> Image.Image:
    """Draw the contact sheet of ``rows`` (see the module docstring) and return it as a PIL image."""
    font, small = _font(14), _font(12)
    title_height = 28 if title else 0
    label_height = 38
    row_height = label_height + thumb_height + 2 * border + gap * 2

    # Lay every row out first: the sheet is as wide as its widest row.
    layouts = []
    for row in rows:
        x, placed, headers = gap, [], []
        for name, images, colour in (("memory it saw", row.memory, MEMORY_COLOUR),
                                     ("frames", row.samples, None),
                                     ("keyframes it gave", row.keyframes, KEYFRAME_COLOUR)):
            thumbs = [_thumbnail(im, thumb_height) for im in images]
            headers.append((x, f"{name} ({len(thumbs)})" if colour else name))
            if not thumbs:
                x += 110  # room for the header of an empty group
            for thumb in thumbs:
                placed.append((x, thumb, colour))
                x += thumb.width + 2 * border + gap
            x += group_gap
        layouts.append((row, placed, headers, x))
    width = max([640] + [x for _, _, _, x in layouts])
    height = title_height + row_height * max(1, len(rows)) + gap

    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, 6), _fit_text(draw, title, font, width - 2 * gap), fill=TEXT_COLOUR, font=font)
    for r, (row, placed, headers, _) in enumerate(layouts):
        top = title_height + r * row_height + gap
        draw.line([(0, top - gap // 2), (width, top - gap // 2)], fill=(60, 60, 66))
        draw.text((gap, top), _fit_text(draw, row.label, font, width - 2 * gap), fill=TEXT_COLOUR, font=font)
        for x, text in headers:
            draw.text((x, top + 19), text, fill=DIM_TEXT, font=small)
        y = top + label_height
        for x, thumb, colour in placed:
            if colour is not None:
                draw.rectangle([x, y, x + thumb.width + 2 * border - 1, y + thumb.height + 2 * border - 1],
                               fill=colour)
            sheet.paste(thumb, (x + border, y + border))
    return sheet


def save_image_atomic(image: Image.Image, path: Union[str, os.PathLike], **save_kwargs) -> Path:
    """Save a PIL image (format from the suffix) through a temporary file in the same folder."""
    import io

    path = Path(path)
    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions()[path.suffix.lower()], **save_kwargs)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_contact_sheet(path, rows: Sequence[SheetRow], **kwargs) -> Path:
    """Build the contact sheet and write it as a PNG, atomically."""
    return save_image_atomic(build_contact_sheet(rows, **kwargs), path)


# ---------------------------------------------------------------------------------------------- manifest
def _shot_label(shot: dict) -> str:
    mode = str(shot.get("mode", "?")).upper()
    return f"{shot.get('stem', '?')}  {mode}  seed {shot.get('seed', '?')}  |  {shot.get('prompt', '')}"


def rows_from_manifest(out_dir, manifest: dict) -> list[SheetRow]:
    """Contact-sheet rows for the finished shots listed in ``manifest`` (files relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    rows = []
    for shot in manifest.get("shots", []):
        rows.append(SheetRow(
            label=_shot_label(shot),
            memory=[out_dir / m["file"] for m in shot.get("memory", []) if m.get("file")],
            samples=[out_dir / s for s in shot.get("samples", [])],
            keyframes=[out_dir / k["file"] for k in shot.get("keyframes", [])],
        ))
    return rows


def _thumbs_html(entries: list[dict], css: str, describe) -> str:
    if not entries:
        return '<span class="none">none</span>'
    return "".join(
        f'<img class="{css}" src="{html.escape(e["file"])}" title="{html.escape(describe(e))}" loading="lazy">'
        for e in entries if e.get("file")
    )


def _memory_title(entry: dict) -> str:
    if entry.get("shot_stem"):
        return f"shot {entry['shot_stem']}, frame {entry.get('frame')}"
    return str(entry.get("id", "memory frame"))


_PAGE_STYLE = """
body { background: #18181b; color: #e5e5e5; font: 14px/1.4 system-ui, sans-serif; margin: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } .overview { color: #a1a1aa; max-width: 70em; }
.shot { display: flex; gap: 18px; border-top: 1px solid #3f3f46; padding: 14px 0; }
.shot video { width: 360px; max-width: 45vw; background: #000; }
.meta { flex: 1; } .meta h2 { font-size: 16px; margin: 0 0 6px; }
.mode { display: inline-block; padding: 0 6px; border-radius: 4px; background: #3f3f46; font-size: 12px; }
.group { margin-top: 8px; } .group b { display: block; color: #a1a1aa; font-weight: normal; font-size: 12px; }
img.mem { height: 72px; border: 3px solid #3478f6; margin: 2px; }
img.key { height: 72px; border: 3px solid #f58c1e; margin: 2px; }
.none { color: #71717a; } table { border-collapse: collapse; } td { padding: 1px 10px 1px 0; color: #a1a1aa; }
"""


def write_index_html(path, manifest: dict) -> Path:
    """An HTML page (atomic write) that plays each shot beside the memory it saw and the keyframes it gave.

    Paths in the manifest are relative to the page's folder."""
    story = manifest.get("story", {})
    settings = manifest.get("settings", {})
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(str(story.get('story_name', 'story')))}</title>",
        f"<style>{_PAGE_STYLE}</style></head><body>",
        f"<h1>{html.escape(str(story.get('story_name', 'story')))}</h1>",
        f'<p class="overview">{html.escape(str(story.get("story_overview", "")))}</p>',
    ]
    total = manifest.get("num_shots")
    done = len(manifest.get("shots", []))
    status = "finished" if manifest.get("finished") else f"{done} of {total} shots rendered"
    parts.append(f"<p>{html.escape(status)}")
    outputs = manifest.get("outputs", {})
    if done and outputs.get("story_video"):
        parts.append(f' &middot; <a href="{html.escape(outputs["story_video"])}">whole story</a>')
    if done and outputs.get("contact_sheet"):
        parts.append(f' &middot; <a href="{html.escape(outputs["contact_sheet"])}">contact sheet</a>')
    parts.append("</p>")
    if settings:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                       for k, v in settings.items())
        parts.append(f"<details><summary>settings</summary><table>{rows}</table></details>")

    for shot in manifest.get("shots", []):
        parts.append('<div class="shot">')
        parts.append(f'<video src="{html.escape(shot["file"])}" controls loop muted playsinline '
                     f'preload="metadata"></video>')
        parts.append('<div class="meta">')
        parts.append(f"<h2>{html.escape(str(shot.get('stem', '')))} "
                     f'<span class="mode">{html.escape(str(shot.get("mode", "")).upper())}</span> '
                     f'<span class="mode">seed {html.escape(str(shot.get("seed", "")))}</span></h2>')
        parts.append(f"<div>{html.escape(str(shot.get('prompt', '')))}</div>")
        parts.append(f'<div class="group"><b>memory it saw ({len(shot.get("memory", []))})</b>'
                     f'{_thumbs_html(shot.get("memory", []), "mem", _memory_title)}</div>')
        parts.append(f'<div class="group"><b>keyframes it gave ({len(shot.get("keyframes", []))})</b>'
                     f'{_thumbs_html(shot.get("keyframes", []), "key", lambda e: "frame " + str(e.get("frame")))}'
                     "</div>")
        parts.append("</div></div>")
    parts.append("</body></html>\n")
    path = Path(path)
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path


def write_report(out_dir, manifest: Optional[dict] = None, sheet_name: str = "contact_sheet.png",
                 page_name: str = "index.html", thumb_height: int = 96) -> tuple[Path, Path]:
    """(Re)build the contact sheet and ``index.html`` of a render folder from its manifest."""
    out_dir = Path(out_dir)
    if manifest is None:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    story = manifest.get("story", {})
    title = f"{story.get('story_name', 'story')}: {len(manifest.get('shots', []))} shots"
    sheet = write_contact_sheet(out_dir / sheet_name, rows_from_manifest(out_dir, manifest), title=title,
                                thumb_height=thumb_height)
    page = write_index_html(out_dir / page_name, manifest)
    return sheet, page
