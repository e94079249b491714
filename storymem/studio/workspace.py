"""The studio's workspace: the one folder the page reads and writes, and the checks on what comes from the browser.

Layout::

    WORKSPACE/
      stories/        story scripts (opened, uploaded, saved from the page)
      runs/NAME/      render folders (ordinary `storymem render` folders, plus the studio's takes/ and studio/)
      .studio/        the web server's upload area

Every name the browser sends is resolved by :meth:`Workspace.resolve`: relative, no ``..``, no hidden parts,
no absolute path, and after following symbolic links still inside the workspace. Uploaded files are read only
after :func:`check_image_upload` / :func:`check_story_upload` have accepted them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["Workspace", "WorkspaceError", "safe_name", "slug", "check_image_upload", "check_story_upload",
           "MAX_STORY_BYTES", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "STORY_SUFFIXES"]

STORY_SUFFIXES = (".json", ".txt")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_STORY_BYTES = 1 << 20  # a story script is text; ST-Bench's largest is a few KB
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 4096 * 4096
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


class WorkspaceError(ValueError):
    """A name or file from the page that the studio refuses (the message says which and why)."""


def safe_name(name: str, what: str = "name") -> str:
    """``name`` when it is one plain file or folder name (letters, digits, ``_ . -``; no leading dot)."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".") or ".." in name:
        raise WorkspaceError(f"{what} {name!r}: use 1-80 letters, digits, '_', '.' or '-', starting with a letter "
                             "or digit")
    return name


def slug(text: str, default: str = "story") -> str:
    """A safe name made from free text (a story's title): ``"The Lighthouse!"`` -> ``"the-lighthouse"``."""
    value = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:60].strip("-")
    return value or default


class Workspace:
    """The studio's root folder (created if missing) and path confinement inside it."""

    RUNS = "runs"
    STORIES = "stories"
    PRIVATE = ".studio"

    def __init__(self, root: Union[str, os.PathLike]):
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise WorkspaceError(f"--workspace {root}: not a folder")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        for sub in (self.RUNS, self.STORIES, self.PRIVATE):
            (self.root / sub).mkdir(exist_ok=True)

    # ------------------------------------------------------------------ confinement
    def resolve(self, name: str, must_exist: bool = False) -> Path:
        """The path of ``name`` (relative to the workspace, '/'-separated) if it stays inside the workspace."""
        if not isinstance(name, str) or not name.strip():
            raise WorkspaceError("empty path")
        if "\x00" in name or "\\" in name:
            raise WorkspaceError(f"{name!r}: invalid characters in a path")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise WorkspaceError(f"{name!r}: absolute paths are refused; name a file inside the workspace")
        parts = [p for p in name.split("/") if p]
        for part in parts:
            if part in (".", ".."):
                raise WorkspaceError(f"{name!r}: '..' and '.' are refused in paths")
            if part.startswith("."):
                raise WorkspaceError(f"{name!r}: hidden files are not served")
        path = self.root.joinpath(*parts)
        real = path.resolve()
        if real != self.root and self.root not in real.parents:
            raise WorkspaceError(f"{name!r}: leads outside the workspace (symbolic link?)")
        if must_exist and not real.exists():
            raise WorkspaceError(f"{name!r}: not found in the workspace")
        return path

    def relative(self, path: Union[str, os.PathLike]) -> str:
        """``path`` as the workspace-relative name the page shows (refused when outside)."""
        real = Path(path).resolve()
        if real != self.root and self.root not in real.parents:
            raise WorkspaceError(f"{path}: outside the workspace")
        return real.relative_to(self.root).as_posix()

    def contains(self, path: Union[str, os.PathLike]) -> bool:
        real = Path(path).resolve()
        return real == self.root or self.root in real.parents

    # ------------------------------------------------------------------ runs and stories
    def run_folder(self, run: str) -> Path:
        return self.resolve(f"{self.RUNS}/{safe_name(run, 'run name')}")

    def runs(self) -> list[str]:
        """Render folders of the workspace, newest first."""
        folders = [p for p in (self.root / self.RUNS).iterdir()
                   if p.is_dir() and not p.name.startswith(".") and _NAME.match(p.name)
                   and ((p / "manifest.json").is_file() or (p / "story.json").is_file())]
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.name for p in folders]

    def story_path(self, name: str) -> Path:
        name = safe_name(name, "story file name")
        if Path(name).suffix.lower() not in STORY_SUFFIXES:
            name += ".json"
        return self.resolve(f"{self.STORIES}/{name}")

    def stories(self) -> list[str]:
        return sorted(p.name for p in (self.root / self.STORIES).iterdir()
                      if p.is_file() and p.suffix.lower() in STORY_SUFFIXES and _NAME.match(p.name))

    @property
    def upload_dir(self) -> Path:
        return self.root / self.PRIVATE / "uploads"


# ---------------------------------------------------------------------------------------------- uploads
def _check_upload_file(path: Union[str, os.PathLike], allowed_roots: Sequence[Path], max_bytes: int,
                       what: str) -> Path:
    path = Path(path)
    real = path.resolve()
    if allowed_roots and not any(real == r or r in real.parents for r in (Path(x).resolve() for x in allowed_roots)):
        raise WorkspaceError(f"{what} {path.name}: not an upload of this studio")
    if not real.is_file():
        raise WorkspaceError(f"{what} {path.name}: not a file")
    size = real.stat().st_size
    if size > max_bytes:
        raise WorkspaceError(f"{what} {path.name}: {size} bytes is more than the {max_bytes} allowed")
    return real


def check_image_upload(path: Union[str, os.PathLike], allowed_roots: Sequence[Path] = (),
                       max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An uploaded image as uint8 RGB [H, W, 3], once it is shown to be a PNG/JPEG/WebP/BMP of sane size."""
    from PIL import Image, UnidentifiedImageError

    real = _check_upload_file(path, allowed_roots, max_bytes, "image")
    name = Path(path).name
    try:
        with Image.open(real) as image:
            if image.format not in IMAGE_FORMATS:
                raise WorkspaceError(f"image {name}: {image.format} files are not accepted; use "
                                     f"{', '.join(IMAGE_FORMATS)}")
            if image.width * image.height > max_pixels:
                raise WorkspaceError(f"image {name}: {image.width}x{image.height} is too large")
            image.verify()
        with Image.open(real) as image:  # verify() leaves the image unusable; open again to decode
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except WorkspaceError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise WorkspaceError(f"image {name}: not a readable image ({err})") from None


def check_story_upload(path: Union[str, os.PathLike], allowed_roots: Sequence[Path] = (),
                       max_bytes: int = MAX_STORY_BYTES, display_name: Optional[str] = None):
    """An uploaded story script as a :class:`~storymem.story.Story` (ST-Bench JSON or text, validated)."""
    from ..story import StoryError, load_story

    name = display_name or Path(path).name
    if Path(name).suffix.lower() not in STORY_SUFFIXES:
        raise WorkspaceError(f"story {name}: expected a .json or .txt story script")
    real = _check_upload_file(path, allowed_roots, max_bytes, "story")
    try:
        story = load_story(real)
    except StoryError as err:
        raise WorkspaceError(str(err).replace(str(real), name)) from None
    story.path = None
    return story
