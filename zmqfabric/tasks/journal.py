"""The producer's task journal: unsettled tasks on disk, so that a producer that crashes resends
them when it starts again.

Every task is recorded (its record written to the file) before ``submit`` returns, so before it
is sent, and forgotten once it is settled (done or dead-lettered; those records are batched). A
producer killed at any point therefore finds every task that may not have completed, and resends
it: together with the workers' at-least-once delivery, nothing whose ``submit`` returned is lost,
and a task may run twice.

Storage is an append-only log (:mod:`.journal_log`): a task is one record appended with one
write(2), a batch of settled tasks another. A written record is in the operating system's cache
when write returns, so it survives the process being killed, even with SIGKILL; an operating
system crash or power loss may lose the last records. ``fsync=True`` closes that gap at the cost
of an fdatasync per write (per group of records: :mod:`.recorder` shares one among concurrent
submitters). When the file is mostly settled tasks (at least ``JOURNAL_COMPACT_MIN_BYTES``, at
most a quarter live) it is compacted: the live records are written to a new file, fsynced, and
renamed over the journal, then the directory is fsynced; a crash at any point leaves the old file
or the new one, both complete. Every record has its length and a checksum: a record the last
process did not finish writing (a torn tail) is dropped when the file is opened, with a log line.
A record that is complete but malformed (not one this fabric writes, or a task it could not have
written), or a corrupt region inside the file, is quarantined: appended with its reason to
``<journal>.quarantine`` (JSON lines, the record in base64), counted in ``quarantined`` and
logged; the tasks after it load.

One process at a time: the file is locked (``flock``, exclusive) while open, and a second
producer on it gets :class:`JournalError` "in use by another process". The files hold task
payloads: they are created 0600 whatever the umask, and a symbolic link, a file that is not
regular or one of another user is refused (:mod:`.files`). Keep the journal in a directory other
users cannot write.

A journal of the previous release (sqlite) is converted when opened: its tasks are written to a
new file in this format, which replaces it, and the sqlite file is kept beside it as
``<journal>.sqlite`` (:mod:`.journal_legacy`; logged). A crash during the conversion leaves the
sqlite file in place, and the next open converts it again.

Not thread-safe: :class:`~zmqfabric.tasks.recorder.Recorder` serialises the submitters (who
record) and the dispatcher thread (which forgets).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import msgpack

from ..constants import JOURNAL_COMPACT_MIN_BYTES
from ..errors import JournalError
from . import journal_file, journal_legacy
from .journal_log import (
    ADD,
    FILE_HEADER,
    HEAD,
    MARKER,
    SETTLED,
    SQLITE_HEADER,
    Row,
    frame,
    replay,
    settled_record,
)

log = logging.getLogger(__name__)

#: Malformed records are appended to this file beside the journal (JSON lines).
QUARANTINE_SUFFIX = ".quarantine"
_pack_head = HEAD.pack
_crc32 = zlib.crc32


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
        self._fd: int | None = None
        self._pack = msgpack.Packer().pack  # one per journal: a Packer is not thread-safe
        self._live: dict[str, tuple[int, int]] = {}  # task id -> (offset, size) of its record
        self._live_bytes = 0
        self._size = 0  # where the next record goes
        self._pending: list[tuple[int, Any, bytes]] = []  # (ADD, id | SETTLED, ids, record)
        self._compact_at = JOURNAL_COMPACT_MIN_BYTES
        #: Malformed records and corrupt regions set aside by open().
        self.quarantined = 0

    # --- opening -------------------------------------------------------------------------------

    def open(self) -> list[JournalEntry]:
        """Open (creating it if needed) and lock the file; return the tasks it holds, oldest
        first, after setting malformed records aside. Raises JournalError (unreadable, a link or
        not private, not a journal, or in use by another process)."""
        if self._fd is not None:
            raise JournalError(self.path, "already open")
        self._fd = journal_file.lock(self.path)
        journal_file.OPEN.add(self)  # a forked child drops its copy of the lock
        try:
            return self._load(self._fd)
        except BaseException:
            fd, self._fd = self._fd, None  # a conversion may have replaced the first one
            journal_file.OPEN.discard(self)
            if fd is not None:
                os.close(fd)
            raise

    def _load(self, fd: int) -> list[JournalEntry]:
        try:
            data = journal_file.read_all(fd)
        except OSError as exc:
            raise JournalError(self.path, f"cannot read: {exc.strerror or exc}") from exc
        if data.startswith(SQLITE_HEADER):
            return self._convert()
        if len(data) < len(FILE_HEADER) and FILE_HEADER.startswith(data):
            if data:  # killed while writing the header of a new file
                log.warning("journal %s: dropped a torn header of %d bytes", self.path, len(data))
            self._new_file(fd)
            return []
        if not data.startswith(FILE_HEADER):
            raise JournalError(self.path, "not a journal (neither this format nor sqlite)")
        found = replay(data)
        tasks, live, bad, torn = found.tasks, found.live, found.bad, found.torn
        self._live = live
        self._live_bytes = sum(size for _, size in live.values())
        self._size = len(data)
        if torn >= 0:
            log.warning("journal %s: dropped a torn tail of %d bytes at offset %d (a write the "
                        "last process did not finish)", self.path, len(data) - torn, torn)
            try:
                os.ftruncate(fd, torn)
            except OSError as exc:
                raise JournalError(self.path, f"cannot drop a torn tail: {exc}") from exc
            self._size = torn
        if bad:
            self.quarantined += len(bad)
            log.warning("journal %s: %d malformed records set aside in %s (first: %s)",
                        self.path, len(bad), self.path + QUARANTINE_SUFFIX, bad[0][0])
            kept = [{"reason": r, "offset": o, "record": base64.b64encode(raw).decode()}
                    for r, o, raw in bad]
            if journal_file.set_aside(self.path + QUARANTINE_SUFFIX, kept):
                self._compact()  # the file without them
        elif self._mostly_dead():
            self._compact()
        if tasks:
            log.info("journal %s: %d unsettled tasks to resend", self.path, len(tasks))
        return [JournalEntry(*row) for row in tasks.values()]

    def _new_file(self, fd: int) -> None:
        try:
            os.ftruncate(fd, 0)
            journal_file.write_all(fd, FILE_HEADER)
            if self.fsync:
                os.fsync(fd)
                journal_file.sync_dir(self.path)
        except OSError as exc:
            raise JournalError(self.path, f"cannot write: {exc.strerror or exc}") from exc
        self._size = len(FILE_HEADER)

    def _convert(self) -> list[JournalEntry]:
        """The file is a journal of the previous release: carry its tasks over."""
        assert self._fd is not None
        rows, aside, bad = journal_legacy.take_over(self.path, self._fd,
                                                    self.path + QUARANTINE_SUFFIX)
        self.quarantined += bad
        records = ((row[0], frame(self._pack((ADD, *row)))) for row in rows)
        if not self._rewrite(records):
            raise JournalError(self.path, "cannot convert the previous release's journal")
        log.warning("journal %s: converted from the previous release's sqlite format (%d "
                    "tasks); the old file is kept as %s", self.path, len(rows), aside)
        return [JournalEntry(*row) for row in rows]

    # --- rewriting -----------------------------------------------------------------------------

    def _mostly_dead(self) -> bool:
        return self._size >= self._compact_at and self._live_bytes * 4 <= self._size

    def _compact(self) -> None:
        """Rewrite the file with only the live tasks' records. A failure is logged (the file
        stays as it is) and the next try waits until the file has doubled."""
        fd = self._fd
        assert fd is not None

        def records() -> Iterator[tuple[str, bytes]]:
            for task_id, (offset, size) in self._live.items():
                record = os.pread(fd, size, offset)
                if len(record) != size:
                    raise OSError(errno.EIO, "short read", self.path)
                yield task_id, record

        before = self._size
        if self._rewrite(records()):
            self._compact_at = JOURNAL_COMPACT_MIN_BYTES
            log.debug("journal %s: compacted %d -> %d bytes", self.path, before, self._size)
        else:
            self._compact_at = 2 * self._size

    def _rewrite(self, records: Iterable[tuple[str, bytes]]) -> bool:
        """Replace the file by one holding the header and ``records`` (task id, record), which
        is then the journal. False (logged) when it fails: the old file stays."""
        live: dict[str, tuple[int, int]] = {}
        size = len(FILE_HEADER)

        def parts() -> Iterator[bytes]:
            nonlocal size
            yield FILE_HEADER
            for task_id, record in records:
                live[task_id] = (size, len(record))
                size += len(record)
                yield record

        try:
            new = journal_file.replace(self.path, parts())
        except OSError as exc:
            log.error("journal %s: cannot rewrite the file: %s", self.path, exc)
            return False
        old, self._fd = self._fd, new
        if old is not None:
            os.close(old)
        self._live, self._size = live, size
        self._live_bytes = sum(s for _, s in live.values())
        return True

    # --- recording -----------------------------------------------------------------------------

    def _append(self, record: bytes) -> int:
        """Write ``record`` at the end (fdatasync with ``fsync``); returns its offset. On a
        failure the file is cut back to where it was. Raises JournalError."""
        fd = self._fd
        if fd is None:
            raise JournalError(self.path, "not open")
        try:
            written = os.write(fd, record)
            if written != len(record):
                journal_file.write_all(fd, record[written:])
            if self.fsync:
                os.fdatasync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, self._size)
            except OSError as again:  # the next open quarantines the fragment
                log.error("journal %s: cannot cut a failed write: %s", self.path, again)
            raise JournalError(self.path, f"cannot write: {exc.strerror or exc}") from exc
        offset = self._size
        self._size = offset + len(record)
        return offset

    def _added(self, task_id: str, offset: int, size: int) -> None:
        old = self._live.pop(task_id, None)
        if old is not None:
            self._live_bytes -= old[1]
        self._live[task_id] = (offset, size)
        self._live_bytes += size

    def add(self, entries: Iterable[Row]) -> None:
        """Record tasks ``(id, name, payload, key, deadline_s, max_attempts)``; durable after
        the next ``commit()``. Raises JournalError."""
        if self._fd is None:
            raise JournalError(self.path, "not open")
        pack = self._pack
        try:
            self._pending.extend((ADD, row[0], frame(pack((ADD, *row)))) for row in entries)
        except (TypeError, ValueError) as exc:
            raise JournalError(self.path, f"cannot record tasks: {exc}") from exc

    def add_now(self, entries: list[Row]) -> None:
        """``add`` and ``commit`` in one go; a single task is one write (the common case of a
        thread submitting in a loop). Raises JournalError."""
        if len(entries) != 1 or self._pending:
            self.add(entries)
            self.commit()
            return
        self.add_one(*entries[0])

    def add_one(self, task_id: str, name: str, payload: bytes, key: str | None,
                deadline_s: float, max_attempts: int) -> None:
        """``add_now`` of one task, its fields as arguments (no row built): the path of a
        thread that submits in a loop. Raises JournalError."""
        if self._pending:
            self.add_now([(task_id, name, payload, key, deadline_s, max_attempts)])
            return
        try:
            body = self._pack((ADD, task_id, name, payload, key, deadline_s, max_attempts))
        except (TypeError, ValueError) as exc:
            raise JournalError(self.path, f"cannot record a task: {exc}") from exc
        size = len(body)
        offset = self._append(_pack_head(MARKER, size, _crc32(body, size)) + body)
        live = self._live
        if task_id in live:  # recorded again: the newest record counts
            self._live_bytes -= live.pop(task_id)[1]
        size += HEAD.size
        live[task_id] = (offset, size)
        self._live_bytes += size

    def remove(self, task_ids: Iterable[str]) -> None:
        """Forget settled tasks; durable after the next ``commit()``. Raises JournalError."""
        if self._fd is None:
            raise JournalError(self.path, "not open")
        ids = list(task_ids)
        if not any(kind == ADD for kind, _, _ in self._pending):
            live = self._live
            ids = [task_id for task_id in ids if task_id in live]
        if ids:
            self._pending.append((SETTLED, ids, settled_record(ids)))

    @property
    def dirty(self) -> bool:
        """True when changes wait for a commit."""
        return bool(self._pending)

    def commit(self) -> None:
        """Make everything added and removed so far durable (one write); compact the file when
        it is mostly settled tasks. Raises JournalError (then nothing pending is written)."""
        pending = self._pending
        if not pending or self._fd is None:
            return
        offset = self._append(b"".join(record for _, _, record in pending))
        self._pending = []
        removed = False
        for kind, value, record in pending:
            if kind == ADD:
                self._added(value, offset, len(record))
            else:
                removed = True
                for task_id in value:
                    old = self._live.pop(task_id, None)
                    if old is not None:
                        self._live_bytes -= old[1]
            offset += len(record)
        if removed and self._mostly_dead():
            self._compact()

    def rollback(self) -> None:
        """Drop changes not yet committed (after a failed add or remove)."""
        self._pending = []

    def count(self) -> int:
        """How many unsettled tasks the journal holds (committed or not)."""
        if self._fd is None:
            raise JournalError(self.path, "not open")
        if not self._pending:
            return len(self._live)
        ids = set(self._live)
        for kind, value, _ in self._pending:
            if kind == ADD:
                ids.add(value)
            else:
                ids.difference_update(value)
        return len(ids)

    def close(self) -> None:
        """Commit and close (releasing the lock). Idempotent."""
        if self._fd is None:
            return
        try:
            self.commit()
        except JournalError as exc:
            log.error("journal %s: last commit failed: %s", self.path, exc)
        finally:
            fd, self._fd = self._fd, None
            self._pending = []
            journal_file.OPEN.discard(self)
            if fd is not None:
                os.close(fd)

    def drop_after_fork(self) -> None:
        """In a process forked from the one that opened it (:data:`journal_file.OPEN`'s fork
        hook calls it): close this copy of the file without writing, so that the lock goes with
        the opener. Idempotent."""
        fd, self._fd = self._fd, None
        self._pending = []
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

