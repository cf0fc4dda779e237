"""Reliable task dispatch as a pure state machine: a producer's in-flight table for one task name.

No IO, no threads, no clock: every call that depends on time takes ``now`` (monotonic seconds).
The dispatcher (:mod:`zmqfabric.tasks.producer`) owns one :class:`TaskTable` per task name and turns
its decisions into frames, journal writes and dead letters. A task moves through these states::

    PENDING --assign--> IN_FLIGHT --ok result--> DONE
       ^                    |   |
       |  worker lost,      |   |  handler raised
       |  deadline, stuck   |   v
       +--------------------+  DELAYED --backoff over--> PENDING

    and a failure that uses up the last attempt: IN_FLIGHT --> DEAD

- **Credit and slots.** Each worker grants a window (its prefetch) and runs ``slots`` tasks at
  once, in the order received. It never holds more than its window of our deliveries, and a
  delivery stays *held* until answered or the worker is lost, even once its task moved on. A
  busy worker is refilled in batches: only once half its window beyond its slots is free, or
  at once when fewer tasks wait (:meth:`~.taskworkers.WorkerView.ready_for`).
- **Attempts are charged only to deliveries that may have started**: a worker's oldest
  ``slots`` unanswered ones (:mod:`.taskworkers`). Their failures (the handler raised, the
  deadline passed, the worker was lost) use an attempt; deliveries queued behind them go
  elsewhere free. A handler that raised is retried after a backoff, the others at once; a
  failure that uses the last attempt makes the task dead.
- **Deadlines** time each started delivery from when it got its slot. One that overruns is
  charged and redelivered, preferably to a worker where it did not overrun; it keeps its slot
  and credit where it runs until answered, and the other slots keep working. A worker whose
  every slot is overdue is *stuck*: its queue moves elsewhere free and it gets nothing new.
- **Suspects.** Every task a lost worker held is a suspect: a worker may die of a task whose
  predecessors' results died with it, so its oldest slots are not proof. A suspect goes alone
  to an idle worker, and nothing else goes there until it answers, so a task that kills
  workers is charged every time. While suspects wait, so does the rest (workers drain).
- **Results.** The first ok result settles a task, whichever delivery it answers; a failure
  counts only for the current delivery. Other results (settled task, moved delivery, lost
  worker, no delivery of ours) are late, malformed ones refused (``on_results``): dropped.

The tasks that wait for a worker (suspects, tasks that overran, pending ones, retries in their
backoff) are the table's :class:`~.taskbacklog.Backlog`, which also knows the order they go out
in; the workers' windows and slots are :class:`~.taskworkers.WorkerView`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from ..errors import LocalProtocolError
from .taskbacklog import Backlog
from .taskrecords import (
    DEADLINE_EXCEEDED,
    NOTHING,
    WORKER_LOST,
    Outcome,
    RetryPolicy,
    Task,
    TaskState,
    TaskTableStats,
    check_count,
    check_deadline,
    is_failure,
)
from .taskworkers import Key, WorkerView, is_current, spread

__all__ = ["DEADLINE_EXCEEDED", "NOTHING", "WORKER_LOST", "Outcome", "RetryPolicy", "Task",
           "TaskState", "TaskTable", "TaskTableStats", "check_deadline"]

_IN_FLIGHT, _PENDING = TaskState.IN_FLIGHT, TaskState.PENDING
_DONE, _DEAD = TaskState.DONE, TaskState.DEAD  # per task: globals (enum attributes are slow)


class TaskTable:
    """The in-flight table of one task name: pending tasks, deliveries, workers and their credit.

    ``policy`` gives the backoff of retries; each task carries its own ``max_attempts``. Not
    thread-safe: one owner calls everything (stats() may be read from elsewhere)."""

    def __init__(self, name: str, policy: RetryPolicy | None = None) -> None:
        self.name = name
        self.policy = policy if policy is not None else RetryPolicy()
        self._tasks: dict[str, Task] = {}  # every unsettled task
        self._waiting = Backlog()
        self._workers: dict[str, WorkerView] = {}
        self._turn = 0
        self.next_due = math.inf  # the earliest time at which tick() may have work
        self.in_flight = 0
        self.done = self.dead = self.retried = self.redelivered = self.late = 0
        self.requeued = self.hung = self.refused = 0  # refused: malformed results dropped

    # --- tasks ---------------------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a new task. Raises LocalProtocolError for an id already in the table."""
        self.submit_many((task,))

    def submit_many(self, tasks: Iterable[Task]) -> None:
        """Queue new tasks in order (no call per task: the dispatcher's hot path). Raises
        LocalProtocolError at the first id already in the table (those before it are queued)."""
        table, append = self._tasks, self._waiting.pending.append
        for task in tasks:
            if task.id in table:
                raise LocalProtocolError(f"task id {task.id!r} is already queued")
            task.state = _PENDING
            table[task.id] = task
            append(task)  # per task, not extend() after: those before a duplicate are queued

    def refuse(self, task: Task, error: tuple[str, str]) -> Outcome:
        """A task that can never be sent: dead at once, no attempt used, not kept here."""
        task.error = error
        self.dead += 1
        return Outcome((), (task,))

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    @property
    def unsettled(self) -> int:
        return len(self._tasks)

    @property
    def waiting(self) -> bool:
        """True when tasks wait for a worker's credit (not those in a retry's backoff)."""
        waiting = self._waiting
        return bool(waiting.pending or waiting.redo or waiting.suspects)

    def drain(self) -> list[Task]:
        """Forget every unsettled task and return them (the owner is closing)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._waiting.clear()
        for worker in self._workers.values():
            worker.clear()
        self.in_flight = self.hung = 0
        return tasks

    # --- workers -------------------------------------------------------------------------------

    def set_credit(self, worker: str, window: int, now: float, slots: int = 1) -> None:
        """A worker granted ``window`` and runs ``slots`` tasks at once (new worker, or new
        values for a known one). Raises LocalProtocolError out of 1..65535."""
        check_count(window, "credit")
        check_count(slots, "slots")
        known = self._workers.get(worker)
        if known is None:
            self._workers[worker] = WorkerView(worker, window, slots)
        else:
            self.next_due = min(self.next_due, known.resize(window, slots, now))

    def lose_worker(self, worker: str, now: float) -> Outcome:
        """The worker is gone. Its current deliveries that may have started are charged an
        attempt (dead when it was the last); the rest go elsewhere free. All become suspects."""
        lost = self._workers.pop(worker, None)
        if lost is None:
            return NOTHING
        self.hung -= len(lost.overdue)
        dead: list[Task] = []
        for key, task in lost.held.items():
            if not is_current(task, key, worker):
                continue
            self.in_flight -= 1
            task.worker = None
            if key in lost.started:
                if not self._charge(task, (WORKER_LOST, f"worker {worker} was lost"), dead):
                    continue
            else:
                self.requeued += 1
            task.state = _PENDING
            task.suspect = True
            self._waiting.suspects.append(task)
            self.redelivered += 1
        return Outcome((), tuple(dead)) if dead else NOTHING

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def credit(self, worker: str) -> int:
        """Deliveries the worker may still take now (0 when unknown, stuck or probing)."""
        return 0 if (known := self._workers.get(worker)) is None else known.room()

    def held(self, worker: str) -> list[Key]:
        """``(task id, attempt)`` of every delivery the worker holds, oldest first (a copy)."""
        return [] if (known := self._workers.get(worker)) is None else list(known.held)

    def started(self, worker: str) -> list[Key]:
        """The deliveries the worker may have started: its oldest ``slots`` (a copy)."""
        return [] if (known := self._workers.get(worker)) is None else list(known.started)

    # --- dispatch ------------------------------------------------------------------------------

    def assign(self, now: float) -> list[tuple[str, list[Task]]]:
        """Give waiting tasks to workers with credit; returns (worker, tasks) to send. Each
        task's ``attempts`` already counts this delivery. Suspects go first, each alone to an
        idle worker; then tasks that overran a deadline, each to a worker where it did not;
        then the rest, spread evenly."""
        waiting = self._waiting
        waiting.promote(now)
        batches: dict[str, list[Task]] = {}
        if waiting.suspects or waiting.redo:
            def deliver(worker: WorkerView, task: Task) -> Key:
                return self._deliver(worker, task, now, batches)

            if waiting.suspects:
                waiting.place_suspects(list(self._workers.values()), deliver)
                if waiting.suspects:
                    return list(batches.items())  # the others wait: workers drain, become idle
            if waiting.redo:
                waiting.place_redo(list(self._workers.values()), deliver)
        if waiting.pending:
            self._spread(now, batches)
        return list(batches.items())

    def _spread(self, now: float, batches: dict[str, list[Task]]) -> None:
        waiting = len(self._waiting.pending)  # batching: see WorkerView.ready_for
        ready = [w for w in self._workers.values() if w.ready_for(waiting)]
        if ready:
            start = self._turn % len(ready)
            self._turn += 1
            given, due = spread(ready[start:] + ready[:start], self._waiting.pending, now,
                                batches)
            self.in_flight += given
            self.next_due = min(self.next_due, due)

    def _deliver(self, worker: WorkerView, task: Task, now: float,
                 batches: dict[str, list[Task]]) -> Key:
        task.attempts += 1
        task.state = _IN_FLIGHT
        task.worker = worker.key
        key = (task.id, task.attempts)
        self.next_due = min(self.next_due, worker.give(key, task, now))
        batches.setdefault(worker.key, []).append(task)
        self.in_flight += 1
        return key

    def unassign(self, worker: str, tasks: list[Task], now: float = math.inf) -> None:
        """Sending ``tasks`` (the tail of what assign gave ``worker``) failed: they go back to
        the front, their delivery not counted."""
        known = self._workers.get(worker)
        back: list[Task] = []
        suspects: list[Task] = []
        for task in reversed(tasks):  # newest first: no slot passes to a task being taken back
            key = (task.id, task.attempts)
            if task.state is _IN_FLIGHT and task.worker == worker:
                if known is not None:
                    self.next_due = min(self.next_due, known.forget(key, now)[2])
                task.attempts -= 1
                task.state = _PENDING
                task.worker = None
                self.in_flight -= 1
                (suspects if task.suspect else back).append(task)
        self._waiting.pending.extendleft(back)
        self._waiting.suspects.extendleft(suspects)

    # --- results and time ----------------------------------------------------------------------

    def on_results(self, worker: str, results: list[Any], now: float) -> Outcome:
        """Results ``[task_id, attempt, ok, value]`` from ``worker`` (value: the return value, or
        ``{"type", "message"}`` for a failure), unchecked: each is judged alone. A malformed one
        (not four items, ``ok`` not a boolean, a failure's value not that map, an unhashable id)
        is refused; one that matches a delivery repeats its id and attempt: no other check."""
        known = self._workers.get(worker)
        if known is None:
            self.late += len(results)
            return NOTHING
        held, started, tasks, overdue = known.held, known.started, self._tasks, known.overdue
        done: list[Task] = []
        dead: list[Task] = []
        freed, answered = False, 0  # answered: ok results of deliveries in flight until now
        for item in results:
            try:
                task_id, attempt, ok, value = item
                if ok is not True and not is_failure(ok, value):
                    raise ValueError(ok)
                key = (task_id, attempt)
                task = held.pop(key, None)  # TypeError: unhashable
            except (TypeError, ValueError):
                self.refused += 1
                continue
            if task is None:
                self.late += 1  # never ours to answer: a stray or forged result
                continue
            if started.pop(key, None) is not None:
                freed = True  # its slot goes to the oldest waiting delivery, below
                if overdue and key in overdue:
                    overdue.discard(key)
                    self.hung -= 1
            if known.probe is not None and known.probe == key:
                known.probe = None
            if ok:
                current = tasks.pop(task_id, None)  # one lookup: the usual case settles it
                if current is not task:  # settled already (put back what was another's)
                    if current is not None:
                        tasks[task_id] = current
                    self.late += 1
                    continue
                if task.state is _IN_FLIGHT:
                    answered += 1
                task.state = _DONE
                task.value = value
                task.worker = None
                done.append(task)
            elif task is not tasks.get(task_id):  # settled already
                self.late += 1
            elif is_current(task, key, worker):
                self.in_flight -= 1
                task.worker = None
                task.suspect = False  # it ran and answered: it did not kill its worker
                if self._charge(task, (value["type"], value["message"]), dead):
                    self._retry_later(task, now)
            else:
                self.late += 1
        if freed:  # per message
            self.next_due = min(self.next_due, known.refill(now))
        if not done and not dead:
            return NOTHING
        self.in_flight -= answered
        self.done += len(done)
        return Outcome(tuple(done), tuple(dead))

    def tick(self, now: float) -> Outcome:
        """Time-based work: deadlines, retries whose backoff is over. Cheap before next_due."""
        if now < self.next_due:
            return NOTHING
        self._waiting.promote(now)
        dead: list[Task] = []
        next_due = math.inf
        for worker in list(self._workers.values()):
            overran = False
            for key, since in worker.started.items():
                if key in worker.overdue:
                    continue
                task = worker.held[key]
                due = since + task.deadline_s
                if now < due:
                    next_due = min(next_due, due)
                    continue
                overran = True
                worker.overdue.add(key)
                self.hung += 1
                if worker.probe == key:
                    worker.probe = None
                if is_current(task, key, worker.key):
                    self._overran(task, worker.key, dead)
            if overran and worker.stuck:
                self._requeue_waiting(worker)
        self.next_due = min(next_due, self._waiting.next_retry)
        return Outcome((), tuple(dead)) if dead else NOTHING

    def _overran(self, task: Task, worker: str, dead: list[Task]) -> None:
        self.in_flight -= 1
        task.worker = None
        task.suspect = False
        task.hung_on = (task.hung_on or []) + [worker]
        times, where = len(task.hung_on), len(set(task.hung_on))
        why = f"ran longer than {task.deadline_s:g} s" + (f" {times} times" * (times != where))
        why += f" on {where} worker{'s' * (where != 1)}"
        if self._charge(task, (DEADLINE_EXCEEDED, why), dead):
            task.state = _PENDING
            self._waiting.redo.append(task)
            self.redelivered += 1

    def _requeue_waiting(self, worker: WorkerView) -> None:
        """A stuck worker: what waits behind its overdue slots goes elsewhere, free."""
        back = []
        for key, task in worker.held.items():
            if key not in worker.started and is_current(task, key, worker.key):
                self.in_flight -= 1
                task.worker = None
                task.state = _PENDING
                back.append(task)
        self._waiting.pending.extendleft(reversed(back))
        self.requeued, self.redelivered = self.requeued + len(back), self.redelivered + len(back)

    def _charge(self, task: Task, error: tuple[str, str], dead: list[Task]) -> bool:
        """A delivery that may have run failed: use an attempt. Returns False (and settles the
        task as dead) when that was its last."""
        task.error = error
        task.charged += 1
        if task.charged < task.max_attempts:
            return True
        task.state = _DEAD
        del self._tasks[task.id]
        self.dead += 1
        dead.append(task)
        return False

    def _retry_later(self, task: Task, now: float) -> None:
        due = now + self.policy.delay(task.charged)
        self._waiting.delay(task, due)
        self.next_due = min(self.next_due, due)
        self.retried += 1

    def stats(self) -> TaskTableStats:
        """A snapshot of the counters (safe to call from another thread; may be a tick old)."""
        in_flight = self.in_flight
        return TaskTableStats(
            queued=max(0, len(self._tasks) - in_flight), in_flight=in_flight, done=self.done,
            retried=self.retried, redelivered=self.redelivered, dead=self.dead, late=self.late,
            workers=len(self._workers), requeued=self.requeued, hung=self.hung,
            refused=self.refused)
