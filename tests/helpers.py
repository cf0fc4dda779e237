"""Plain helpers shared by the test modules (fixtures live in ``conftest.py``).

- :func:`unique` names nodes and endpoints so that concurrent test runs never meet.
- :func:`wait_until` polls a condition that has no event to wait on, always with a deadline.
- Raw pyzmq, built from the spec and not with the fabric: :class:`RawSockets` (one context,
  linger 0, everything closed and the context terminated at the end; the ``raw`` fixture),
  :func:`port_of`, :func:`wait_for_event` on a socket monitor, and :func:`advertise_raw`, which
  enters a raw socket in a node's directory as if discovery had found it.
- Hand-made discovery records: :func:`loopback_zeroconf` (python-zeroconf pinned to 127.0.0.1,
  the only way tests may use mDNS) and :func:`forged_service_info`.

Child programs (``tests.procs``, the raw programs of ``test_interop``) cannot import this module:
they run without pytest, and the raw ones without the fabric.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import time
import uuid
from typing import Callable, Container, TypeVar

import pytest
import zmq
from zeroconf import IPVersion, ServiceInfo, Zeroconf
from zmq.utils.monitor import recv_monitor_message

import zmqfabric as zf
from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord

T = TypeVar("T")

#: The DNS-SD service type, written out as the records spec gives it (not taken from the fabric).
SERVICE_TYPE = "_zmqfabric._tcp.local."
#: How often :func:`wait_until` looks again (s): often enough to add little latency, rarely
#: enough that a check which asks another process does not load the 2 shared cores.
POLL_INTERVAL_S = 0.02

_counter = itertools.count()


def unique(prefix: str) -> str:
    """A node/endpoint name no other test (or concurrent test run) uses."""
    return f"{prefix}-{os.getpid() % 10000}-{next(_counter)}-{uuid.uuid4().hex[:4]}"


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str = "",
    *,
    interval: float = POLL_INTERVAL_S,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something truthy, and return that.

    For conditions with no event to wait on (a counter, a child's state, a file). Fails the test
    after ``timeout`` s, naming ``what`` it waited for and, if given, ``detail()`` (computed only
    then). Exceptions from ``predicate`` propagate."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            more = f"; {detail()}" if detail is not None else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}{more}")
        time.sleep(interval)


# --- raw pyzmq ----------------------------------------------------------------------------------


class RawSockets:
    """Plain pyzmq sockets in a context of their own: ``raw(kind, connect=url | bind=True)``.

    Every socket has linger 0. :meth:`close` stops the monitors, closes every socket (the ones
    already closed too) and terminates the context, so a test never leaves one behind. Not
    thread-safe, like the sockets."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self._monitored: list[zmq.Socket] = []

    def __call__(self, kind: int, *, connect: str | None = None, bind: bool = False) -> zmq.Socket:
        """A socket of type ``kind``; ``bind``: on a free port of 127.0.0.1 (see
        :func:`port_of`); ``connect``: to that URL."""
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self._sockets.append(sock)
        if bind:
            sock.bind("tcp://127.0.0.1:0")
        if connect:
            sock.connect(connect)
        return sock

    def monitor(self, sock: zmq.Socket, events: int = zmq.EVENT_ALL) -> zmq.Socket:
        """The PAIR socket that receives ``sock``'s ``events`` (read with :func:`wait_for_event`).
        Make it before connecting or binding ``sock`` to see every event."""
        pair = sock.get_monitor_socket(events)
        pair.setsockopt(zmq.LINGER, 0)
        self._monitored.append(sock)
        self._sockets.append(pair)
        return pair

    def close(self) -> None:
        """Idempotent."""
        for sock in self._monitored:
            if not sock.closed:
                sock.disable_monitor()
        for sock in reversed(self._sockets):
            sock.close(0)
        self._monitored.clear()
        self._sockets.clear()
        if not self.context.closed:
            self.context.term()

    def __enter__(self) -> RawSockets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def port_of(sock: zmq.Socket) -> int:
    """The TCP port a socket bound with ``raw(..., bind=True)`` listens on."""
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    return int(endpoint.decode().rsplit(":", 1)[1])


def wait_for_event(monitor: zmq.Socket, until: Container[int], timeout: float,
                   what: str = "") -> list[int]:
    """Read events from ``monitor`` until one in ``until`` arrives; return every event read, in
    order (the last one is in ``until``). Fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    events: list[int] = []
    while not events or events[-1] not in until:
        left = deadline - time.monotonic()
        if left <= 0 or not monitor.poll(int(left * 1000)):
            pytest.fail(f"timed out after {timeout} s waiting for {what or until}; "
                        f"events so far: {events}")
        events.append(recv_monitor_message(monitor)["event"])
    return events


def advertise_raw(node: zf.Node, kind: EndpointKind, name: str, sock: zmq.Socket,
                  prefix: str) -> NodeRecord:
    """Enter a raw socket bound with ``raw(..., bind=True)`` in ``node``'s directory as the
    ``kind`` endpoint ``name`` of a node called ``<prefix>-...``, as discovery would."""
    record = NodeRecord(unique(prefix), secrets.token_hex(8), "raw-host", os.getpid(),
                        "127.0.0.1", (Endpoint(kind, name, port_of(sock)),), 1)
    node.directory.put(record)
    return record


# --- hand-made discovery records -----------------------------------------------------------------


def loopback_zeroconf() -> Zeroconf:
    """python-zeroconf pinned to 127.0.0.1, IPv4 only: mDNS leaves by ``lo`` and nowhere else.
    The caller closes it (which also says goodbye to what it registered)."""
    return Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)


def forged_service_info(instance: str, node_id: str, txt: dict[str, str], port: int,
                        address: str = "127.0.0.1") -> ServiceInfo:
    """A discovery record made by hand: DNS-SD ``instance`` (``<name>@<node id>.<type>`` when
    well-formed), SRV ``port``, TXT ``txt`` and an A record ``address``. The address is only
    advertised: loopback zeroconf never sends anything to it. Short TTLs, like the fabric's."""
    return ServiceInfo(
        SERVICE_TYPE,
        instance,
        port=port,
        properties=txt,
        server=f"zf-{node_id}.local.",
        addresses=[socket.inet_aton(address)],
        host_ttl=15,
        other_ttl=15,
    )
