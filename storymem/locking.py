"""One writer per render folder: an advisory lock file that names its holder.

    from storymem.locking import FolderLock, FolderLockError

    try:
        with FolderLock(out_dir, owner="storymem render", purpose="render"):
            ...  # only this process writes into out_dir now
    except FolderLockError as err:
        print(err)  # "outputs/story is in use by storymem studio (pid 4242 on host-a, since ...): render"

The lock is ``LOCK_NAME`` inside the folder. On POSIX systems it is held with ``flock`` on that file, so it is
released by the kernel when its process ends, however it ends: a crashed render never leaves a folder locked.
The file's content (JSON: pid, host, owner, purpose, since) is only there to say who holds it. Two locks taken
in the same process on the same folder also exclude each other (each has its own open file). Where ``fcntl`` is
missing, the file is created exclusively and a holder on this host whose process is gone counts as released.

A folder that holds only a stale lock file is otherwise empty: tools that refuse non-empty folders should
ignore ``LOCK_NAME``.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["LOCK_NAME", "FolderLock", "FolderLockError", "read_lock_holder", "describe_holder"]

LOCK_NAME = ".storymem.lock"


class FolderLockError(RuntimeError):
    """The folder is locked by another holder (``holder``: what its lock file says, or None)."""

    def __init__(self, message: str, holder: Optional[dict] = None):
        super().__init__(message)
        self.holder = holder


def read_lock_holder(folder: Union[str, os.PathLike], name: str = LOCK_NAME) -> Optional[dict]:
    """What the lock file of ``folder`` says about its holder (None: no lock file or unreadable). It does not
    say whether the lock is held: a process that died leaves its file behind, unlocked."""
    try:
        data = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: Optional[dict]) -> str:
    """``storymem studio (pid 4242 on host-a, since 2026-01-02T10:00:00+00:00): render``."""
    if not holder:
        return "another process (its lock file is empty)"
    text = (f"{holder.get('owner', 'another process')} (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')})")
    return f"{text}: {holder['purpose']}" if holder.get("purpose") else text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class FolderLock:
    """Exclusive use of ``folder`` (created if missing) while held; see the module doc.

    Args:
        folder: the folder to lock.
        owner: who holds it, as people should read it ("storymem studio", "storymem render").
        purpose: what the holder is doing ("render", "memory edit").
    """

    def __init__(self, folder: Union[str, os.PathLike], owner: str = "storymem", purpose: str = "",
                 name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.owner = owner
        self.purpose = purpose
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _record(self) -> bytes:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "owner": self.owner, "purpose": self.purpose,
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        return (json.dumps(record) + "\n").encode("utf-8")

    def _refuse(self) -> FolderLockError:
        holder = read_lock_holder(self.folder, self.path.name)
        return FolderLockError(f"{self.folder} is in use by {describe_holder(holder)}; wait until it is done, or "
                               "stop it", holder)

    def acquire(self) -> "FolderLock":
        """Take the lock or raise :class:`FolderLockError` naming the holder. Never waits."""
        if self._fd is not None:
            raise FolderLockError(f"{self.folder}: this lock is already held")
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - not POSIX
            return self._acquire_exclusive_create()
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._refuse() from None
            # The previous holder may have removed the file between our open and our flock: then we hold a lock
            # on a file nobody else can see; try again on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self._record())
            self._fd = fd
            return self
        raise FolderLockError(f"{self.path}: could not take the lock (the file keeps changing)")

    def _acquire_exclusive_create(self) -> "FolderLock":  # pragma: no cover - not POSIX
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_lock_holder(self.folder, self.path.name)
                stale = (holder is not None and holder.get("host") == socket.gethostname()
                         and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]))
                if not stale:
                    raise self._refuse() from None
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, self._record())
            self._fd = fd
            return self
        raise self._refuse()

    def release(self) -> None:
        """Give the lock up (removes the lock file). Safe to call when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still locked, so nobody locks a file about to vanish
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"FolderLock({str(self.folder)!r}, held={self.held})"
