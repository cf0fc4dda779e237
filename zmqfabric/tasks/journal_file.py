"""File plumbing of the task journal (:mod:`.journal`): the lock (and the open journals, whose
copies of it a forked child lets go), whole-file reads and writes, a new file renamed into
place, the quarantine file, the previous release's file kept aside.

Every file is opened through :mod:`.files` (0600, no link, regular, ours). Thread-safe (the one
state, :data:`OPEN`, is a WeakSet); errors are OSError unless a function says otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
import weakref
from typing import Any, Iterable, Protocol

from ..errors import JournalError
from .files import open_private

log = logging.getLogger(__name__)

#: Where a journal of the previous release is kept once converted (then ``.1``, ``.2``...).
LEGACY_SUFFIX = ".sqlite"
#: Compaction's new file, until it is renamed over the journal.
COMPACT_SUFFIX = ".compact"
_CHUNK = 1 << 20  # bytes written at a time when a file is rewritten


class Droppable(Protocol):
    def drop_after_fork(self) -> None: ...


#: Open journals (each adds itself when it opens, and leaves when it closes), so that a process
#: forked from the producer does not keep the lock for as long as it lives (the lock belongs to
#: the open file, which a fork shares): the child closes its copies.
OPEN: weakref.WeakSet[Droppable] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for journal in list(OPEN):
        journal.drop_after_fork()
    OPEN.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def lock(path: str) -> int:
    """Open ``path`` (created if missing) and lock it exclusively; returns the descriptor
    (append mode). The lock is checked to be on the file the path names: a previous holder's
    compaction may have renamed another over it since it was opened here. Raises JournalError
    (cannot open, or in use by another process)."""
    for _ in range(3):
        try:
            fd = open_private(path, os.O_RDWR | os.O_APPEND)
        except OSError as exc:
            raise JournalError(path, f"cannot open: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
        except BlockingIOError as exc:
            os.close(fd)
            raise JournalError(path, "in use by another process") from exc
        except OSError:
            os.close(fd)
            continue
        if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            return fd
        os.close(fd)
    raise JournalError(path, "replaced while opening (by a link or another file)")


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    parts, offset = [], 0
    while offset < size:
        part = os.pread(fd, min(size - offset, 1 << 30), offset)
        if not part:
            break
        parts.append(part)
        offset += len(part)
    return b"".join(parts)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[written:]


def replace(path: str, parts: Iterable[bytes]) -> int:
    """Write ``parts`` to a new file, fsync it, lock it, rename it over ``path`` and fsync the
    directory; returns the new file's descriptor (append mode, locked). When it raises, ``path``
    is unchanged (the new file is removed)."""
    tmp = path + COMPACT_SUFFIX
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a crash; a link there is removed, not followed
    fd = open_private(tmp, os.O_RDWR | os.O_APPEND | os.O_EXCL)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        chunk = bytearray()
        for part in parts:
            chunk += part
            if len(chunk) >= _CHUNK:
                write_all(fd, chunk)
                chunk.clear()
        write_all(fd, chunk)
        os.fsync(fd)
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        sync_dir(path)
    except OSError as exc:  # renamed, but a power loss might undo it
        log.error("journal %s: cannot fsync its directory after a rename: %s", path, exc)
    return fd


def sync_dir(path: str) -> None:
    """fsync the directory holding ``path`` (a file created or renamed there)."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(path: str, items: list[dict[str, Any]]) -> bool:
    """Append ``items`` (JSON lines, with the time) to the quarantine file ``path`` (private,
    created if missing) and fsync it; False (logged) when it fails."""
    at = time.time()  # for the reader, not for any expiry
    text = "".join(json.dumps({"at": at, **item}) + "\n" for item in items).encode()
    try:
        fd = open_private(path, os.O_WRONLY | os.O_APPEND)
        try:
            write_all(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("journal quarantine %s: cannot write (the records stay in the journal): %s",
                  path, exc)
        return False
    return True


def keep_legacy(path: str, fd: int, side_files: Iterable[str]) -> str:
    """Link the file ``fd`` (open at ``path``) to a free name beside it, or find the link that a
    conversion which did not finish made; move its ``side_files`` (suffixes) along. Returns the
    name. Raises JournalError."""
    held = os.fstat(fd)
    for n in range(100):
        aside = path + LEGACY_SUFFIX + (f".{n}" if n else "")
        try:
            os.link(path, aside, follow_symlinks=False)
        except FileExistsError:
            with contextlib.suppress(OSError):
                there = os.stat(aside, follow_symlinks=False)
                if (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
                    break
            continue
        except OSError as exc:
            raise JournalError(path, f"cannot keep the sqlite journal: {exc}") from exc
        break
    else:
        raise JournalError(path, "cannot keep the sqlite journal: no free name")
    for suffix in side_files:  # left if sqlite could not checkpoint and remove them
        with contextlib.suppress(FileNotFoundError):
            os.rename(path + suffix, aside + suffix)
    return aside
