"""Lifetimes: constructors open nothing, ``with`` and ``close()`` release everything (idempotently),
a closed node refuses use with ClosedError, ``run()`` returns on ``stop()``, timeout and signals,
and a child process in ``run()`` exits 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import gc
import os
import signal
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import zmqfabric as zf
import zmqfabric.aio
from tests.procs import Child, ProcessGroup

SLOW = 20.0


def native_threads() -> set[int]:
    """Every thread of this process (kernel task ids), libzmq's and zeroconf's included."""
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def open_fds() -> set[tuple[int, str]]:
    """Open file descriptors with what they point to (a reused number still shows as new)."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add((int(fd), os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:  # closed meanwhile (or the listing's own descriptor)
            pass
    return fds


def fabric_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("zmqfabric"))


def baseline() -> tuple[set[int], set[tuple[int, str]]]:
    gc.collect()  # earlier tests' garbage (child pipes...) must not close fds during this one
    return native_threads(), open_fds()


def new_since(probe: Callable[[], set[Any]], before: set[Any], timeout: float = 5.0) -> set[Any]:
    """What ``probe()`` has that ``before`` had not, once that is nothing (threads may take a
    moment to be reaped after join), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (extra := probe() - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    return extra


@pytest.fixture(scope="module")
def warmed() -> None:
    """Open and close one node first, so lazy one-time imports and caches do not count."""
    from tests.conftest import unique

    with zf.Node(unique("warmup")) as node:
        node.publisher(unique("s"))
        node.subscribe(unique("s"))


# --- constructors and with -------------------------------------------------------------------


def test_constructor_opens_nothing(warmed, name) -> None:
    (threads, fds), names = baseline(), fabric_threads()

    node = zf.Node(name("idle"))
    node.reply(name("svc"))(lambda body: body)
    aio_node = zmqfabric.aio.Node(name("idle-aio"))

    assert native_threads() - threads == set()
    assert open_fds() - fds == set()
    assert fabric_threads() == names
    assert node.state.value == "new" and aio_node.state.value == "new"
    # Closing a node that never started is allowed, opens nothing, and is final.
    node.close()
    node.close()
    assert node.state.value == "closed"
    with pytest.raises(zf.ClosedError):
        node.start()
    assert native_threads() - threads == set() and open_fds() - fds == set()


def test_with_block_releases_threads_sockets_and_fds(warmed, name) -> None:
    threads, fds = baseline()
    service, stream, pipeline = name("svc"), name("stream"), name("pipe")

    with zf.Node(name("busy")) as node:
        assert fabric_threads(), "a started node runs its control thread"
        assert native_threads() - threads, "a started node runs zeroconf's and libzmq's threads"
        publisher = node.publisher(stream)
        sub = node.subscribe(stream)
        puller = node.puller(pipeline)
        pusher = node.pusher(pipeline)
        assert pusher.wait_ready(SLOW) and sub.wait_ready(SLOW)
        pusher.send({"x": 1}, timeout=SLOW)
        assert puller.recv(timeout=SLOW) == {"x": 1}
        publisher.send("t", 1)
        with pytest.raises(zf.NoProviderError):
            node.request(service, None, timeout=0.05)

    assert node.state.value == "closed"
    assert all(h.closed for h in (publisher, sub, puller, pusher))
    assert fabric_threads() == []
    assert new_since(native_threads, threads) == set()
    assert new_since(open_fds, fds) == set()


def test_with_block_closes_on_error(warmed, name) -> None:
    threads, fds = baseline()
    with pytest.raises(KeyError), zf.Node(name("raises")) as node:
        raise KeyError("boom")
    assert node.state.value == "closed"
    assert fabric_threads() == []
    assert new_since(native_threads, threads) == set()
    assert new_since(open_fds, fds) == set()


# --- close and closed ------------------------------------------------------------------------


def test_close_is_idempotent(name) -> None:
    node = zf.Node(name("twice")).start()
    assert node.start() is node  # start is idempotent too
    publisher = node.publisher(name("stream"))
    node.close()
    node.close()
    assert node.state.value == "closed"
    assert publisher.closed
    publisher.close()  # a handle's close is idempotent, also after the node closed it


CLOSED_CALLS: dict[str, Callable[[zf.Node, str], Any]] = {
    "start": lambda n, x: n.start(),
    "run": lambda n, x: n.run(timeout=0.1),
    "request": lambda n, x: n.request(x, {}, timeout=0.1),
    "requester": lambda n, x: n.requester(x),
    "publisher": lambda n, x: n.publisher(x),
    "subscribe": lambda n, x: n.subscribe(x),
    "pusher": lambda n, x: n.pusher(x),
    "puller": lambda n, x: n.puller(x),
    "ping": lambda n, x: n.ping(n.name, timeout=0.1),
    "info": lambda n, x: n.info(n.name, timeout=0.1),
    "stats": lambda n, x: n.stats(n.name, timeout=0.1),
}


def test_closed_node_raises_closed_error(name) -> None:
    node = zf.Node(name("closed")).start()
    node.close()
    wrong = {}
    for call, use in sorted(CLOSED_CALLS.items()):
        start = time.monotonic()
        try:
            use(node, name("x"))
        except zf.ClosedError as exc:
            if node.name not in str(exc) or time.monotonic() - start > 1.0:
                wrong[call] = f"slow or unnamed: {exc}"
        except Exception as exc:  # noqa: BLE001 - collected: every call is checked
            wrong[call] = repr(exc)
        else:
            wrong[call] = "no error"
    assert not wrong, f"calls on a closed node that did not raise ClosedError: {wrong}"


def test_handles_of_a_closed_node_raise_closed_error(name) -> None:
    node = zf.Node(name("owner")).start()
    stream, pipeline, service = name("stream"), name("pipe"), name("svc")
    handles = {
        "publisher.send": (node.publisher(stream), lambda h: h.send("t", 1)),
        "subscription.recv": (node.subscribe(stream), lambda h: h.recv(timeout=0.1)),
        "pusher.send": (node.pusher(pipeline), lambda h: h.send(1, timeout=0.1)),
        "puller.recv": (node.puller(pipeline), lambda h: h.recv(timeout=0.1)),
        "requester.request": (node.requester(service), lambda h: h.request(1, timeout=0.1)),
    }
    node.close()
    for what, (handle, use) in handles.items():
        assert handle.closed, what
        with pytest.raises(zf.ClosedError):
            use(handle)


def test_use_before_start_is_refused(name) -> None:
    node = zf.Node(name("unstarted"))
    with pytest.raises(zf.FabricError, match="start"):
        node.request(name("svc"), {}, timeout=0.1)
    with pytest.raises(zf.FabricError, match="start"):
        node.publisher(name("stream"))
    assert node.state.value == "new"
    node.close()


def test_definition_errors(name) -> None:
    with pytest.raises(zf.InvalidNameError) as err:
        zf.Node("Not A Valid Name")
    assert isinstance(err.value, ValueError)
    node = zf.Node(name("defs"))
    service = name("svc")
    node.reply(service)(lambda body: body)
    with pytest.raises(zf.LocalProtocolError):
        node.reply(service)(lambda body: body)  # served twice
    with node:
        with pytest.raises(zf.LocalProtocolError):
            node.reply(name("late"))(lambda body: body)  # after start
        with pytest.raises(zf.InvalidNameError):
            node.publisher("no spaces allowed")
        node.publisher(name("stream"))


# --- run and stop ----------------------------------------------------------------------------


def test_run_returns_on_stop_from_another_thread(name) -> None:
    node = zf.Node(name("runner"))
    served = threading.Event()
    service = name("svc")

    @node.reply(service)
    def handle(body: Any) -> Any:
        served.set()
        return body

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with node, zf.Node(name("caller")) as caller:
        # Stop only once the loop has served a request, so stop() lands while run() polls.
        def call_then_stop() -> None:
            try:
                caller.request(service, 1, timeout=SLOW)
            finally:
                node.stop()

        stopper = threading.Thread(target=call_then_stop)
        start = time.monotonic()
        stopper.start()
        node.run(timeout=SLOW)
        elapsed = time.monotonic() - start
        stopper.join(SLOW)
        assert served.is_set()
        assert elapsed < SLOW / 2, f"run() returned {elapsed:.2f} s after start, not on stop()"
        # run() restored the signal handlers it installed, and the node can serve again.
        assert {s: signal.getsignal(s) for s in before} == before
        start = time.monotonic()
        node.run(timeout=0.2)
        assert 0.15 <= time.monotonic() - start < 3.0


def test_run_returns_on_timeout(name) -> None:
    with zf.Node(name("timed")) as node:
        start = time.monotonic()
        node.run(timeout=0.3)
        elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 3.0, elapsed


def test_stop_before_run_makes_run_return_at_once(name) -> None:
    with zf.Node(name("early")) as node:
        node.stop()
        start = time.monotonic()
        node.run(timeout=SLOW)
        assert time.monotonic() - start < 1.0


def test_serve_in_background_then_close_joins(name) -> None:
    service = name("svc")
    node = zf.Node(name("bg"))
    node.reply(service)(lambda body: body + 1)
    node.start()
    try:
        thread = node.serve_in_background()
        assert thread.is_alive() and thread.name.startswith("zmqfabric")
        with pytest.raises(RuntimeError):
            node.run(timeout=0.1)  # already serving
        with zf.Node(name("caller")) as caller:
            assert caller.request(service, 41, timeout=SLOW) == 42
    finally:
        start = time.monotonic()
        node.close()
    assert time.monotonic() - start < 3.0
    assert not thread.is_alive()


def test_close_from_another_thread_ends_run(name) -> None:
    node = zf.Node(name("closer")).start()
    closer = threading.Timer(0.1, node.close)
    start = time.monotonic()
    closer.start()
    try:
        node.run(timeout=SLOW)
    finally:
        closer.join(SLOW)
    assert time.monotonic() - start < SLOW / 2
    assert node.state.value == "closed"


# --- signals, in real processes --------------------------------------------------------------

PRELUDE = """\
import asyncio, json, os, signal, sys, threading, time
import zmqfabric as zf
import zmqfabric.aio

