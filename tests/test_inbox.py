"""The owner-thread inbox (transport/inbox.py): ordering, what wakes the owner, and lifetimes."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from zmqfabric.transport.inbox import Inbox


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    box = Inbox()
    box.open()
    yield box
    box.close()


def _poller(box: Inbox) -> zmq.Poller:
    poller = zmq.Poller()
    poller.register(box.fd, zmq.POLLIN)
    return poller


def _pipe_bytes(box: Inbox) -> int:
    try:
        return len(os.read(box.fd, 4096))
    except BlockingIOError:
        return 0


def test_run_pending_calls_in_order_and_leaves_later_posts_for_the_next_call(inbox) -> None:
    seen: list[int] = []

    def add(n: int) -> None:
        seen.append(n)
        if n == 1:
            inbox.post(add, 3)  # posted while running: waits for the next call

    inbox.post(add, 1)
    inbox.post(add, 2)
    assert inbox.run_pending() == 2 and seen == [1, 2]
    assert inbox.run_pending() == 1 and seen == [1, 2, 3]
    assert inbox.run_pending() == 0


def test_limit_and_a_raising_callable_leave_the_rest_queued(inbox) -> None:
    seen: list[int] = []
    inbox.post(seen.append, 1)
    inbox.post(seen.append, 2)
    assert inbox.run_pending(limit=1) == 1 and seen == [1]

    def boom() -> None:
        raise RuntimeError("boom")

    inbox.post(boom)
    inbox.post(seen.append, 3)
    with pytest.raises(RuntimeError):
        inbox.run_pending()  # 2 runs, then boom
    assert seen == [1, 2] and inbox.pending
    inbox.run_pending()
    assert seen == [1, 2, 3]


def test_posts_to_a_busy_owner_write_nothing_and_one_to_a_sleeper_wakes_it(inbox) -> None:
    poller = _poller(inbox)
    for n in range(100):
        inbox.post(int, n)
    assert _pipe_bytes(inbox) == 0  # the owner is not sleeping: no system call per post
    assert inbox.poll(poller, 10_000) == {}  # work is queued: the poll does not sleep
    inbox.run_pending()

    woke = threading.Event()
    threading.Timer(0.05, lambda: inbox.post(woke.set)).start()
    events = inbox.poll(poller, 10_000)
    assert inbox.fd in events and not inbox.sleeping
    assert _pipe_bytes(inbox) == 0  # poll emptied it
    inbox.run_pending()
    assert woke.is_set()


def test_defer_waits_for_the_next_run_without_waking_anyone() -> None:
    box = Inbox(always_wake=True)
    box.open()
    try:
        box.post(int)
        assert _pipe_bytes(box) == 1  # always_wake: every post writes
        box.defer(int)
        assert _pipe_bytes(box) == 0
        poller = _poller(box)
        assert box.poll(poller, 10) == {}  # queued work does not make an always-wake owner spin
        assert box.run_pending() == 2
    finally:
        box.close()


def test_closed_or_unopened_inboxes_drop_posts_and_close_is_idempotent() -> None:
    box = Inbox()
    assert not box.post(int) and not box.pending and box.closed
    box.open()
    assert box.post(int)
    box.close()
    box.close()
    assert box.closed and not box.pending and box.fd == box.wakeup_fd == -1
    assert not box.post(int)
    box.wake()  # a late wake-up writes nowhere


def test_a_nap_is_not_cut_short_by_posts_but_by_wake(inbox) -> None:
    poller = _poller(inbox)
    posted = threading.Event()
    threading.Timer(0.02, lambda: (inbox.post(int), posted.set())).start()
    for _ in range(100):  # bounded: the timer fires during one of these naps, unless very late
        assert inbox.poll(poller, 100, wake=False) == {}  # the post wrote nothing: nap ran out
        if posted.is_set():
            break
    assert posted.is_set() and _pipe_bytes(inbox) == 0 and inbox.run_pending() == 1
    inbox.post(int)
    assert inbox.poll(poller, 10_000, wake=False) == {}  # queued before: no nap at all
    inbox.run_pending()
    threading.Timer(0.02, inbox.wake).start()
    assert inbox.fd in inbox.poll(poller, 10_000, wake=False)  # wake() ends a nap


def test_leftovers_run_once_each_in_any_thread_after_a_close_that_keeps_them() -> None:
    box = Inbox()
    box.open()
    ran: list[int] = []
    lock = threading.Lock()

    def note(n: int) -> None:
        with lock:
            ran.append(n)

    for n in range(20_000):
        box.post(note, n)
    box.close(drop=False)
    assert not box.post(note, -1) and len(box.pending) == 20_000  # kept; later posts refused
    threads = [threading.Thread(target=box.run_leftovers) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(ran) == list(range(20_000)) and not box.pending
    assert box.run_leftovers() == 0


def test_a_sleeper_is_woken_by_one_write_however_many_posts_come_before_it_runs(inbox) -> None:
    poller = _poller(inbox)
    # While the owner sleeps (and while it waits for the GIL after waking, sleeping still
    # raised), only the first post writes: a burst of submissions costs one system call.
    inbox.sleeping = True  # as poll() raises it
    for n in range(100):
        inbox.post(int, n)
    assert _pipe_bytes(inbox) == 1
    inbox.sleeping = False
    inbox.run_pending()
    # The next sleep starts afresh: its first post writes again.
    woke = threading.Event()
    threading.Timer(0.05, lambda: (inbox.post(woke.set), inbox.post(int))).start()
    assert inbox.fd in inbox.poll(poller, 10_000)
    inbox.run_pending()
    assert woke.is_set()
    # always_wake owners (several pollers) keep a write per post.
    box = Inbox(always_wake=True)
    box.open()
    try:
        for n in range(3):
            box.post(int, n)
        assert _pipe_bytes(box) == 3
    finally:
        box.close()


def test_no_post_is_missed_by_a_sleeping_owner_under_racing_posters(inbox) -> None:
    """Four threads post 20,000 callables at random moments while the owner sleeps with a 2 s
    timeout between rounds: a missed wake-up would show as a poll that ran out its timeout."""
    poller = _poller(inbox)
    total, posters = 20_000, 4
    seen = [0]

    def note() -> None:
        seen[0] += 1

    def post_share() -> None:
        for n in range(total // posters):
            inbox.post(note)
            if n % 97 == 0:
                time.sleep(0.0002)  # let the owner fall asleep now and then

    threads = [threading.Thread(target=post_share) for _ in range(posters)]
    for thread in threads:
        thread.start()
    slowest = 0.0
    deadline = time.monotonic() + 60
    while seen[0] < total and time.monotonic() < deadline:
        started = time.monotonic()
        inbox.poll(poller, 2_000)
        slowest = max(slowest, time.monotonic() - started)
        inbox.run_pending()
    for thread in threads:
        thread.join(10)
    assert seen[0] == total
    assert slowest < 1.5, f"a poll slept {slowest:.2f} s with posts queued: a wake-up was missed"


def test_a_nudge_keeps_the_next_poll_from_sleeping_and_writes_once_per_sleep(inbox) -> None:
    poller = _poller(inbox)
    # Owner awake: a nudge writes nothing, and the next poll returns at once.
    inbox.nudge()
    assert _pipe_bytes(inbox) == 0
    started = time.monotonic()
    inbox.poll(poller, 10_000)
    assert time.monotonic() - started < 1.0
    # The nudge was taken by that poll: the next one sleeps its timeout out.
    started = time.monotonic()
    inbox.poll(poller, 100)
    assert time.monotonic() - started >= 0.09
    # Owner asleep: a burst of nudges costs one write.
    inbox.sleeping = True  # as poll() raises it
    for _ in range(100):
        inbox.nudge()
    assert _pipe_bytes(inbox) == 1
    inbox.sleeping = False
    assert inbox.poll(poller, 10_000) == {}  # (the owner wakes and takes those nudges)
    # A nudge from another thread wakes a sleeper.
    threading.Timer(0.05, inbox.nudge).start()
    started = time.monotonic()
    assert inbox.fd in inbox.poll(poller, 10_000)
    assert time.monotonic() - started < 5.0


def test_no_nudge_is_missed_by_an_owner_that_reads_shared_state(inbox) -> None:
    """Two threads each add an item to a list, nudge, and wait for the owner to take it, 2,000
    times; the owner takes what is there and sleeps (2 s timeout). A nudge lost between the
    owner's look at the list and its sleep leaves its poster waiting: a poll that ran out."""
    poller = _poller(inbox)
    rounds, posters = 2_000, 2
    shared: list[threading.Event] = []
    lock = threading.Lock()

    def add_share() -> None:
        taken = threading.Event()
        for _ in range(rounds):
            taken.clear()
            with lock:
                shared.append(taken)
            inbox.nudge()
            if not taken.wait(10):
                return

    threads = [threading.Thread(target=add_share) for _ in range(posters)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads between almost any two calls: races show
    try:
        for thread in threads:
            thread.start()
        seen, slowest = 0, 0.0
        deadline = time.monotonic() + 60
        while seen < rounds * posters and slowest < 1.5 and time.monotonic() < deadline:
            with lock:
                seen += len(shared)
                for taken in shared:
                    taken.set()
                shared.clear()
            if seen == rounds * posters:
                break
            started = time.monotonic()
            inbox.poll(poller, 2_000)
            slowest = max(slowest, time.monotonic() - started)
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(interval)
    assert slowest < 1.5, f"a poll slept {slowest:.2f} s with an item waiting: a nudge was missed"
    assert seen == rounds * posters
