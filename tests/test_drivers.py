"""The drivers that serve endpoints (:mod:`zmqfabric.patterns.drivers`), with real sockets and
nodes on loopback: an inline driver (``concurrency=1``, sync node) blocks in its socket's receive,
and ``stop`` must still end it at once."""

from __future__ import annotations

import threading
import time

import zmqfabric as zf
from tests.helpers import unique

SLOW = 20.0


def served(node: zf.Node) -> threading.Thread:
    node.start()
    thread = node.serve_in_background()
    return thread


def test_an_idle_service_and_task_worker_stop_at_once_and_serve_again(make_node) -> None:
    """A concurrency-1 endpoint's thread blocks in its socket's receive (no poll); the stop
    wakes it through the socket. Without that wake, run() would return only when the receive
    times out (the driver's idle net, 1 s). Three serve/stop cycles: each run binds a fresh
    wake-up address and unbinds it at the end; the wake messages are nobody's requests."""
    service, task = unique("idle"), unique("idle-task")
    node = zf.Node(unique("stopper"))
    node.reply(service)(lambda body: body)
    done = threading.Event()
    node.task(task)(lambda body: done.set())
    caller = make_node("caller")
    try:
        for cycle in range(3):
            thread = served(node)
            assert caller.request(service, cycle, timeout=SLOW) == cycle
            if cycle == 0:
                caller.submit(task, 1)
                assert done.wait(SLOW)
            started = time.monotonic()
            node.stop()
            thread.join(SLOW)
            took = time.monotonic() - started
            assert not thread.is_alive()
            assert took < 0.6, f"run() returned {took:.2f} s after stop(): no wake-up"
        counters = node.counters.snapshot()
    finally:
        node.close()
    assert not any(name.startswith("refused") for name in counters), counters
    assert counters["replies_sent"] == 3, counters


def test_requests_arriving_while_run_returns_and_restarts_are_all_answered(make_node) -> None:
    """``run(timeout=...)`` in a loop (the demo's providers) stops and restarts the drivers; a
    request the driver has taken off its socket when the stop comes must still be answered (one
    not yet read waits in the socket for the next run). Before: the inline driver dropped it,
    and its caller waited out its timeout (the demo: 1 request in about 1,000 failed)."""
    service = unique("restarting")
    node = zf.Node(unique("restarter"))
    node.reply(service)(lambda body: body)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            node.run(timeout=0.02, handle_signals=False)

    caller = make_node("caller")
    with node:
        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with caller.requester(service) as requester:
                for n in range(1500):
                    assert requester.request(n, timeout=3.0) == n
        finally:
            stop.set()
            thread.join(SLOW)
    assert not thread.is_alive()
