"""Unit tests of the pure reliable-task core (:mod:`zmqfabric.core.tasktable`) and of the task
frames it travels in (the kinds 6, 7, 8 of :mod:`zmqfabric.core.wire`).

Examples pin each rule down (credit, backoff, dead letters, redelivery on loss and on deadline,
late results); a hypothesis state machine then drives a task table through random submissions,
workers coming and going, results in any order and time passing, and checks the table's
invariants after every step; a last property checks that everything settles once workers behave.
No sockets, no clock: the time is a number the test moves.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zmqfabric.core import task_frames, wire
from zmqfabric.core.tasktable import (
    DEADLINE_EXCEEDED,
    WORKER_LOST,
    RetryPolicy,
    Task,
    TaskState,
    TaskTable,
)
from zmqfabric.errors import LocalProtocolError, RemoteProtocolError


def task(n: int | str, *, attempts: int = 3, deadline: float = 10.0) -> Task:
    return Task(str(n), b"\xc0", None, deadline_s=deadline, max_attempts=attempts)


def ok(t: Task, value: Any = None) -> list[Any]:
    return [t.id, t.attempts, True, value]


def failed(t: Task, text: str = "boom") -> list[Any]:
    return [t.id, t.attempts, False, {"type": "ValueError", "message": text}]


def sent(batches: list[tuple[str, list[Task]]]) -> dict[str, list[str]]:
    return {worker: [t.id for t in tasks] for worker, tasks in batches}


# --- examples --------------------------------------------------------------------------------


def test_tasks_wait_for_credit_and_never_exceed_it() -> None:
    table = TaskTable("job")
    tasks = [task(i) for i in range(10)]
    for t in tasks:
        table.submit(t)
    assert table.assign(0.0) == []  # no worker yet
    table.set_credit("a", 3, 0.0)
    assert sent(table.assign(0.0)) == {"a": ["0", "1", "2"]}
    assert table.assign(0.0) == [] and table.credit("a") == 0
    out = table.on_results("a", [ok(tasks[0], "r0")], 1.0)
    assert [t.id for t in out.done] == ["0"] and out.done[0].value == "r0"
    assert sent(table.assign(1.0)) == {"a": ["3"]}
    stats = table.stats()
    assert (stats.queued, stats.in_flight, stats.done, stats.workers) == (6, 3, 1, 1)


def test_a_refused_task_is_dead_at_once_and_never_assigned() -> None:
    table = TaskTable("job")
    table.set_credit("a", 5, 0.0)
    out = table.refuse(task("big"), ("MessageTooLargeError", "too big"))
    assert [t.id for t in out.dead] == ["big"] and out.dead[0].error[0] == "MessageTooLargeError"
    assert out.dead[0].charged == 0 and table.get("big") is None
    assert table.assign(0.0) == [] and table.stats().dead == 1


def test_pending_tasks_are_spread_over_workers_with_room() -> None:
    table = TaskTable("job")
    for w in "abcd":
        table.set_credit(w, 100, 0.0)
    for i in range(8):
        table.submit(task(i))
    counts = {w: len(ts) for w, ts in table.assign(0.0)}
    assert counts == {"a": 2, "b": 2, "c": 2, "d": 2}
    table.submit(task("x"))
    assert sum(len(ts) for _, ts in table.assign(0.0)) == 1


def test_a_busy_worker_is_refilled_in_batches_and_a_lone_task_leaves_at_once() -> None:
    """Batching: a worker holding more than its low water mark (half its window beyond its
    slots) takes more only once that much room is free, so tasks leave in messages of at least
    that many; fewer tasks than that waiting leave at once (the lone task is never held)."""
    table = TaskTable("job")
    table.set_credit("a", 64, 0.0, 2)  # low water (64 - 2) // 2 = 31
    tasks = [task(i) for i in range(200)]
    table.submit_many(tasks)
    assert sent(table.assign(0.0)) == {"a": [str(i) for i in range(64)]}
    table.on_results("a", [ok(t) for t in tasks[:30]], 1.0)  # room 30 < 31, 136 waiting
    assert table.assign(1.0) == [] and table.credit("a") == 30
    table.on_results("a", [ok(tasks[30])], 1.0)  # room 31: refilled with 31 at once
    assert sent(table.assign(1.0)) == {"a": [str(i) for i in range(64, 95)]}
    drained = TaskTable("job")
    drained.set_credit("a", 64, 0.0, 2)
    busy = [task(f"b{i}") for i in range(60)]
    drained.submit_many(busy)
    assert len(sent(drained.assign(0.0))["a"]) == 60
    drained.submit(task("lone"))  # room 4 < 31, but it is all that waits: it leaves now
    assert sent(drained.assign(0.0)) == {"a": ["lone"]}
    drained.submit_many([task(f"c{i}") for i in range(5)])  # room 3 < 5 waiting: held
    assert drained.assign(0.0) == []
    window_of_slots = TaskTable("job")  # window == slots: no hold-back, every slot kept busy
    window_of_slots.set_credit("a", 4, 0.0, 4)
    window_of_slots.submit_many([task(f"s{i}") for i in range(10)])
    assert len(sent(window_of_slots.assign(0.0))["a"]) == 4


def test_handler_failure_retries_with_exponential_backoff_then_dead() -> None:
    table = TaskTable("job", RetryPolicy(backoff_s=1.0, backoff_max_s=3.0))
    table.set_credit("a", 1, 0.0)
    t = task("t", attempts=4)
    table.submit(t)
    now, retries_at = 0.0, []
    for attempt in range(1, 5):
        (worker, [got]), = table.assign(now)
        assert got is t and t.attempts == attempt and worker == "a"
        out = table.on_results("a", [failed(t, f"fail {attempt}")], now)
        if attempt < 4:
            assert not out and t.state is TaskState.DELAYED
            assert table.assign(now) == []  # waits for its backoff
            retries_at.append(table.next_due - now)
            now = table.next_due
            table.tick(now)
        else:
            assert out.dead == (t,) and t.state is TaskState.DEAD
    assert retries_at == [1.0, 2.0, 3.0]  # doubling, capped
    assert t.error == ("ValueError", "fail 4")
    stats = table.stats()
    assert (stats.retried, stats.dead, stats.queued, stats.in_flight) == (3, 1, 0, 0)


def test_a_lost_worker_s_started_task_is_charged_and_the_queued_ones_go_free() -> None:
    table = TaskTable("job")
    table.set_credit("a", 5, 0.0)
    tasks = [task(i) for i in range(3)]
    for t in tasks:
        table.submit(t)
    table.assign(0.0)
    assert table.started("a") == [("0", 1)]  # one slot: only the oldest can have started
    assert not table.lose_worker("a", 1.0)
    assert all(t.state is TaskState.PENDING and t.suspect for t in tasks)
    assert [t.charged for t in tasks] == [1, 0, 0]
    assert tasks[0].error[0] == WORKER_LOST and tasks[1].error is tasks[2].error is None
    stats = table.stats()
    assert (stats.redelivered, stats.requeued) == (3, 2)
    # A result the dead worker sent before dying (read after the loss) is late.
    assert not table.on_results("a", [[tasks[0].id, 1, True, None]], 1.0)
    assert table.stats().late == 1


def test_suspects_go_alone_to_idle_workers_and_others_wait_for_them() -> None:
    table = TaskTable("job")
    table.set_credit("a", 5, 0.0)
    suspects = [task(i) for i in range(3)]
    for t in suspects:
        table.submit(t)
    table.assign(0.0)
    table.lose_worker("a", 0.5)
    table.set_credit("b", 5, 1.0)
    table.set_credit("c", 5, 1.0)
    fresh = task("fresh")
    table.submit(fresh)
    first = sent(table.assign(1.0))
    assert sorted(first.values()) == [["0"], ["1"]]  # one each, nothing behind them
    assert table.assign(1.0) == [] and fresh.state is TaskState.PENDING
    worker = next(w for w, ids in first.items() if ids == ["0"])
    assert table.on_results(worker, [ok(suspects[0])], 1.1).done == (suspects[0],)
    # "2" is the last suspect: it goes alone, and only then does the rest flow again.
    assert sent(table.assign(1.1)) == {worker: ["2"]}
    other = "c" if worker == "b" else "b"
    table.on_results(other, [ok(suspects[1])], 1.2)
    assert sent(table.assign(1.2)) == {other: ["fresh"]}
    assert [t.attempts for t in suspects] == [2, 2, 2]
    assert [t.charged for t in suspects] == [1, 0, 0]


def test_a_task_that_kills_its_workers_is_dead_lettered_and_its_neighbours_are_not() -> None:
    """The killer sits behind tasks whose results died with the worker: the first loss charges
    an innocent neighbour (it did run), but on probation the killer is alone, so it is charged
    every time after, and no task that never ran is charged at all."""
    table = TaskTable("job")
    tasks = [task(i, attempts=3) for i in range(6)]
    killer = tasks[3]
    for t in tasks:
        table.submit(t)
    now, worker_no = 0.0, 0
    ran: set[str] = set()

    def new_worker() -> str:
        nonlocal worker_no
        worker_no += 1
        table.set_credit(f"w{worker_no}", 8, now)
        return f"w{worker_no}"

    w = new_worker()
    (_, batch), = table.assign(now)
    ran.update(t.id for t in batch[:4])  # ran 0, 1, 2 (results unsent), then 3 killed it
    dead = list(table.lose_worker(w, now).dead)
    for _ in range(10):
        if killer.state is TaskState.DEAD:
            break
        now += 1.0
        w = new_worker()
        for worker, batch in table.assign(now):
            for t in batch:
                ran.add(t.id)
                if t is killer:
                    dead += table.lose_worker(worker, now).dead
                else:
                    table.on_results(worker, [ok(t)], now)
    assert dead == [killer] and killer.charged == 3
    assert all(t.state is TaskState.DONE for t in tasks if t is not killer)
    assert [t.charged for t in tasks] == [1, 0, 0, 3, 0, 0]


def test_losing_a_worker_on_the_last_attempt_is_a_dead_letter() -> None:
    table = TaskTable("job")
    table.set_credit("a", 1, 0.0)
    t = task("t", attempts=1)
    table.submit(t)
    table.assign(0.0)
    assert table.lose_worker("a", 0.5).dead == (t,)
    assert t.error[0] == WORKER_LOST and table.unsettled == 0


def test_only_the_oldest_slots_are_charged_and_timed() -> None:
    table = TaskTable("job")
    table.set_credit("w", 6, 0.0, slots=2)
    tasks = [task(i, deadline=1.0) for i in range(5)]
    for t in tasks:
        table.submit(t)
    table.assign(0.0)
    assert table.started("w") == [("0", 1), ("1", 1)]
    assert table.next_due == pytest.approx(1.0)
    table.on_results("w", [ok(tasks[1])], 0.5)  # out of order within the slots: fine
    assert table.started("w") == [("0", 1), ("2", 1)]
    table.tick(1.0)  # "0" overran; "2" started at 0.5
    assert tasks[0].state is TaskState.PENDING and tasks[0].charged == 1
    assert tasks[2].state is TaskState.IN_FLIGHT and table.next_due == pytest.approx(1.5)
    assert table.credit("w") == 6 - 4  # the overdue delivery still holds its unit of credit
    out = table.lose_worker("w", 1.2)
    assert not out
    assert [t.charged for t in tasks] == [1, 0, 1, 0, 0]  # "2" had a slot; "3", "4" did not


def test_an_overdue_delivery_keeps_its_slot_and_the_other_slots_keep_working() -> None:
    table = TaskTable("job")
    table.set_credit("w", 4, 0.0, slots=2)
    hang, *rest = [task(i, deadline=1.0, attempts=2) for i in range(4)]
    for t in (hang, *rest):
        table.submit(t)
    table.assign(0.0)
    table.on_results("w", [ok(rest[0])], 0.9)
    table.tick(1.0)
    assert hang.charged == 1 and table.stats().hung == 1
    assert sent(table.assign(1.0)) == {"w": ["0"]}  # no other worker: a free slot here
    assert table.started("w") == [("0", 1), ("2", 1)]  # the overdue one still runs
    table.on_results("w", [ok(rest[1]), ok(rest[2])], 1.5)
    assert table.started("w") == [("0", 1), ("0", 2)]
    assert table.tick(2.5).dead == (hang,)  # both slots now run it: the worker is stuck
    assert hang.error == (DEADLINE_EXCEEDED, "ran longer than 1 s 2 times on 1 worker")
    assert table.credit("w") == 0 and table.stats().hung == 2
    table.on_results("w", [["0", 1, True, None]], 3.0)  # the hang ended after all: late
    assert table.credit("w") == 3 and table.stats().late == 1


def test_a_stuck_worker_s_queue_goes_elsewhere_free_and_its_late_results_are_dropped() -> None:
    table = TaskTable("job")
    table.set_credit("slow", 2, 0.0)
    a, b = task("a", deadline=1.0), task("b", deadline=1.0)
    table.submit(a)
    table.submit(b)
    assert sent(table.assign(0.0)) == {"slow": ["a", "b"]}
    assert table.tick(0.9) is not None and a.state is TaskState.IN_FLIGHT
    assert table.next_due == pytest.approx(1.0)
    table.tick(1.0)
    assert a.state is b.state is TaskState.PENDING
    assert a.error[0] == DEADLINE_EXCEEDED and (a.charged, b.charged) == (1, 0)
    assert b.error is None and table.stats().requeued == 1
    assert table.credit("slow") == 0  # stuck: no new work, and it still holds both deliveries
    table.set_credit("fast", 2, 1.0)
    assert sent(table.assign(1.0)) == {"fast": ["a", "b"]}
    assert [t.attempts for t in (a, b)] == [2, 2]
    assert table.on_results("fast", [ok(a, "fast-a"), ok(b, "fast-b")], 1.1).done == (a, b)
    # The slow worker finally answers attempt 1: late, dropped; its slot is free again.
    assert not table.on_results("slow", [["a", 1, True, "slow-a"], ["b", 1, True, "slow-b"]], 2.0)
    assert a.value == "fast-a" and table.stats().late == 2 and table.credit("slow") == 2


def test_the_deadline_clock_starts_when_a_delivery_gets_a_slot() -> None:
    """Tasks queued behind others at one worker are not timed while it works on those."""
    table = TaskTable("job")
    table.set_credit("w", 3, 0.0)
    tasks = [task(i, deadline=1.0) for i in range(3)]
    for t in tasks:
        table.submit(t)
    table.assign(0.0)
    for i, now in enumerate((0.9, 1.8, 2.7)):
        table.tick(now)
        assert table.on_results("w", [ok(tasks[i])], now).done == (tasks[i],)
    assert table.stats().redelivered == 0 and table.unsettled == 0


def test_the_first_ok_result_wins_and_a_late_failure_is_ignored() -> None:
    table = TaskTable("job")
    table.set_credit("a", 1, 0.0)
    t = task("t", deadline=1.0)
    table.submit(t)
    table.assign(0.0)
    table.tick(1.0)  # a is stuck; t goes back to pending
    table.set_credit("b", 1, 1.0)
    table.assign(1.0)
    assert t.worker == "b" and t.attempts == 2
    # a answers attempt 1 first: the task is done; b's answer comes late.
    assert table.on_results("a", [["t", 1, True, "from a"]], 1.5).done == (t,)
    assert not table.on_results("b", [failed(t)], 1.6)
    assert t.value == "from a" and table.stats().late == 1 and table.credit("b") == 1


def test_a_task_that_overran_prefers_a_worker_where_it_did_not() -> None:
    table = TaskTable("job")
    table.set_credit("x", 4, 0.0, slots=4)
    t = task("t", deadline=1.0)
    table.submit(t)
    table.assign(0.0)
    table.set_credit("y", 2, 0.5)
    table.tick(1.0)
    assert table.credit("x") > table.credit("y")  # x has more room, and still gets nothing
    assert sent(table.assign(1.0)) == {"y": ["t"]}


def test_failed_send_puts_tasks_back_without_using_an_attempt() -> None:
    table = TaskTable("job")
    table.set_credit("a", 5, 0.0, slots=2)
    tasks = [task(i) for i in range(4)]
    for t in tasks:
        table.submit(t)
    (worker, batch), = table.assign(0.0)
    table.unassign(worker, batch[1:], 0.0)  # the first part left, the rest did not
    assert [t.attempts for t in tasks] == [1, 0, 0, 0] and table.credit("a") == 4
    assert table.started("a") == [("0", 1)]
    assert sent(table.assign(0.0)) == {"a": ["1", "2", "3"]}
    assert table.started("a") == [("0", 1), ("1", 1)]


def test_results_not_ours_are_late_and_free_nothing() -> None:
    table = TaskTable("job")
    table.set_credit("a", 1, 0.0)
    t = task("t")
    table.submit(t)
    table.assign(0.0)
    assert not table.on_results("a", [["nope", 1, True, None], ["t", 7, True, None]], 0.1)
    assert not table.on_results("stranger", [ok(t)], 0.1)
    assert table.stats().late == 3 and t.state is TaskState.IN_FLIGHT and table.credit("a") == 0


def test_drain_returns_every_unsettled_task() -> None:
    table = TaskTable("job")
    table.set_credit("a", 1, 0.0)
    tasks = [task(i) for i in range(3)]
    for t in tasks:
        table.submit(t)
    table.assign(0.0)
    assert sorted(t.id for t in table.drain()) == ["0", "1", "2"]
    assert table.unsettled == 0 and table.stats().in_flight == 0


def test_bad_arguments_are_refused() -> None:
    table = TaskTable("job")
    table.submit(task("t"))
    with pytest.raises(LocalProtocolError):
        table.submit(task("t"))
    for window in (0, -1, 70000, 1.5):
        with pytest.raises(LocalProtocolError):
            table.set_credit("a", window, 0.0)  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError):
            table.set_credit("a", 1, 0.0, slots=window)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(LocalProtocolError):
        RetryPolicy(backoff_s=2.0, backoff_max_s=1.0)
    assert RetryPolicy(backoff_s=0.1, backoff_max_s=1e9).delay(10_000) == 1e9


# --- the state machine under random operations ------------------------------------------------

WORKERS = ("w1", "w2", "w3")


class TaskTableMachine(RuleBasedStateMachine):
    """Random operations on a task table and a model of what the workers hold."""

    def __init__(self) -> None:
        super().__init__()
        self.table = TaskTable("job", RetryPolicy(backoff_s=0.5, backoff_max_s=2.0))
        self.now = 0.0
        self.next_id = 0
        self.submitted: dict[str, Task] = {}
        self.settled: dict[str, str] = {}  # id -> "done" | "dead"
        self.windows: dict[str, tuple[int, int]] = {}  # worker -> (window, slots)
        #: worker -> deliveries it holds, in the order sent: (task id, attempt)
        self.outbox: dict[str, list[tuple[str, int]]] = {}
        #: deliveries that may have run: ever among their worker's oldest slots, or answered
        self.may_have_run: set[tuple[str, int]] = set()

    def settle(self, outcome: Any) -> None:
        for kind, tasks in (("done", outcome.done), ("dead", outcome.dead)):
            for t in tasks:
                assert t.id not in self.settled, f"{t.id} settled twice"
                self.settled[t.id] = kind
                assert t.state is (TaskState.DONE if kind == "done" else TaskState.DEAD)

    def mark_started(self) -> None:
        for worker, box in self.outbox.items():
            self.may_have_run.update(box[: self.windows[worker][1]])

    @rule(count=st.integers(1, 4), attempts=st.integers(1, 3), deadline=st.sampled_from([1.0, 3.0]))
    def submit(self, count: int, attempts: int, deadline: float) -> None:
        for _ in range(count):
            t = task(self.next_id, attempts=attempts, deadline=deadline)
            self.next_id += 1
            self.submitted[t.id] = t
            self.table.submit(t)

    @rule(worker=st.sampled_from(WORKERS), window=st.integers(1, 4), slots=st.integers(1, 3))
    def worker_joins(self, worker: str, window: int, slots: int) -> None:
        if worker in self.windows:
            return
        self.table.set_credit(worker, window, self.now, slots)
        self.windows[worker] = (window, slots)
        self.outbox[worker] = []

    @rule(worker=st.sampled_from(WORKERS))
    def worker_lost(self, worker: str) -> None:
        self.settle(self.table.lose_worker(worker, self.now))
        self.windows.pop(worker, None)
        self.outbox.pop(worker, None)

    @rule(fail_send=st.booleans())
    def assign(self, fail_send: bool) -> None:
        batches = self.table.assign(self.now)
        for worker, tasks in batches:
            assert worker in self.windows
            if fail_send:
                self.table.unassign(worker, tasks, self.now)
                continue
            self.outbox[worker].extend((t.id, t.attempts) for t in tasks)
        self.mark_started()

    @precondition(lambda self: any(self.outbox.values()))
    @rule(data=st.data(), ok_=st.booleans(), in_slots=st.booleans())
    def answer(self, data: st.DataObject, ok_: bool, in_slots: bool) -> None:
        """A worker answers one of its oldest ``slots`` deliveries (or, misbehaving, any)."""
        worker = data.draw(st.sampled_from(sorted(w for w, box in self.outbox.items() if box)))
        box = self.outbox[worker]
        last = min(len(box), self.windows[worker][1]) if in_slots else len(box)
        task_id, attempt = box.pop(data.draw(st.integers(0, last - 1)))
        self.may_have_run.add((task_id, attempt))
        value = "v" if ok_ else {"type": "E", "message": "x"}
        self.settle(self.table.on_results(worker, [[task_id, attempt, ok_, value]], self.now))
        self.mark_started()

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 2.5]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.settle(self.table.tick(self.now))

    @invariant()
    def every_task_is_in_exactly_one_place(self) -> None:
        for task_id, t in self.submitted.items():
            in_table = self.table.get(task_id) is not None
            assert in_table != (task_id in self.settled), (t, self.settled.get(task_id))
            assert t.charged <= t.max_attempts
        stats = self.table.stats()
        assert stats.queued + stats.in_flight == self.table.unsettled
        assert stats.done + stats.dead == len(self.settled)

    @invariant()
    def only_deliveries_that_may_have_run_are_charged(self) -> None:
        for t in self.submitted.values():
            ran = sum((t.id, a) in self.may_have_run for a in range(1, t.attempts + 1))
            assert t.charged <= ran, (t, ran)

    @invariant()
    def credit_and_slots_are_what_workers_hold(self) -> None:
        assert sorted(self.table.workers) == sorted(self.windows)
        hung = 0
        for worker, (window, slots) in self.windows.items():
            held = self.table.held(worker)
            assert len(held) <= window
            assert held == self.outbox[worker]  # the model and the table agree, in order
            assert self.table.started(worker) == held[:slots]
            view = self.table._workers[worker]  # noqa: SLF001 - white-box check
            assert view.overdue <= set(view.started)
            hung += len(view.overdue)
            if view.probe is not None:  # a suspect on probation is alone with overdue ones
                assert set(held) == view.overdue | {view.probe}
        assert hung == self.table.stats().hung

    @invariant()
    def in_flight_tasks_are_held_by_their_worker(self) -> None:
        in_flight = 0
        for t in self.submitted.values():
            if t.state is TaskState.IN_FLIGHT:
                in_flight += 1
                assert (t.id, t.attempts) in self.table.held(t.worker)
            else:
                assert t.worker is None
        assert in_flight == self.table.stats().in_flight

    @invariant()
    def next_due_is_never_late(self) -> None:
        """tick() may be skipped until next_due: nothing time-based falls due before it."""
        for worker in self.table._workers.values():  # noqa: SLF001 - white-box check
            for key, since in worker.started.items():
                if key not in worker.overdue:
                    assert self.table.next_due <= since + worker.held[key].deadline_s
        assert self.table.next_due <= self.table._waiting.next_retry  # noqa: SLF001


TestTaskTableMachine = TaskTableMachine.TestCase
TestTaskTableMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["fail", "lose", "stall", "ok"]), min_size=1, max_size=30),
    st.integers(1, 12),
)
def test_everything_settles_once_workers_behave(chaos: list[str], count: int) -> None:
    """Whatever went wrong before, a well-behaved worker settles every task (done or dead) in a
    bounded number of steps, and no task is settled twice."""
    table = TaskTable("job", RetryPolicy(backoff_s=0.5, backoff_max_s=2.0))
    tasks = [task(i, attempts=3, deadline=1.0) for i in range(count)]
    for t in tasks:
        table.submit(t)
    now, settled = 0.0, []
    outbox: list[tuple[str, int]] = []
    table.set_credit("w", 3, now)
    for step in chaos:
        outbox.extend((t.id, t.attempts) for _, ts in table.assign(now) for t in ts)
        if step == "lose":
            outbox.clear()
            out = table.lose_worker("w", now)
            table.set_credit("w", 3, now)
        elif step == "stall":
            now += 1.5
            out = table.tick(now)
        elif outbox:
            task_id, attempt = outbox.pop(0)
            result = [task_id, attempt, step == "ok", {"type": "E", "message": ""}]
            out = table.on_results("w", [result], now)
        else:
            continue
        settled.extend(out.done + out.dead)
    for _ in range(500):
        if table.unsettled == 0:
            break
        outbox.extend((t.id, t.attempts) for _, ts in table.assign(now) for t in ts)
        if outbox:
            task_id, attempt = outbox.pop(0)
            out = table.on_results("w", [[task_id, attempt, True, "v"]], now)
            settled.extend(out.done + out.dead)
        now += 0.25
        out = table.tick(now)
        settled.extend(out.done + out.dead)
    assert table.unsettled == 0
    assert sorted(t.id for t in settled) == sorted(t.id for t in tasks)
    assert all(t.charged <= 3 for t in tasks)


# --- task frames (the wire.py additions: kinds 6, 7, 8) ----------------------------------------

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_ids = st.text(min_size=1, max_size=128)
_keys = st.none() | st.text(max_size=256)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_ids, st.integers(1, 2**32 - 1), _values, _keys), min_size=1, max_size=5))
def test_task_batches_round_trip(tasks: list[tuple[str, int, Any, str | None]]) -> None:
    body = task_frames.pack_tasks([(i, a, wire.pack_body(v), k) for i, a, v, k in tasks])
    kind, items = task_frames.parse_to_worker([wire.pack_header(wire.Kind.TASK, 1, 0.0), body])
    assert kind is wire.Kind.TASK
    assert items == [[i, a, v, k] for i, a, v, k in tasks]
    records = []  # the dispatcher's encoder of Task records writes the same bytes
    for i, a, v, k in tasks:
        record = Task(i, wire.pack_body(v), k)
        record.attempts = a
        records.append(record)
    assert task_frames.pack_task_records(records) == body


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_ids, st.integers(1, 2**32 - 1), st.booleans(), _values), min_size=1,
                max_size=5))
def test_result_batches_round_trip(results: list[tuple[str, int, bool, Any]]) -> None:
    items = [[i, a, ok, v if ok else {"type": "E", "message": str(v)}] for i, a, ok, v in results]
    frames = [b"", wire.pack_header(wire.Kind.RESULT, 2, 0.0), task_frames.pack_results(items)]
    assert task_frames.parse_from_worker(frames) == (wire.Kind.RESULT, items)
    credit = [b"", wire.pack_header(wire.Kind.CREDIT, 0, 0.0), task_frames.pack_credit(64)]
    assert task_frames.parse_from_worker(credit) == (wire.Kind.CREDIT, (64, 1))
    both = [b"", wire.pack_header(wire.Kind.CREDIT, 0, 0.0),
            wire.pack_body({"credit": 8, "slots": 4})]
    assert task_frames.parse_from_worker(both) == (wire.Kind.CREDIT, (8, 4))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([wire.Kind.TASK, wire.Kind.RESULT, wire.Kind.CREDIT, wire.Kind.REQUEST]),
       _values | st.lists(st.lists(_values, min_size=0, max_size=5), max_size=3),
       st.binary(max_size=32))
def test_task_frame_decoders_accept_or_refuse_never_crash(kind: wire.Kind, value: Any,
                                                          junk: bytes) -> None:
    header = wire.pack_header(kind, 0, 0.0)
    for body in (wire.pack_body(value), junk):
        for decode, frames in ((task_frames.parse_to_worker, [header, body]),
                               (task_frames.parse_from_worker, [b"", header, body])):
            try:
                decode(frames)
            except RemoteProtocolError:
                pass


def test_task_frames_refuse_what_the_spec_forbids() -> None:
    def to_worker(body: Any, kind: wire.Kind = wire.Kind.TASK) -> None:
        task_frames.parse_to_worker([wire.pack_header(kind, 0, 0.0), wire.pack_body(body)])

    for bad in ([], [["", 1, None, None]], [["x" * 129, 1, None, None]], [["a", 0, None, None]],
                [["a", True, None, None]], [["a", 1, None, 5]], [["a", 1, None]], {"a": 1}):
        with pytest.raises(RemoteProtocolError):
            to_worker(bad)
    with pytest.raises(RemoteProtocolError):
        to_worker([], wire.Kind.CREDIT)  # a credit request is a map
    with pytest.raises(RemoteProtocolError):
        to_worker({}, wire.Kind.RESULT)  # results do not go to workers

    def from_worker(body: Any, kind: wire.Kind = wire.Kind.RESULT) -> None:
        task_frames.parse_from_worker([b"", wire.pack_header(kind, 0, 0.0), wire.pack_body(body)])

    for bad in ([["a", 1, 1, None]], [["a", 1, False, "boom"]], [["a", 1, False, {"type": 1}]]):
        with pytest.raises(RemoteProtocolError):
            from_worker(bad)
    for credit in ({}, {"credit": 0}, {"credit": 65536}, {"credit": "1"}, [64],
                   {"credit": 1, "slots": 0}, {"credit": 1, "slots": True}):
        with pytest.raises(RemoteProtocolError):
            from_worker(credit, wire.Kind.CREDIT)
    for credit in (0, 65536, True):
        with pytest.raises(LocalProtocolError):
            task_frames.pack_credit(credit)
