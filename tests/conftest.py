"""Shared fixtures: nodes that are always closed, raw pyzmq sockets, child processes that are
always reaped, and a check that no test leaks a fabric thread. Discovery is pinned to loopback by
the default scope. Plain helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import threading
from typing import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

import zmqfabric as zf
from tests.helpers import RawSockets, unique
from tests.procs import ProcessGroup

__all__ = ["unique"]  # for the test modules that import it from here

# The machine is small and shared (2 cores): property tests judge correctness, not speed.
settings.register_profile(
    "zmqfabric", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("zmqfabric")

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
def no_leaked_threads() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t.ident not in before and t.name.startswith("zmqfabric") and t.is_alive()
    ]
    for t in leaked:
        t.join(5.0)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked fabric threads: {still}"
