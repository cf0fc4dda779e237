"""Reliable tasks, the producer side: where settled tasks go. A task's table says it is done or
dead (an :class:`~zmqfabric.core.tasktable.Outcome`); the :class:`Settler` then settles its
handle, forgets it in the journal and dead-letters a dead one.

The dispatcher thread (:mod:`.producer`) collects outcomes during a round and calls ``finish``
at its end: journal removals are batched (one write per JOURNAL_COMMIT_S), handles are settled
under one lock per round and their waiters woken, and the registry hears how many settled
(backpressure, ``wait_tasks``). ``fail_submitted`` is for any thread, once the dispatcher is
gone. Not thread-safe otherwise.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..constants import JOURNAL_COMMIT_S
from ..core.tasktable import Outcome, Task, TaskTable
from ..errors import ClosedError, FabricError, TaskFailedError
from .deadletters import DeadLetters
from .handle import HandleOwner, HandleState, TaskHandle, settle, settle_done
from .recorder import Recorder

log = logging.getLogger(__name__)


class Settler:
    """Settles the tasks of one dispatcher. ``recorder``: the open journal, if any (closed by
    ``close``); ``dead``: the dead-letter publishers (closed by ``close``)."""

    def __init__(self, tasks: HandleOwner, recorder: Recorder | None, dead: DeadLetters,
                 node_name: str) -> None:
        self._tasks = tasks
        self._recorder = recorder
        self._dead = dead
        self._node_name = node_name
        #: Settled task ids the journal has not forgotten yet (written every JOURNAL_COMMIT_S).
        self._removals: list[str] = []
        #: Tasks done this round (their handles settled by ``finish``), other handle changes.
        self._done: list[Task] = []
        self._changes: list[tuple[TaskHandle, HandleState, Any]] = []
        self._settled = 0
        self._last_commit = 0.0

    def collect(self, name: str, outcome: Outcome) -> None:
        """Take an outcome of task ``name``'s table; its handles settle at ``finish``."""
        if not outcome:
            return
        if outcome.done:
            self._done.extend(outcome.done)
            if self._recorder is not None:
                self._removals.extend([task.id for task in outcome.done])
        for task in outcome.dead:
            error_type, error = task.error or ("Error", "")
            failure = TaskFailedError(name, task.id, task.charged, error_type, error)
            if type(task) is TaskHandle:  # else resumed without a key: nobody to tell
                self._changes.append((task, HandleState.FAILED, failure))
            if self._recorder is not None:
                self._removals.append(task.id)
            self._dead.send(name, task, failure)
        self._settled += len(outcome.done) + len(outcome.dead)

    def finish(self, now: float) -> None:
        """End of a round: journal removals (batched), then settle handles and wake waiters."""
        if self._removals and now - self._last_commit >= JOURNAL_COMMIT_S:
            assert self._recorder is not None
            self._recorder.forget(self._removals)
            self._removals = []
            self._last_commit = now
        if self._done:
            done, self._done = self._done, []
            settle_done(self._tasks, done)
        if self._changes:
            changes, self._changes = self._changes, []
            settle(self._tasks, changes)
        if self._settled:
            self._tasks.settled(self._settled)
            self._settled = 0

    def close(self, tables: list[TaskTable], now: float) -> None:
        """The dispatcher is closing: write what the journal must forget, fail every task still
        unsettled with ClosedError (the journal keeps them), close the dead letters and the
        journal."""
        try:
            if self._recorder is not None and self._removals:
                self._recorder.forget(self._removals)
            self._removals = []
        except Exception:
            log.exception("%s: cannot save the task journal on close", self._node_name)
        closed = ClosedError(f"node {self._node_name!r} closed before the task settled")
        for table in tables:
            for task in table.drain():
                if type(task) is TaskHandle:  # a resumed task without a key has no handle
                    self._changes.append((task, HandleState.FAILED, closed))
                self._settled += 1
        self.finish(now)
        self._dead.close()
        if self._recorder is not None:
            self._recorder.close()

    def fail_submitted(self, tasks: Sequence[Task], error: FabricError | None = None) -> None:
        """Fail submitted tasks that the dispatcher will never take (any thread), with
        ``error`` (by default ClosedError: the node is closed)."""
        error = error or ClosedError(f"node {self._node_name!r} is closed")
        changes: list[tuple[TaskHandle, HandleState, Any]] = [
            (task, HandleState.FAILED, error) for task in tasks if type(task) is TaskHandle]
        if changes:
            settle(self._tasks, changes)
            self._tasks.settled(len(changes))
