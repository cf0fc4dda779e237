"""Reading a journal of the previous release (sqlite, ``tasks`` table), so that :mod:`.journal`
can carry its unsettled tasks into the log format and set the old file aside.

The file is opened with sqlite (read and write: closing the last connection checkpoints its WAL
into the main file, so the file set aside holds everything, quarantine table included); the
caller holds the new format's lock on it. A producer of the previous release that still has it
open holds sqlite's exclusive lock: then this raises, and nothing is changed.

Thread-safe (no state).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from typing import Any
from urllib.parse import quote

from ..errors import JournalError
from . import journal_file
from .files import check_existing
from .journal_log import Row, check_task

log = logging.getLogger(__name__)

#: Files sqlite may keep beside a journal of the previous release.
SIDE_FILES = ("-wal", "-journal", "-shm")


def read(path: str) -> tuple[list[Row], list[tuple[str, Any]]]:
    """The tasks of the sqlite journal at ``path``, oldest first, and its malformed rows as
    ``(reason, row)``. Raises JournalError (in use by another process, or unreadable)."""
    try:
        for suffix in SIDE_FILES:  # sqlite opens them as they are: no link, ours, private
            check_existing(path + suffix)
    except OSError as exc:
        raise JournalError(path, f"cannot open: {exc.strerror or exc}") from exc
    try:
        db = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True, timeout=0,
                             isolation_level=None)
    except sqlite3.Error as exc:
        raise JournalError(path, f"cannot open the previous release's journal: {exc}") from exc
    with contextlib.closing(db):
        try:
            db.execute("BEGIN IMMEDIATE")  # fails at once when a producer still holds it
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1):
                raise JournalError(path, f"schema version {version}; this fabric reads 1")
            found = db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'tasks'"
            ).fetchone()
            rows = [] if found is None else db.execute(
                "SELECT id, name, payload, key, deadline, attempts FROM tasks ORDER BY seq"
            ).fetchall()
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise JournalError(path, "in use by another process") from exc
            raise JournalError(path, f"cannot read: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise JournalError(path, f"not a journal: {exc}") from exc
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    good: list[Row] = []
    bad: list[tuple[str, Any]] = []
    for row in rows:
        why = check_task(row)
        if why is None:
            good.append(row)
        else:
            bad.append((why, row))
    return good, bad


def take_over(path: str, fd: int, quarantine: str) -> tuple[list[Row], str, int]:
    """The journal at ``path`` (open as ``fd``, locked) is of the previous release: read its
    tasks, set the sqlite file aside (returns where) and its malformed rows in ``quarantine``
    (logged). Returns (tasks, the file set aside, how many rows were malformed). Raises
    JournalError."""
    rows, bad = read(path)
    aside = journal_file.keep_legacy(path, fd, SIDE_FILES)
    if bad:
        log.warning("journal %s: %d malformed rows of the sqlite journal not carried over "
                    "(first: %s); they stay in %s", path, len(bad), bad[0][0], aside)
        journal_file.set_aside(quarantine, [
            {"reason": r, "sqlite_row": repr(row)[:4096], "file": aside} for r, row in bad])
    return rows, aside, len(bad)
