"""Atomic writes: every output is written to a temporary file (or folder) beside its destination and moved over
it with ``os.replace``, so an interrupted run never leaves a truncated file or a half-filled folder where a
complete one is expected. What they leave behind has the modes the user's umask gives any new file or folder
(the temporary names' private modes are not kept)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Union

__all__ = ["atomic_path", "atomic_folder", "swap_in_folder", "atomic_write", "atomic_write_bytes",
           "atomic_write_text", "atomic_write_json", "jsonable"]

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process's file mode creation mask (read without changing it where /proc tells it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix (tools that pick a format by extension,
    like ffmpeg or PIL, see the real one); on success move it over ``path``, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    try:
        # mkstemp makes the file private (0600); the output gets the mode any new file of the user's gets.
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success swap it in for ``path`` (a folder already
    there is moved aside first and removed after the swap), on failure remove it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private (0700), like mkstemp's files
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in_folder(tmp, target)


def swap_in_folder(tmp: PathLike, target: PathLike) -> None:
    """Put the complete folder ``tmp`` in place of ``target`` (a sibling); an old ``target`` is removed after."""
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists():
        # Two renames, not rmtree then rename: a crash in between leaves the complete old folder aside.
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: PathLike, writer: Callable[[str], Any]) -> Path:
    """Call ``writer(tmp_path)`` to produce the file, then move it into place."""
    with atomic_path(path) as tmp:
        writer(str(tmp))
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes, fsync: bool = False) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")




def jsonable(obj: Any) -> Any:
    """``obj`` made JSON-serialisable for records such as a run's settings: dicts and lists/tuples recursively,
    paths as strings, everything else unchanged."""
    if isinstance(obj, dict):
        return {key: jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(value) for value in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
