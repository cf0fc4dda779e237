"""The tasks of one in-flight table that wait for a worker, and the order they go out in.

A :class:`~zmqfabric.core.tasktable.TaskTable` decides what happens to a task; its
:class:`Backlog` holds the ones that wait, in four lines:

- ``suspects``: tasks a lost worker held (it may have died of one of them). Each goes alone to an
  idle worker, and nothing else goes there until it answers; while any suspect waits, nothing
  else goes out at all (workers drain and become idle).
- ``redo``: tasks that overran a deadline. Each goes to a worker where it did not overrun,
  waiting for one to have room if there is any such worker; only when there is none, to a free
  slot anywhere.
- ``pending``: new tasks, tasks taken back, and retries whose backoff is over; the table spreads
  them over the workers with credit.
- delayed: retries waiting out their backoff, by due time (:meth:`Backlog.delay`, then
  :meth:`Backlog.promote` moves them to ``pending``).

A task settled meanwhile (by a late result) is dropped lazily: it stays in its line until it
comes up, and is skipped then (its state is no longer PENDING, or DELAYED for the retries).

Pure, like the table: no IO, no clock (``now`` is passed in). Not thread-safe: the table's owner
calls everything.
"""

from __future__ import annotations

import collections
import heapq
import math
from typing import Callable

from .taskrecords import Task, TaskState
from .taskworkers import Key, WorkerView

#: Deliver one task to one worker (the table counts it and adds it to the batch to send);
#: returns the delivery's key.
Deliver = Callable[[WorkerView, Task], Key]

_PENDING = TaskState.PENDING


class Backlog:
    """The waiting tasks of one table (module docstring). ``pending``, ``redo`` and ``suspects``
    are deques the table appends to and takes back into."""

    __slots__ = ("pending", "redo", "suspects", "_delayed", "_seq")

    def __init__(self) -> None:
        self.pending: collections.deque[Task] = collections.deque()
        self.redo: collections.deque[Task] = collections.deque()
        self.suspects: collections.deque[Task] = collections.deque()
        self._delayed: list[tuple[float, int, Task]] = []
        self._seq = 0

    def delay(self, task: Task, due: float) -> None:
        """``task`` waits until ``due`` (its retry backoff), then goes to ``pending``."""
        task.state = TaskState.DELAYED
        self._seq += 1
        heapq.heappush(self._delayed, (due, self._seq, task))

    def promote(self, now: float) -> None:
        """Retries whose backoff is over go to the back of ``pending``."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            task = heapq.heappop(delayed)[2]
            if task.state is TaskState.DELAYED:
                task.state = _PENDING
                self.pending.append(task)

    @property
    def next_retry(self) -> float:
        """When the earliest delayed retry is due (inf if none)."""
        return self._delayed[0][0] if self._delayed else math.inf

    def clear(self) -> None:
        for queue in (self.pending, self.redo, self.suspects):
            queue.clear()
        self._delayed.clear()

    def place_suspects(self, workers: list[WorkerView], deliver: Deliver) -> None:
        """Each waiting suspect alone to an idle worker of ``workers``, which takes nothing
        else until it answers (its ``probe``)."""
        idle = [w for w in workers if w.idle()]
        suspects = self.suspects
        while suspects and idle:
            task = suspects.popleft()
            if task.state is not _PENDING:
                continue  # settled meanwhile by a late result: dropped lazily
            worker = idle.pop()
            worker.probe = deliver(worker, task)

    def place_redo(self, workers: list[WorkerView], deliver: Deliver) -> None:
        """Each task that overran to a worker where it did not, waiting for one to have room
        if there is any such worker; only when there is none, to a free slot anywhere."""
        redo, keep = self.redo, []
        while redo:
            task = redo.popleft()
            if task.state is not _PENDING:
                continue
            hung_on = task.hung_on or ()
            fresh = [w for w in workers if w.key not in hung_on and not w.stuck]
            ready = [w for w in (fresh or workers) if w.room() > 0]
            if ready:
                deliver(max(ready, key=WorkerView.room), task)
            else:
                keep.append(task)
        redo.extend(keep)
