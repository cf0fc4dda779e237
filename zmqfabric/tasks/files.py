"""The producer's private files: the journal and the dead-letter file hold task payloads, so they
are mode 0600 whatever the umask, never opened through a symbolic link, and only regular files
owned by this process's user are used.

Thread-safe (no state). Callers translate the OSError raised here into their own errors.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

#: Owner read and write, nobody else: task payloads are the users' data.
MODE = 0o600


def open_private(path: str, flags: int) -> int:
    """Open ``path`` (created 0600 if missing) with the access ``flags`` (os.O_RDWR, ...) and
    return the descriptor, blocking mode, close-on-exec. A symbolic link as the last component
    raises OSError(ELOOP); something other than a regular file (a FIFO, a directory) raises
    OSError(EINVAL); a file of another user raises PermissionError. An existing file with wider
    permissions is narrowed to 0600."""
    # O_NONBLOCK: opening a FIFO planted at the path must not block; it is cleared below.
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, MODE)
    try:
        check_private(fd, path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private(fd: int, path: str) -> os.stat_result:
    """Check what ``fd`` (opened at ``path``) is, and narrow its mode to 0600. Raises OSError
    as :func:`open_private` does."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", path)
    if info.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, f"owned by uid {info.st_uid}, not by us", path)
    if stat.S_IMODE(info.st_mode) != MODE:
        os.fchmod(fd, MODE)
    return info


def check_existing(path: str) -> None:
    """If ``path`` exists, it must be a private regular file (narrowed to 0600), not a link.
    Raises OSError as :func:`open_private` does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    try:
        check_private(fd, path)
    finally:
        os.close(fd)
