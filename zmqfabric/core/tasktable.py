"""Reliable task dispatch as a pure state machine: a producer's in-flight table for one task name.

No IO, no threads, no clock: every call that depends on time takes ``now`` (monotonic seconds).
The dispatcher (:mod:`zmqfabric.tasks.producer`) owns one :class:`TaskTable` per task name and turns
its decisions into frames, journal writes and dead letters. A task moves through these states::

    PENDING --assign--> IN_FLIGHT --ok result--> DONE
       ^                    |   |
       |  worker lost or    |   |  handler raised
       |  stuck             |   v
       +--------------------+  DELAYED --backoff over--> PENDING

    and any failure of the last attempt: IN_FLIGHT --> DEAD

- **Credit.** Each worker grants a window (its prefetch). A worker never holds more than its window
  of our deliveries, and a delivery stays *held* until the worker answers it or is lost, even when
  the task has moved on meanwhile (an abandoned delivery): credit counts what the worker really
  holds. A task is never given to a worker that still holds a delivery of it.
- **Attempts.** Every delivery is an attempt. A failure (the handler raised, the worker was lost or
  stuck) with attempts left is retried: after an exponential backoff when the handler raised, at
  once otherwise; on the last attempt the task is dead.
- **Deadlines are head-of-line.** A worker runs our tasks one at a time in order, so only its
  oldest held delivery is timed, from when it was sent or from the worker's last result, whichever
  is later. A worker past that deadline is *stuck*: every task it holds goes to other workers, and
  it gets no new work until it answers again.
- **Results.** The first ok result of a task settles it, whichever of its deliveries it answers; a
  failure counts only when it answers the task's current delivery. Every other result (for a
  settled task, from a delivery that was moved on, from a lost worker) is counted as late and
  dropped.
"""

from __future__ import annotations

import collections
import heapq
import math
from dataclasses import dataclass, field
from typing import Any

from ..constants import MAX_TASK_CREDIT
from ..errors import LocalProtocolError
from .taskrecords import (
    DEADLINE_EXCEEDED,
    NOTHING,
    WORKER_LOST,
    Outcome,
    RetryPolicy,
    Task,
    TaskState,
    TaskTableStats,
    check_deadline,
)

__all__ = [
    "DEADLINE_EXCEEDED",
    "NOTHING",
    "WORKER_LOST",
    "Outcome",
    "RetryPolicy",
    "Task",
    "TaskState",
    "TaskTable",
    "TaskTableStats",
    "check_deadline",
]

@dataclass(slots=True, eq=False)
class _Worker:
    key: str
    window: int
    last_result: float
    #: task id -> (attempt, sent at, deadline): deliveries the worker holds, oldest first.
    held: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    stuck: bool = False


