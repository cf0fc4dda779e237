"""Shared fixtures: nodes (sync and asyncio) that are always closed, raw pyzmq sockets, child
processes that are always reaped, and two leak checks run around every test: no fabric thread
outlives the test, and every ZeroMQ context the test made is terminated by its end. Discovery is
pinned to loopback by the default scope. Plain helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import asyncio
import compileall
import threading
from typing import Any, Callable, Iterator

import pytest
import zmq
import zmq.utils.garbage
from hypothesis import HealthCheck, settings

import zmqfabric as zf
import zmqfabric.aio
from tests.helpers import RawSockets, unique
from tests.procs import ROOT, ProcessGroup

__all__ = ["unique"]  # for the test modules that import it from here

# The machine is small and shared (2 cores): property tests judge correctness, not speed.
settings.register_profile(
    "zmqfabric", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("zmqfabric")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the package and the code child processes run, once, before any test: the suite
    starts hundreds of Python processes (CLI commands, fleets, attackers), and where
    PYTHONDONTWRITEBYTECODE is set (as on our development machines) none of them writes
    bytecode, so each compiled every module it imports again (~0.3 s of CPU a process; the
    CLI's tests took 55 s instead of 41). Up-to-date files are skipped; a tree that cannot be
    written is left as it is."""
    for directory in ("zmqfabric", "devices", "tests", "examples"):
        compileall.compile_dir(ROOT / directory, quiet=2)


#: How long the asyncio node fixture may take to close a node the test left open (s).
AIO_CLOSE_S = 10.0
#: How long a fabric thread may take to end after its test (s).
THREAD_JOIN_S = 5.0


@pytest.fixture
def name() -> Callable[[str], str]:
    return unique


@pytest.fixture
def make_node() -> Iterator[Callable[..., zf.Node]]:
    """``make_node(prefix, **kwargs)``: a started sync node, closed after the test."""
    nodes: list[zf.Node] = []

    def make(prefix: str = "n", **kwargs: object) -> zf.Node:
        node = zf.Node(unique(prefix), **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node.start()

    yield make
    for node in reversed(nodes):
        node.close()


@pytest.fixture
def aio_make_node() -> Iterator[Callable[..., zmqfabric.aio.Node]]:
    """``aio_make_node(prefix, **kwargs)``: an asyncio node with a unique name, not started.

    Start and close it in the test's own event loop (``async with node:``): closing awaits, in
    the loop the node started in, which is gone by teardown. So teardown does not close nodes
    for the test; it fails the test if a node it made was started and left open (after closing
    it from a fresh loop, so the leak does not spill into the next test)."""
    nodes: list[zmqfabric.aio.Node] = []

    def make(prefix: str = "n", **kwargs: Any) -> zmqfabric.aio.Node:
        node = zmqfabric.aio.Node(unique(prefix), **kwargs)
        nodes.append(node)
        return node

    yield make
    left_open = [node for node in nodes if node.state.value not in ("new", "closed")]
    for node in left_open:
        asyncio.run(asyncio.wait_for(node.close(), AIO_CLOSE_S))
    assert not left_open, (
        f"test left asyncio nodes open: {[node.name for node in left_open]} "
        "(close them in the test's loop: async with node)"
    )


@pytest.fixture
def raw() -> Iterator[RawSockets]:
    """``raw(kind, connect=url | bind=True)``: a plain pyzmq socket (linger 0) in a context of
    its own; ``raw.monitor(sock)`` watches one. Everything is closed at teardown."""
    with RawSockets() as sockets:
        yield sockets


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """Child processes with a readiness handshake; all are stopped and reaped at teardown."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.close()


@pytest.fixture(autouse=True)
def no_unterminated_contexts() -> Iterator[None]:
    """Fail a test that leaves a ZeroMQ context it made unterminated (a node not closed, a raw
    context not termed): its sockets and libzmq threads would outlive the test.

    Every context made during the test is recorded (``zmq.Context.__init__`` is wrapped: sync
    and asyncio contexts both pass through it; shadows own nothing and are skipped). A context
    still open at teardown is reported with its open sockets and left to its owner: terminating
    it here could hang on a socket that a leaked thread still uses (pyzmq's own watchdog terms
    each context in a thread it can abandon). The thread check is torn down first, so threads
    have ended before contexts are judged."""
    made: list[zmq.Context[Any]] = []
    init = zmq.Context.__init__

    def recording_init(self: zmq.Context[Any], *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if not getattr(self, "_shadow", False):
            made.append(self)

    zmq.Context.__init__ = recording_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        zmq.Context.__init__ = init  # type: ignore[method-assign]
    # pyzmq's zero-copy send (copy=False) starts a process-wide garbage collector with a
    # context of its own (a PUSH/PULL pair): pyzmq owns it, not the test.
    collector = getattr(zmq.utils.garbage.gc, "_context", None)
    open_contexts = {
        repr(ctx): [repr(s) for s in list(getattr(ctx, "_sockets", ())) if not s.closed]
        for ctx in made
        if not ctx.closed and ctx is not collector
    }
    made.clear()
    assert not open_contexts, f"test left ZeroMQ contexts unterminated: {open_contexts}"


@pytest.fixture(autouse=True)
def no_leaked_threads(no_unterminated_contexts: None) -> Iterator[None]:
    """Fail a test that leaves a fabric thread running. It depends on the context check so that
    it runs after it and is torn down before it: threads end before contexts are judged."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t.ident not in before and t.name.startswith("zmqfabric") and t.is_alive()
    ]
    for t in leaked:
        t.join(THREAD_JOIN_S)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked fabric threads: {still}"
