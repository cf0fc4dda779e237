"""What a producer knows of one worker of a task name: its credit window, its slots, the deliveries
it holds in the order they were sent, which of them may have started, and which overran their
deadline. Pure: no IO, no clock (``now`` is passed in). Owned by a
:class:`~zmqfabric.core.tasktable.TaskTable`, which makes the decisions.

A worker runs at most ``slots`` of our tasks at once and takes them in the order received, so
only the oldest ``slots`` unanswered deliveries can have started (``started``). That is what
attempts are charged to when the worker is lost, and what deadlines time: a delivery's clock
runs from when it became one of the oldest ``slots`` (when it was sent, or when an older one was
answered), not from when it was queued behind others.
"""

from __future__ import annotations

import collections
import itertools
import math
from dataclasses import dataclass, field

from .taskrecords import Task, TaskState

_IN_FLIGHT, _PENDING = TaskState.IN_FLIGHT, TaskState.PENDING

#: One delivery: (task id, attempt). The attempt is the task's delivery count, so the pair is
#: unique even when a worker holds two deliveries of one task (an overdue one and a retry).
Key = tuple[str, int]


@dataclass(slots=True, eq=False)
class WorkerView:
    key: str
    window: int
    slots: int
    #: Every unanswered delivery, oldest first: it holds a unit of credit until answered or lost.
    held: dict[Key, Task] = field(default_factory=dict)
    #: The oldest ``slots`` deliveries of ``held`` -> when each became one of them.
    started: dict[Key, float] = field(default_factory=dict)
    #: Started deliveries past their deadline: still running there, each keeping its slot.
    overdue: set[Key] = field(default_factory=set)
    #: A suspect sent here alone: nothing else is sent until it answers.
    probe: Key | None = None

    @property
    def stuck(self) -> bool:
        """Every slot runs an overdue delivery: what waits here will not start soon."""
        return len(self.overdue) >= self.slots

    def room(self) -> int:
        """Deliveries this worker may take now (0 while stuck or probing)."""
        if self.probe is not None or len(self.overdue) >= self.slots:
            return 0
        return max(0, self.window - len(self.held))

    def low_water(self) -> int:
        """The room below which this worker is not refilled while more tasks than that wait:
        half its window beyond its slots (at least 1). It then still holds at least ``slots``
        deliveries, so no slot goes idle, and its tasks arrive in messages of that many or more,
        not one message per result that came back."""
        return max(1, (self.window - self.slots) // 2)

    def ready_for(self, waiting: int) -> bool:
        """Whether to give this worker tasks now, ``waiting`` of them: room for its low water
        mark, or for every one (a lone task leaves at once)."""
        room = self.room()
        return room > 0 and room >= min(self.low_water(), waiting)

    def idle(self) -> bool:
        """Nothing of ours runs or waits here but overdue deliveries, and a slot is free: a
        delivery sent now starts at once, with nothing unanswered before it."""
        return self.probe is None and len(self.held) == len(self.overdue) < min(
            self.slots, self.window)

    def give(self, key: Key, task: Task, now: float) -> float:
        """Record a delivery sent now; returns its deadline if it can start at once, else inf."""
        self.held[key] = task
        if len(self.started) < self.slots:
            self.started[key] = now
            return now + task.deadline_s
        return math.inf

    def promote(self, now: float) -> float:
        """A started delivery was answered: the oldest waiting one takes its slot now. Call only
        when ``len(held) >= slots`` after the removal; returns the newcomer's deadline."""
        key = next(itertools.islice(self.held, self.slots - 1, None))
        self.started[key] = now
        return now + self.held[key].deadline_s

    def refill(self, now: float) -> float:
        """Started deliveries were answered: the oldest waiting ones take the free slots now
        (one call for a whole message of results). Returns the earliest new deadline, or inf."""
        started, held, due = self.started, self.held, math.inf
        if len(started) < self.slots and len(held) > len(started):
            for key in itertools.islice(held, self.slots):
                if key not in started:
                    started[key] = now
                    due = min(due, now + held[key].deadline_s)
        return due

    def forget(self, key: Key, now: float) -> tuple[Task | None, bool, float]:
        """Drop a delivery (answered, or its send failed): ``(task or None if not held, was it
        overdue, deadline of a delivery that took its slot or inf)``."""
        task = self.held.pop(key, None)
        if task is None:
            return None, False, math.inf
        if self.probe == key:
            self.probe = None
        was_overdue = False
        due = math.inf
        if self.started.pop(key, None) is not None:
            if self.overdue:
                was_overdue = key in self.overdue
                self.overdue.discard(key)
            if len(self.held) >= self.slots:
                due = self.promote(now)
        return task, was_overdue, due

    def clear(self) -> None:
        """Forget every delivery (the table is closing)."""
        self.held.clear()
        self.started.clear()
        self.overdue.clear()
        self.probe = None

    def resize(self, window: int, slots: int, now: float) -> float:
        """A new credit window and slot count; returns the earliest new deadline (or inf)."""
        self.window = window
        if slots == self.slots:
            return math.inf
        self.slots = slots
        started: dict[Key, float] = {}
        due = math.inf
        for key in itertools.islice(self.held, slots):
            since = self.started.get(key)
            if since is None:
                since = now
                due = min(due, now + self.held[key].deadline_s)
            started[key] = since
        self.started = started
        self.overdue &= started.keys()
        return due


def is_current(task: Task, key: Key, worker: str) -> bool:
    """Whether delivery ``key`` at ``worker`` is ``task``'s current one."""
    return task.state is _IN_FLIGHT and task.worker == worker and task.attempts == key[1]


def spread(
    ready: list[WorkerView],
    pending: collections.deque[Task],
    now: float,
    batches: dict[str, list[Task]],
) -> tuple[int, float]:
    """Deal pending tasks to workers with room, evenly, in the order of ``ready``; record
    each delivery and add it to ``batches``. Returns (deliveries, earliest deadline or inf)."""
    total, due = 0, math.inf
    while pending and ready:
        share = -(-len(pending) // len(ready))
        still: list[WorkerView] = []
        progressed = False
        for worker in ready:
            given, first_due = _fill(worker, pending, min(share, worker.room()), now, batches)
            if given:
                progressed = True
                total += given
                due = min(due, first_due)
            if worker.room() > 0:
                still.append(worker)
        ready = still
        if not progressed:
            break
    return total, due


def _fill(
    worker: WorkerView,
    pending: collections.deque[Task],
    count: int,
    now: float,
    batches: dict[str, list[Task]],
) -> tuple[int, float]:
    # The hot path of dispatch: inlined, no method calls per task.
    held, started, key_of = worker.held, worker.started, worker.key
    free = worker.slots - len(started)  # deliveries that start at once
    batch = batches.get(key_of)
    new_batch = batch is None
    if batch is None:
        batch = batches[key_of] = []
    append = batch.append
    given = 0
    due = math.inf
    while given < count and pending:
        task = pending.popleft()
        if task.state is not _PENDING:
            continue  # settled meanwhile by a late result: dropped lazily
        task.attempts = attempt = task.attempts + 1
        task.state = _IN_FLIGHT
        task.worker = key_of
        key = (task.id, attempt)
        held[key] = task
        if free > 0:
            free -= 1
            started[key] = now
            if now + task.deadline_s < due:
                due = now + task.deadline_s
        append(task)
        given += 1
    if new_batch and not batch:
        del batches[key_of]  # nothing given: no empty message
    return given, due
