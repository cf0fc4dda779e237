"""The producer's task journal: unsettled tasks on disk, so that a producer that crashes resends
them when it starts again.

The dispatcher records every task *before* sending it (the insert is committed first) and deletes
it once it is settled (done or dead-lettered; those deletes are batched). A producer killed at any
point therefore finds every task that may not have completed, and resends it: together with the
workers' at-least-once delivery, nothing submitted is lost, and a task may run twice.

Storage is sqlite in WAL mode with ``synchronous=NORMAL``: a committed transaction is in the WAL
file (written with write(2)) when COMMIT returns, so it survives the process being killed, even
with SIGKILL; the WAL is fsynced only at checkpoints, so an operating-system crash or power loss
may lose the last transactions. ``fsync=True`` (``synchronous=FULL``) closes that gap at the cost
of an fsync per commit. One process at a time: the file is locked exclusively while open
(``locking_mode=EXCLUSIVE``), and a second producer on it gets :class:`JournalError`.

Owned by one thread at a time (the dispatcher's); not thread-safe.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass
from typing import Iterable

from ..errors import JournalError

log = logging.getLogger(__name__)

#: Schema version in ``PRAGMA user_version``; a journal of another version is refused.
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    payload BLOB NOT NULL,
    key TEXT,
    deadline REAL NOT NULL,
    attempts INTEGER NOT NULL
) WITHOUT ROWID
"""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One unsettled task as recorded: what the dispatcher needs to send it again."""

    task_id: str
    name: str
    payload: bytes
    key: str | None
    deadline_s: float
    max_attempts: int


class Journal:
    """An open journal file. ``Journal(path)`` allocates; ``open()`` opens, locks and loads."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync
        self._db: sqlite3.Connection | None = None
        self._seq = 0
        self._in_transaction = False

    def open(self) -> list[JournalEntry]:
        """Open (creating it if needed) and lock the file; return the tasks it holds, oldest
        first. Raises JournalError (unreadable, another version, or in use by another process)."""
        try:
            db = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot open: {exc}") from exc
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise JournalError(self.path, f"cannot switch to WAL mode (got {mode!r})")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            db.execute("BEGIN EXCLUSIVE")  # takes the lock that locking_mode keeps until close
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise JournalError(self.path, f"schema version {version}; this fabric writes "
                                              f"{SCHEMA_VERSION}")
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
            rows = db.execute(
                "SELECT id, name, payload, key, deadline, attempts, seq FROM tasks ORDER BY seq"
            ).fetchall()
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise JournalError(self.path, "in use by another process") from exc
            raise JournalError(self.path, f"cannot read: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            db.close()
            raise JournalError(self.path, f"not a journal: {exc}") from exc
        except BaseException:
            db.close()
            raise
        self._db = db
        self._seq = rows[-1][6] if rows else 0
        if rows:
            log.info("journal %s: %d unsettled tasks to resend", self.path, len(rows))
        return [JournalEntry(r[0], r[1], bytes(r[2]), r[3], r[4], r[5]) for r in rows]

    def _begin(self) -> sqlite3.Connection:
        db = self._db
        if db is None:
            raise JournalError(self.path, "not open")
        if not self._in_transaction:
            db.execute("BEGIN")
            self._in_transaction = True
        return db

    def add(self, entries: Iterable[tuple[str, str, bytes, str | None, float, int]]) -> None:
        """Record tasks ``(id, name, payload, key, deadline_s, max_attempts)``; durable after
        the next ``commit()``. Raises JournalError."""
        db = self._begin()
        seq = self._seq

        def rows() -> Iterable[tuple[object, ...]]:
            nonlocal seq
            for task_id, name, payload, key, deadline_s, attempts in entries:
                seq += 1
                yield task_id, seq, name, payload, key, deadline_s, attempts

        try:
            db.executemany(
                "INSERT OR REPLACE INTO tasks (id, seq, name, payload, key, deadline, attempts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows(),
            )
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot record tasks: {exc}") from exc
        self._seq = seq

    def remove(self, task_ids: Iterable[str]) -> None:
        """Forget settled tasks; durable after the next ``commit()``. Raises JournalError."""
        db = self._begin()
        try:
            db.executemany("DELETE FROM tasks WHERE id = ?", ((i,) for i in task_ids))
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot forget tasks: {exc}") from exc

    @property
    def dirty(self) -> bool:
        """True when changes wait for a commit."""
        return self._in_transaction

    def commit(self) -> None:
        """Make everything added and removed so far durable. Raises JournalError."""
        if not self._in_transaction or self._db is None:
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot commit: {exc}") from exc
        finally:
            self._in_transaction = self._db.in_transaction

    def rollback(self) -> None:
        """Drop changes not yet committed (after a failed add or remove)."""
        if self._in_transaction and self._db is not None:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.error("journal %s: rollback failed: %s", self.path, exc)
            self._in_transaction = self._db.in_transaction

    def count(self) -> int:
        """How many unsettled tasks the journal holds (committed or not)."""
        if self._db is None:
            raise JournalError(self.path, "not open")
        return int(self._db.execute("SELECT count(*) FROM tasks").fetchone()[0])

    def close(self) -> None:
        """Commit and close (releasing the lock). Idempotent."""
        db, self._db = self._db, None
        if db is None:
            return
        try:
            if self._in_transaction:
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("journal %s: last commit failed: %s", self.path, exc)
        finally:
            self._in_transaction = False
            db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