def report(**fields):
    print(json.dumps(fields), flush=True)
"""

#: A node that serves SVC in run() and reports when run() returned and when it closed.
SYNC_RUNNER = """
node = zf.Node(NAME)

@node.reply(SVC)
def handle(body):
    if body == "signal-from-another-thread":
        # Deliver SIGTERM to a helper thread while the main thread waits in its poll: the
        # C-level handler runs there and only sets a flag for the main thread.
        def fire():
            report(event="signalled", t=time.monotonic())
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        threading.Timer(0.1, fire).start()
    return os.getpid()

with node:
    print("READY", flush=True)
    node.run()
    report(event="run_returned", t=time.monotonic())
report(event="closed", t=time.monotonic(), threads=[t.name for t in threading.enumerate()])
"""

AIO_RUNNER = """
async def main():
    node = zmqfabric.aio.Node(NAME)

    @node.reply(SVC)
    async def handle(body):
        return os.getpid()

    async with node:
        print("READY", flush=True)
        await node.run()
        report(event="run_returned", t=time.monotonic())
    report(event="closed", t=time.monotonic(), threads=[t.name for t in threading.enumerate()])

asyncio.run(main())
"""


def start_runner(procs: ProcessGroup, code: str, name: str, service: str) -> Child:
    head = f"NAME = {name!r}\nSVC = {service!r}\n"
    return procs.python(PRELUDE + head + textwrap.dedent(code), timeout=SLOW)


def expect_event(child: Child, event: str) -> dict[str, Any]:
    deadline = time.monotonic() + SLOW
    while True:
        line = child.json_line(max(0.01, deadline - time.monotonic()))
        if line.get("event") == event:
            return line


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["sync", "aio"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_run_and_exits_zero(procs, make_node, name, flavour, signum) -> None:
    service = name("svc")
    child = start_runner(procs, SYNC_RUNNER if flavour == "sync" else AIO_RUNNER,
                         name(f"runner-{flavour}"), service)
    caller = make_node("caller")
    # The reply comes from inside run(): its signal handlers are in place.
    assert caller.request(service, None, timeout=SLOW) == child.proc.pid

    sent = time.monotonic()
    child.signal(signum)
    returned = expect_event(child, "run_returned")["t"] - sent
    closed = expect_event(child, "closed")
    code = child.wait(SLOW)
    exited = time.monotonic() - sent

    assert code == 0, f"exit code {code}; stderr:\n{child.err_tail()}"
    assert returned < 3.0, f"run() returned {returned:.2f} s after {signum.name}"
    assert exited < 5.0, f"process exited {exited:.2f} s after {signum.name}"
    assert [t for t in closed["threads"] if t.startswith("zmqfabric")] == []
    print(f"\n[figure] {flavour} {signum.name}: run() returned after {returned * 1000:.1f} ms, "
          f"exit after {exited * 1000:.0f} ms")


@pytest.mark.slow
def test_signal_taken_by_another_thread_stops_run_promptly(procs, make_node, name) -> None:
    """The kernel delivers a process signal to any thread that does not block it; under load,
    about a third of SIGTERMs to a node in run() land on zeroconf's or the control thread. Only a
    wake-up fd makes run() notice at once (regression test: it used to wait out its 1 s poll)."""
    service = name("svc")
    child = start_runner(procs, SYNC_RUNNER, name("runner"), service)
    caller = make_node("caller")
    assert caller.request(service, "signal-from-another-thread", timeout=SLOW) == child.proc.pid

    signalled = expect_event(child, "signalled")["t"]
    returned = expect_event(child, "run_returned")["t"] - signalled
    assert child.wait(SLOW) == 0, child.err_tail()
    assert returned < 0.3, f"run() returned {returned * 1000:.0f} ms after the signal"
