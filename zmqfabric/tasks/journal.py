"""The producer's task journal: unsettled tasks on disk, so that a producer that crashes resends
them when it starts again.

Every task is recorded (the insert committed) before ``submit`` returns, so before it is sent,
and deleted once it is settled (done or dead-lettered; those deletes are batched). A producer
killed at any point therefore finds every task that may not have completed, and resends it:
together with the workers' at-least-once delivery, nothing whose ``submit`` returned is lost,
and a task may run twice.

Storage is sqlite in WAL mode with ``synchronous=NORMAL``: a committed transaction is in the WAL
file (written with write(2)) when COMMIT returns, so it survives the process being killed, even
with SIGKILL; the WAL is fsynced only at checkpoints, so an operating-system crash or power loss
may lose the last transactions. ``fsync=True`` (``synchronous=FULL``) closes that gap at the cost
of an fsync per commit. One process at a time: the file is locked exclusively while open
(``locking_mode=EXCLUSIVE``), and a second producer on it gets :class:`JournalError`.

The file holds task payloads: it is created 0600 whatever the umask (sqlite gives its WAL the
same mode), and a symbolic link, a file that is not regular or one of another user is refused
(:mod:`.files`); the path is checked again once sqlite has opened it. Keep the journal in a
directory other users cannot write: one who can may still swap the path in the microseconds
between the check and sqlite's open.

Rows are checked as they load: a row that is not a task this fabric could have written (wrong
types, a bad name, a payload that is not msgpack, ...) is moved to the table ``quarantine``
with the reason, counted in ``quarantined`` and logged; the others load.

Not thread-safe: :class:`~zmqfabric.tasks.recorder.Recorder` serialises the submitters (who
record) and the dispatcher thread (which deletes).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Iterable

from ..constants import MAX_TASK_ID, MAX_TASK_KEY
from ..core import wire
from ..errors import FabricError, JournalError
from .config import validate_task_name
from .files import check_existing, open_private

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
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    id, seq, name, payload, key, deadline, attempts, reason TEXT, at REAL
);
"""
_INSERT = ("INSERT OR REPLACE INTO tasks (id, seq, name, payload, key, deadline, attempts) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")
#: Pages of a new journal (bytes): each commit writes its changed pages to the WAL, and the
#: usual rows (tens of bytes) make a small page cheaper to commit (measured: ~25% per task).
_PAGE_SIZE = 1024
#: Files sqlite may create beside the journal: they hold the same payloads.
_SIDE_FILES = ("-wal", "-journal", "-shm")


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
        #: Malformed rows moved to quarantine by open().
        self.quarantined = 0

    def open(self) -> list[JournalEntry]:
        """Open (creating it if needed) and lock the file; return the tasks it holds, oldest
        first, after moving malformed rows to quarantine. Raises JournalError (unreadable, a
        link or not private, another version, or in use by another process)."""
        created = self._prepare_file()
        try:
            db = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot open: {exc}") from exc
        try:
            rows = self._load(db, created)
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
        entries, bad = [], []
        for row in rows:
            why = check_row(row)
            if why is None:
                entries.append(JournalEntry(row[0], row[1], bytes(row[2]), row[3], row[4], row[5]))
            else:
                bad.append((row[0], why))
        self._seq = max((r[6] for r in rows if type(r[6]) is int), default=0)
        if bad:
            self._quarantine(bad)
        if entries:
            log.info("journal %s: %d unsettled tasks to resend", self.path, len(entries))
        return entries

    def _prepare_file(self) -> os.stat_result:
        """Create or check the file and its side files (0600, no link, ours); returns what the
        path is, to compare once sqlite has it. The descriptor is closed before sqlite opens the
        file: closing one of a process's descriptors of a file drops all its POSIX locks there,
        sqlite's included. Raises JournalError."""
        try:
            for suffix in _SIDE_FILES:
                check_existing(self.path + suffix)
            fd = open_private(self.path, os.O_RDWR)
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise JournalError(self.path, f"cannot open: {exc.strerror or exc}") from exc

    def _load(self, db: sqlite3.Connection, created: os.stat_result) -> list[Any]:
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # a new file only; ignored otherwise
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise JournalError(self.path, f"cannot switch to WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        db.execute("BEGIN EXCLUSIVE")  # takes the lock that locking_mode keeps until close
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise JournalError(self.path, f"schema version {version}; this fabric writes "
                                          f"{SCHEMA_VERSION}")
        for statement in _SCHEMA.split(";"):  # not executescript: it would commit first
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
        try:  # lstat only: opening the files again here would drop sqlite's locks
            now = os.stat(self.path, follow_symlinks=False)
            links = [s for s in _SIDE_FILES if os.path.islink(self.path + s)]
        except OSError as exc:
            raise JournalError(self.path, f"changed while opening: {exc}") from exc
        if (now.st_dev, now.st_ino) != (created.st_dev, created.st_ino) or links:
            raise JournalError(self.path, "replaced while opening (by a link or another file)")
        return db.execute(
            "SELECT id, name, payload, key, deadline, attempts, seq FROM tasks ORDER BY seq"
        ).fetchall()

    def _quarantine(self, bad: list[tuple[Any, str]]) -> None:
        db = self._db
        assert db is not None
        at = time.time()  # for the reader of the quarantine table, not for any expiry
        try:
            db.execute("BEGIN")
            for task_id, why in bad:
                db.execute(
                    "INSERT INTO quarantine SELECT id, seq, name, payload, key, deadline, "
                    "attempts, ?, ? FROM tasks WHERE id IS ?", (why, at, task_id))
                db.execute("DELETE FROM tasks WHERE id IS ?", (task_id,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self.rollback()
            log.error("journal %s: cannot quarantine %d rows: %s", self.path, len(bad), exc)
        self.quarantined += len(bad)
        log.warning("journal %s: %d malformed rows moved to its quarantine table (first: %s)",
                    self.path, len(bad), bad[0][1])

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
            db.executemany(_INSERT, rows())
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot record tasks: {exc}") from exc
        self._seq = seq

    def add_now(self, entries: list[tuple[str, str, bytes, str | None, float, int]]) -> None:
        """``add`` and ``commit`` in one go; a single task is one statement, its own
        transaction (the common case of a thread submitting in a loop). Raises JournalError."""
        if len(entries) != 1 or self._in_transaction or self._db is None:
            self.add(entries)
            self.commit()
            return
        task_id, name, payload, key, deadline_s, attempts = entries[0]
        try:
            self._db.execute(_INSERT, (task_id, self._seq + 1, name, payload, key, deadline_s,
                                       attempts))
        except sqlite3.Error as exc:
            raise JournalError(self.path, f"cannot record a task: {exc}") from exc
        self._seq += 1

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


def check_row(row: tuple[Any, ...]) -> str | None:
    """Why a journal row ``(id, name, payload, key, deadline, attempts, seq)`` is not a task
    this fabric could have written, or None when it is one."""
    task_id, name, payload, key, deadline, attempts, seq = row
    if type(task_id) is not str or not 0 < len(task_id) <= MAX_TASK_ID:
        return f"id must be a string of 1 to {MAX_TASK_ID} characters"
    try:
        validate_task_name(name)
    except FabricError as exc:
        return f"bad task name: {exc}"
    if key is not None and (type(key) is not str or len(key) > MAX_TASK_KEY):
        return f"key must be null or a string of at most {MAX_TASK_KEY} characters"
    if type(deadline) not in (int, float) or not 0 < deadline < math.inf:
        return "deadline must be a number of seconds > 0"
    if type(attempts) is not int or attempts < 1:
        return "attempts must be an integer >= 1"
    if type(seq) is not int:
        return "seq must be an integer"
    if type(payload) is not bytes:
        return "payload must be a blob"
    try:
        wire.unpack_body(payload)
    except FabricError as exc:
        return f"payload: {exc}"
    return None