class TaskTable:
    """The in-flight table of one task name: pending tasks, deliveries, workers and their credit.

    ``policy`` gives the backoff of retries; each task carries its own ``max_attempts``. Not
    thread-safe: one owner calls everything (stats() may be read from elsewhere)."""

    def __init__(self, name: str, policy: RetryPolicy | None = None) -> None:
        self.name = name
        self.policy = policy if policy is not None else RetryPolicy()
        self._tasks: dict[str, Task] = {}  # every unsettled task
        self._pending: collections.deque[Task] = collections.deque()
        self._delayed: list[tuple[float, int, Task]] = []
        self._seq = 0
        self._workers: dict[str, _Worker] = {}
        self._turn = 0
        #: The earliest time at which tick() may have something to do.
        self.next_due = math.inf
        self.in_flight = 0
        self.done = self.dead = self.retried = self.redelivered = self.late = 0

    # --- tasks ---------------------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a new task. Raises LocalProtocolError for an id already in the table."""
        if task.id in self._tasks:
            raise LocalProtocolError(f"task id {task.id!r} is already queued")
        task.state = TaskState.PENDING
        self._tasks[task.id] = task
        self._pending.append(task)

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    @property
    def unsettled(self) -> int:
        return len(self._tasks)

    def drain(self) -> list[Task]:
        """Forget every unsettled task and return them (the owner is closing)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._pending.clear()
        self._delayed.clear()
        for worker in self._workers.values():
            worker.held.clear()
        self.in_flight = 0
        return tasks

    # --- workers -------------------------------------------------------------------------------

    def set_credit(self, worker: str, window: int, now: float) -> None:
        """A worker granted ``window`` (new worker, or a new window for a known one)."""
        if type(window) is not int or not 1 <= window <= MAX_TASK_CREDIT:
            raise LocalProtocolError(f"credit must be an integer from 1 to {MAX_TASK_CREDIT}")
        known = self._workers.get(worker)
        if known is None:
            self._workers[worker] = _Worker(worker, window, now)
        else:
            known.window = window

    def lose_worker(self, worker: str, now: float) -> Outcome:
        """The worker is gone: its current deliveries are redelivered (or dead, out of attempts)."""
        lost = self._workers.pop(worker, None)
        if lost is None:
            return NOTHING
        dead: list[Task] = []
        again: list[Task] = []
        for task_id, (attempt, _, _) in lost.held.items():
            task = self._current(task_id, worker, attempt)
            if task is not None:
                self._fail(task, (WORKER_LOST, f"worker {worker} was lost"), now, dead, again)
        self._pending.extendleft(reversed(again))
        return Outcome((), tuple(dead)) if dead else NOTHING

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def credit(self, worker: str) -> int:
        """Deliveries the worker may still take now (0 when unknown or stuck)."""
        known = self._workers.get(worker)
        if known is None or known.stuck:
            return 0
        return max(0, known.window - len(known.held))

    def held(self, worker: str) -> dict[str, int]:
        """task id -> attempt of every delivery the worker holds (a copy)."""
        known = self._workers.get(worker)
        return {} if known is None else {tid: h[0] for tid, h in known.held.items()}

    # --- dispatch ------------------------------------------------------------------------------

    def assign(self, now: float) -> list[tuple[str, list[Task]]]:
        """Give pending tasks to workers with credit, spread evenly; returns (worker, tasks) to
        send. Each task's ``attempts`` already counts this delivery."""
        self._promote(now)
        pending = self._pending
        ready = [w for w in self._workers.values() if not w.stuck and len(w.held) < w.window]
        if not pending or not ready:
            return []
        start = self._turn % len(ready)
        self._turn += 1
        ready = ready[start:] + ready[:start]
        batches: dict[str, list[Task]] = {}
        while pending and ready:
            share = -(-len(pending) // len(ready))
            progressed = False
            still: list[_Worker] = []
            for worker in ready:
                if self._fill(worker, min(share, worker.window - len(worker.held)), now, batches):
                    progressed = True
                if len(worker.held) < worker.window:
                    still.append(worker)
            ready = still
            if not progressed:
                break
        return list(batches.items())

    def _fill(
        self, worker: _Worker, count: int, now: float, batches: dict[str, list[Task]]
    ) -> bool:
        pending, held = self._pending, worker.held
        was_idle = not held
        batch = batches.get(worker.key)
        skipped: list[Task] = []
        given = 0
        while given < count and pending:
            task = pending.popleft()
            if task.state is not TaskState.PENDING:
                continue  # settled meanwhile by a late result: dropped lazily
            if task.id in held:
                skipped.append(task)  # this worker still holds an older delivery of it
                continue
            task.attempts += 1
            task.state = TaskState.IN_FLIGHT
            task.worker = worker.key
            held[task.id] = (task.attempts, now, task.deadline_s)
            if batch is None:
                batch = batches[worker.key] = []
            batch.append(task)
            given += 1
        if skipped:
            pending.extendleft(reversed(skipped))
        if given:
            self.in_flight += given
            if was_idle and batch:
                self.next_due = min(self.next_due, now + batch[0].deadline_s)
        return given > 0

    def unassign(self, worker: str, tasks: list[Task]) -> None:
        """Sending ``tasks`` (from assign) to ``worker`` failed: they go back to the front."""
        known = self._workers.get(worker)
        back = []
        for task in tasks:
            if task.state is TaskState.IN_FLIGHT and task.worker == worker:
                if known is not None:
                    known.held.pop(task.id, None)
                task.attempts -= 1
                task.state = TaskState.PENDING
                task.worker = None
                self.in_flight -= 1
                back.append(task)
        self._pending.extendleft(reversed(back))

    # --- results and time ----------------------------------------------------------------------

    def on_results(self, worker: str, results: list[list[Any]], now: float) -> Outcome:
        """Results ``[task_id, attempt, ok, value]`` from ``worker`` (value: the return value, or
        ``{"type", "message"}`` for a failure)."""
        known = self._workers.get(worker)
        if known is None:
            self.late += len(results)
            return NOTHING
        known.stuck = False
        known.last_result = now
        held, tasks = known.held, self._tasks
        done: list[Task] = []
        dead: list[Task] = []
        for task_id, attempt, ok, value in results:
            delivery = held.get(task_id)
            if delivery is None or delivery[0] != attempt:
                self.late += 1  # never ours to answer: a stray or forged result
                continue
            del held[task_id]
            task = tasks.get(task_id)
            if task is None:
                self.late += 1
                continue
            if ok:
                if task.state is TaskState.IN_FLIGHT:
                    self.in_flight -= 1
                task.state = TaskState.DONE
                task.value = value
                task.worker = None
                del tasks[task_id]
                self.done += 1
                done.append(task)
            elif task.state is TaskState.IN_FLIGHT and task.worker == worker and (
                task.attempts == attempt
            ):
                self._fail(task, (value["type"], value["message"]), now, dead, None)
            else:
                self.late += 1
        if held:  # a new head of line: its clock starts now, and its deadline may be shorter
            _, sent, deadline_s = next(iter(held.values()))
            self.next_due = min(self.next_due, max(sent, now) + deadline_s)
        if not done and not dead:
            return NOTHING
        return Outcome(tuple(done), tuple(dead))

    def tick(self, now: float) -> Outcome:
        """Time-based work: stuck workers (deadlines) and retries whose backoff is over. Cheap
        before ``next_due``."""
        if now < self.next_due:
            return NOTHING
        self._promote(now)
        dead: list[Task] = []
        next_due = math.inf
        for worker in list(self._workers.values()):
            if worker.stuck or not worker.held:
                continue
            _, sent, deadline_s = next(iter(worker.held.values()))
            due = max(sent, worker.last_result) + deadline_s
            if now >= due:
                self._stuck(worker, now, dead)
            else:
                next_due = min(next_due, due)
        if self._delayed:
            next_due = min(next_due, self._delayed[0][0])
        self.next_due = next_due
        return Outcome((), tuple(dead)) if dead else NOTHING

    def _stuck(self, worker: _Worker, now: float, dead: list[Task]) -> None:
        worker.stuck = True
        again: list[Task] = []
        first = True
        for task_id, (attempt, _, deadline_s) in list(worker.held.items()):
            task = self._current(task_id, worker.key, attempt)
            if task is not None:
                why = (
                    f"worker {worker.key} spent over {deadline_s:g} s on it"
                    if first
                    else f"queued at worker {worker.key}, stuck on another task"
                )
                self._fail(task, (DEADLINE_EXCEEDED, why), now, dead, again)
            first = False
        self._pending.extendleft(reversed(again))

    def _current(self, task_id: str, worker: str, attempt: int) -> Task | None:
        """The task, when (worker, attempt) is its current delivery."""
        task = self._tasks.get(task_id)
        if (
            task is not None
            and task.state is TaskState.IN_FLIGHT
            and task.worker == worker
            and task.attempts == attempt
        ):
            return task
        return None

    def _fail(
        self,
        task: Task,
        error: tuple[str, str],
        now: float,
        dead: list[Task],
        again: list[Task] | None,
    ) -> None:
        """The current delivery failed. ``again`` collects immediate redeliveries; None means the
        handler raised, so the retry waits for its backoff."""
        self.in_flight -= 1
        task.error = error
        task.worker = None
        if task.attempts >= task.max_attempts:
            task.state = TaskState.DEAD
            del self._tasks[task.id]
            self.dead += 1
            dead.append(task)
        elif again is None:
            task.state = TaskState.DELAYED
            due = now + self.policy.delay(task.attempts)
            self._seq += 1
            heapq.heappush(self._delayed, (due, self._seq, task))
            self.next_due = min(self.next_due, due)
            self.retried += 1
        else:
            task.state = TaskState.PENDING
            again.append(task)
            self.redelivered += 1

    def _promote(self, now: float) -> None:
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            task = heapq.heappop(delayed)[2]
            if task.state is TaskState.DELAYED:
                task.state = TaskState.PENDING
                self._pending.append(task)

    def stats(self) -> TaskTableStats:
        """A snapshot of the counters (safe to call from another thread; may be a tick old)."""
        in_flight = self.in_flight
        return TaskTableStats(
            queued=max(0, len(self._tasks) - in_flight),
            in_flight=in_flight,
            done=self.done,
            retried=self.retried,
            redelivered=self.redelivered,
            dead=self.dead,
            late=self.late,
            workers=len(self._workers),
        )
