"""Durable submit: a producer's journal shared by the threads that submit (they record tasks) and
the dispatcher thread (it forgets settled ones).

``record(rows)`` returns once the rows are written to the journal file, so a task whose
``submit`` returned survives the producer being killed. Commits are grouped: a submitter that
finds the journal busy queues its rows, and whoever commits next takes every row queued by then
in one write (and one fdatasync with ``fsync``), so concurrent submitters share commits and none
waits for more than the commit in progress and its own. A single thread that submits in a loop
pays one write per call; ``submit_many`` pays one per batch.

Thread-safe: every use of the journal holds ``_commit_lock``.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Iterable

from ..errors import JournalError
from ..stats import RateLimitedLog
from .journal import Journal

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)

#: (task id, name, payload, key, deadline_s, max_attempts), as :meth:`Journal.add` takes it.
Row = tuple[str, str, bytes, str | None, float, int]
#: Failed commits remembered so that every submitter of the batch hears of it: its submitters
#: all wait on the commit lock while it runs, so they look long before this many more fail.
_REFUSALS_KEPT = 64


class Recorder:
    """Group commit over an open :class:`Journal`, which it then owns (``close()`` closes it)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._queue: list[tuple[int, list[Row]]] = []  # (ticket of the last row, rows)
        self._queued = 0  # rows ever queued: row n has ticket n
        self._handled = 0  # rows ever taken by a committer (committed or refused)
        self._refused: collections.deque[tuple[int, int, JournalError]] = collections.deque(
            maxlen=_REFUSALS_KEPT)
        self.commits = 0

    def record(self, rows: list[Row]) -> None:
        """Add ``rows`` to the journal; return once they are committed. Raises JournalError
        (then none of them is recorded). Thread-safe; blocks for a commit or two."""
        if self._commit_lock.acquire(False):  # nobody committing: no queue either
            try:
                if not self._queue:  # else others wait for this lock: take theirs along
                    self._write(rows)
                    return
            finally:
                self._commit_lock.release()
        with self._queue_lock:
            self._queued += len(rows)
            ticket = self._queued
            self._queue.append((ticket, rows))
        with self._commit_lock:
            if self._handled < ticket:  # nobody took ours yet: commit every row queued so far
                with self._queue_lock:
                    parts, self._queue = self._queue, []
                    self._handled = self._queued
                self._commit(parts)
        for first, last, error in list(self._refused):
            if first < ticket <= last:
                raise error

    def record_one(self, task_id: str, name: str, payload: bytes, key: str | None,
                   deadline_s: float, max_attempts: int) -> None:
        """``record`` of one task, its row's fields as arguments: the uncontended commit
        without a row, a list or a call to ``_write``. Raises JournalError. Thread-safe."""
        lock = self._commit_lock
        if lock.acquire(False):  # positional: a keyword costs as much as the lock itself
            try:
                if not self._queue:  # else others wait for this lock: take theirs along
                    journal = self.journal
                    try:
                        journal.add_one(task_id, name, payload, key, deadline_s, max_attempts)
                    except JournalError:
                        journal.rollback()
                        raise
                    self.commits += 1
                    return
            finally:
                lock.release()
        self.record([(task_id, name, payload, key, deadline_s, max_attempts)])

    def _commit(self, parts: list[tuple[int, list[Row]]]) -> None:
        """One transaction for every part; if it fails, one per part, so that a part the journal
        refuses fails its own submitter only."""
        try:
            self._write([row for _, rows in parts for row in rows] if len(parts) > 1
                        else parts[0][1])
            return
        except JournalError as exc:
            if len(parts) == 1:
                self._refused.append((parts[0][0] - len(parts[0][1]), parts[0][0], exc))
                return
        for ticket, rows in parts:
            try:
                self._write(rows)
            except JournalError as exc:
                self._refused.append((ticket - len(rows), ticket, exc))

    def _write(self, rows: list[Row]) -> None:
        journal = self.journal
        try:
            journal.add_now(rows)
        except JournalError:
            journal.rollback()
            raise
        self.commits += 1

    def forget(self, task_ids: Iterable[str]) -> None:
        """Remove settled tasks (dispatcher thread). A failure is logged: the tasks are resent
        by the next producer on this journal, a repeat rather than a loss."""
        with self._commit_lock:
            try:
                self.journal.remove(task_ids)
                self.journal.commit()
            except JournalError as exc:
                self.journal.rollback()
                _rlog.warning("journal", "%s", exc)

    def close(self) -> None:
        """Close the journal (after any commit in progress). Later ``record`` calls raise
        JournalError. Idempotent."""
        with self._commit_lock:
            self.journal.close()
