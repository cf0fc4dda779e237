"""Handlers never block the node: every service, task queue and the control endpoint is served
apart from the others; ``concurrency=N`` runs N handler calls at once (threads for plain
functions, tasks of the loop for coroutine functions); hung slots are reported; monitoring is
not counted as service traffic. Real nodes on loopback, sync and asyncio."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgpack
import pytest
import zmq

import zmqfabric as zf
import zmqfabric.aio
from tests.helpers import RawSockets, unique, wait_until

SLOW = 20.0
#: How long the long task of the first test runs (s).
TASK_S = 3.0
T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]], timeout: float = 2 * SLOW) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)

    return asyncio.run(bounded())


def served(node: zf.Node) -> zf.Node:
    node.start()
    node.serve_in_background()
    return node


# --- endpoints never wait on each other ------------------------------------------------------


def test_a_service_and_the_control_endpoint_answer_while_a_3_s_task_runs(make_node) -> None:
    service, task = unique("quick"), unique("long")
    node = zf.Node(unique("worker"))
    started = threading.Event()

    @node.task(task)
    def long(body: Any) -> str:
        started.set()
        time.sleep(TASK_S)
        return "done"

    @node.reply(service)
    def quick(body: Any) -> Any:
        return body

    with served(node):
        caller = make_node("caller")
        caller.wait_for_endpoint(zf.EndpointKind.REPLY, service, SLOW)
        handle = caller.submit(task, None)
        assert started.wait(SLOW)
        begin = time.monotonic()
        assert caller.request(service, 1, timeout=SLOW) == 1
        assert caller.ping(node.name, timeout=SLOW)["node"] == node.name
        elapsed = time.monotonic() - begin
        assert not handle.done(), "the task ended before the service answered"
        assert elapsed < TASK_S / 2, f"the service answered after {elapsed:.2f} s"
        assert handle.result(SLOW) == "done"


@pytest.mark.parametrize("flavour", ["sync", "aio-plain", "aio-coroutine"])
def test_a_second_service_answers_while_the_first_handler_sleeps(flavour: str) -> None:
    first, second = unique("sleepy"), unique("awake")
    entered, release = threading.Event(), threading.Event()

    def sleepy(body: Any) -> str:
        entered.set()
        release.wait(SLOW)
        return "slept"

    async def sleepy_async(body: Any) -> str:
        entered.set()
        await asyncio.to_thread(release.wait, SLOW)  # a coroutine that waits, off the loop
        return "slept"

    def awake(body: Any) -> str:
        return "awake"

    if flavour == "sync":
        node = zf.Node(unique("provider"))
        node.reply(first)(sleepy)
        node.reply(second)(awake)
        with served(node), zf.Node(unique("caller")) as caller:
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(caller.request, first, None, SLOW)
                assert entered.wait(SLOW)
                assert caller.request(second, None, timeout=SLOW) == "awake"
                assert not slow.done()
                release.set()
                assert slow.result(SLOW) == "slept"
        return

    async def main() -> None:
        node = zmqfabric.aio.Node(unique("provider"))
        node.reply(first)(sleepy if flavour == "aio-plain" else sleepy_async)
        node.reply(second)(awake)
        async with node, zmqfabric.aio.Node(unique("caller")) as caller:
            serving = asyncio.create_task(node.run(handle_signals=False))
            slow = asyncio.create_task(caller.request(first, None, timeout=SLOW))
            assert await asyncio.to_thread(entered.wait, SLOW)
            assert await caller.request(second, None, timeout=SLOW) == "awake"
            assert not slow.done()
            release.set()
            assert await asyncio.wait_for(slow, SLOW) == "slept"
            node.stop()
            await asyncio.wait_for(serving, SLOW)

    try:
        run(main)
    finally:
        release.set()


# --- concurrency=N ---------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "aio-plain", "aio-coroutine"])
def test_concurrency_n_runs_n_requests_at_once(flavour: str) -> None:
    """Each call waits at a barrier of N: the N requests complete only if they run at once."""
    service, n = unique("wide"), 4
    barrier = threading.Barrier(n, timeout=SLOW)

    def meet(body: Any) -> int:
        barrier.wait()
        return body

    async def meet_async(body: Any) -> int:
        await asyncio.to_thread(barrier.wait)
        return body

    def call_all(caller: zf.Node) -> list[Any]:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda i: caller.request(service, i, timeout=SLOW), range(n)))

    if flavour == "sync":
        node = zf.Node(unique("provider"))
        node.reply(service, concurrency=n)(meet)
        with served(node), zf.Node(unique("caller")) as caller:
            assert call_all(caller) == list(range(n))
            assert node.service_stats()[service] == {"handled": n, "failed": 0, "slots": n,
                                                      "busy": 0, "hung": 0}
        return

    async def main() -> None:
        node = zmqfabric.aio.Node(unique("provider"))
        node.reply(service, concurrency=n)(meet if flavour == "aio-plain" else meet_async)
        async with node:
            serving = asyncio.create_task(node.run(handle_signals=False))
            with zf.Node(unique("caller")) as caller:
                assert await asyncio.to_thread(call_all, caller) == list(range(n))
            node.stop()
            await asyncio.wait_for(serving, SLOW)

    run(main)


@pytest.mark.parametrize("flavour", ["sync", "aio-plain", "aio-coroutine"])
def test_more_requests_than_slots_are_all_answered_never_more_than_n_at_once(
    flavour: str,
) -> None:
    """20 callers at once on 2 slots: the rest wait (in ZeroMQ's queue), none is lost."""
    service, n, callers = unique("narrow"), 2, 20
    lock = threading.Lock()
    running = [0, 0]  # now, most

    def count(delta: int) -> None:
        with lock:
            running[0] += delta
            running[1] = max(running)

    def hold(body: Any) -> Any:
        count(1)
        time.sleep(0.02)
        count(-1)
        return body

    async def hold_async(body: Any) -> Any:
        count(1)
        await asyncio.sleep(0.02)
        count(-1)
        return body

    def call_all(caller: zf.Node) -> list[Any]:
        with ThreadPoolExecutor(callers) as pool:
            return list(pool.map(lambda i: caller.request(service, i, timeout=SLOW),
                                 range(callers)))

    if flavour == "sync":
        node = zf.Node(unique("provider"))
        node.reply(service, concurrency=n)(hold)
        with served(node), zf.Node(unique("caller")) as caller:
            assert call_all(caller) == list(range(callers))
    else:
        async def main() -> None:
            node = zmqfabric.aio.Node(unique("provider"))
            node.reply(service, concurrency=n)(hold if flavour == "aio-plain" else hold_async)
            async with node:
                serving = asyncio.create_task(node.run(handle_signals=False))
                with zf.Node(unique("caller")) as caller:
                    assert await asyncio.to_thread(call_all, caller) == list(range(callers))
                node.stop()
                await asyncio.wait_for(serving, SLOW)

        run(main)
    assert running == [0, n]


def test_task_slots_start_in_order_and_the_credit_says_how_many(make_node) -> None:
    """The wire: credit ``{"credit", "slots"}``; then 6 tasks in one batch to 3 slots: the first
    3 start, in order; each release starts the next in order; never more than 3 at once."""
    task, slots = unique("slots"), 3
    node = zf.Node(unique("worker"))
    lock = threading.Lock()
    started: list[str] = []
    running = [0, 0]  # now, most
    release = {f"id-{i}": threading.Event() for i in range(6)}

    @node.task(task, prefetch=10, concurrency=slots)
    def hold(body: Any) -> str:
        me = zf.current_task().id
        with lock:
            started.append(me)
            running[0] += 1
            running[1] = max(running)
        try:
            release[me].wait(SLOW)
        finally:
            with lock:
                running[0] -= 1
        return me

    with served(node), RawSockets() as raw:
        finder = make_node("finder")
        finder.wait_for_endpoint(zf.EndpointKind.TASK, task, SLOW)
        dealer = raw(zmq.DEALER, connect=finder.directory.providers(zf.EndpointKind.TASK, task)[0])
        header = lambda kind: msgpack.packb([2, kind | 16, 1, time.time()])  # noqa: E731
        dealer.send_multipart([b"", header(8), msgpack.packb({})])
        assert dealer.poll(int(SLOW * 1000))
        assert msgpack.unpackb(dealer.recv_multipart()[2]) == {"credit": 10, "slots": slots}

        dealer.send_multipart([b"", header(6), msgpack.packb(
            [[f"id-{i}", 1, i, None] for i in range(6)])])
        wait_until(lambda: len(started) == 3, SLOW, "3 tasks started")
        assert started == ["id-0", "id-1", "id-2"]
        assert node.task_stats()["serve"][task]["busy"] == 3
        release["id-1"].set()
        wait_until(lambda: len(started) == 4, SLOW, "a 4th task started")
        assert started[3] == "id-3"
        for event in release.values():
            event.set()
        results = []
        while len(results) < 6:
            assert dealer.poll(int(SLOW * 1000))
            results.extend(msgpack.unpackb(dealer.recv_multipart()[2]))
        assert sorted(r[0] for r in results if r[2]) == [f"id-{i}" for i in range(6)]
        assert running[1] == slots


def test_the_default_prefetch_covers_every_slot(name) -> None:
    wide, narrow = name("wide"), name("narrow")
    node = zf.Node(unique("worker"), tasks=zf.TaskConfig(prefetch=2))
    node.task(wide, concurrency=5)(lambda body: body)
    node.task(narrow, prefetch=1, concurrency=5)(lambda body: body)  # given: kept
    with node:
        stats = node.task_stats()["serve"]
        assert (stats[wide]["prefetch"], stats[wide]["slots"]) == (5, 5)
        assert (stats[narrow]["prefetch"], stats[narrow]["slots"]) == (1, 5)


def test_asyncio_task_concurrency_with_coroutines() -> None:
    task, n = unique("aio-wide"), 4

    async def main() -> list[Any]:
        worker = zmqfabric.aio.Node(unique("aio-worker"))
        barrier = asyncio.Barrier(n)

        @worker.task(task, concurrency=n)
        async def meet(i: int) -> int:
            await asyncio.wait_for(barrier.wait(), SLOW)
            return i

        async with worker:
            serving = asyncio.create_task(worker.run(handle_signals=False))
            async with zmqfabric.aio.Node(unique("aio-producer")) as producer:
                handles = [await producer.submit(task, i) for i in range(2 * n)]
                results = [await asyncio.wait_for(h, SLOW) for h in handles]
            worker.stop()
            await asyncio.wait_for(serving, SLOW)
            return results

    assert run(main) == list(range(2 * n))


# --- hung slots ------------------------------------------------------------------------------


def test_hung_slots_are_reported_and_the_node_keeps_answering(make_node, caplog) -> None:
    caplog.set_level(logging.INFO, logger="zmqfabric.patterns.handlers")
    task, service, stuck = unique("stuck"), unique("alive"), unique("stuck-svc")
    # Hung: a task slot after the task deadline, a service slot after the request timeout.
    node = zf.Node(unique("worker"), tasks=zf.TaskConfig(deadline_s=0.3),
                   config=zf.NodeConfig(request_timeout_s=0.3))
    release = threading.Event()
    node.task(task, concurrency=2)(lambda body: release.wait(SLOW))
    node.reply(service)(lambda body: body)
    node.reply(stuck)(lambda body: release.wait(SLOW))
    try:
        with served(node):
            caller = make_node("caller")
            for i in range(2):
                caller.submit(task, i)
            with pytest.raises(zf.RequestTimeoutError):
                caller.request(stuck, None, timeout=0.5)
            wait_until(lambda: node.task_stats()["serve"][task]["hung"] == 2, SLOW, "2 hung")
            assert node.service_stats()[stuck]["hung"] == 1
            assert node.service_stats()[service]["hung"] == 0
            assert caller.stats(node.name, timeout=SLOW)["tasks"]["serve"][task]["hung"] == 2
            wait_until(lambda: any("every handler slot (2) is hung" in r.getMessage()
                                   and r.levelno == logging.ERROR for r in caplog.records),
                       SLOW, "the ERROR line")
            hung_lines = [r for r in caplog.records
                          if "its slot is hung" in r.getMessage() and task in r.getMessage()]
            assert len(hung_lines) == 2 and all(r.levelno == logging.WARNING for r in hung_lines)
            wait_until(lambda: any(f"service {stuck}: every handler slot (1) is hung" in
                                   r.getMessage() for r in caplog.records), SLOW, "the service")
            assert caller.request(service, "still here", timeout=SLOW) == "still here"
            release.set()
            wait_until(lambda: node.task_stats()["serve"][task]["busy"] == 0, SLOW, "free")
            wait_until(lambda: any("slot is free again" in r.getMessage()
                                   for r in caplog.records), SLOW, "the recovery line")
    finally:
        release.set()


# --- monitoring and definitions ---------------------------------------------------------------


def test_replies_sent_counts_service_replies_not_the_monitor_s_pings(make_node) -> None:
    service = unique("counted")
    node = zf.Node(unique("provider"))
    node.reply(service)(lambda body: body)
    with served(node):
        monitor = make_node("monitor")
        for _ in range(5):
            monitor.ping(node.name, timeout=SLOW)
        counters = monitor.stats(node.name, timeout=SLOW)["counters"]
        assert counters.get("replies_sent", 0) == 0, counters
        assert counters["control_replies_sent"] >= 5
        assert monitor.request(service, 1, timeout=SLOW) == 1
        counters = monitor.stats(node.name, timeout=SLOW)["counters"]
        assert counters["replies_sent"] == 1, counters


def test_bad_definitions_are_refused() -> None:
    node = zf.Node(unique("defs"))

    async def coroutine(body: Any) -> Any:
        return body

    with pytest.raises(zf.LocalProtocolError, match="aio"):
        node.reply(unique("svc"))(coroutine)  # a sync node calls plain functions
    with pytest.raises(zf.LocalProtocolError, match="aio"):
        node.task(unique("task"))(coroutine)
    for bad in (0, -1, 1025, 2.0, "2"):
        with pytest.raises(zf.LocalProtocolError, match="concurrency"):
            node.reply(unique("svc"), concurrency=bad)  # type: ignore[arg-type]
        with pytest.raises(zf.LocalProtocolError, match="concurrency"):
            node.task(unique("task"), concurrency=bad)  # type: ignore[arg-type]
    zmqfabric.aio.Node(unique("aio-defs")).reply(unique("svc"), concurrency=3)(coroutine)
