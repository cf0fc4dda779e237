"""Outgoing liveness traffic: connections to peers' control endpoints, few and mostly short-lived.

A node keeps no connection per peer. It keeps a DEALER to the control endpoints of the few
members it probes in turn (:meth:`Prober.watch`), opens one to any other peer when it has
something to ask or tell it (an indirect probe, gossip, a verification), and closes that once it
has been idle for PROBE_IDLE_S; at most MAX_PROBE_SOCKETS are open at once. Requests use the
control endpoint's request/reply format; the peer's control thread answers them.

Watched connections have a monitor (and, on a secured node, every connection). When a watched
one drops (the peer's process died and the kernel closed its socket), ``on_lost(url)`` is called
at once, without waiting for the peer's turn to be probed. They send no ZeroMQ heartbeats: the
probes are the heartbeats (a silent peer is found when its turn comes), and heartbeats would wake
every node's IO thread several times a second.
On a secured node every connection is a CURVE client of the peer's key: a peer that refuses our
key in the handshake is reported (:data:`REFUSED`) instead of looking dead.

:meth:`Prober.check_port` asks the peer's host kernel whether anything still listens at its
control port (a plain TCP connect, closed at once): "refused" means the process is gone for
certain, which a missed probe alone cannot tell from a busy process or a broken path.

Housekeeping thread only (:mod:`.housekeeping`), which polls the sockets this registers.
"""

from __future__ import annotations

import errno
import itertools
import logging
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..constants import (
    LATE_ANSWER_S,
    MAX_PROBE_SOCKETS,
    MAX_QUEUED_CHECKS,
    MAX_VERIFYING,
    PORT_CHECK_S,
    PROBE_IDLE_S,
)
from ..core import wire
from ..core.timers import RoundTrip
from ..errors import FabricError, RemoteProtocolError
from ..transport.frames import NOBLOCK, recv_frames, send_frames

if TYPE_CHECKING:
    from .local import LocalNode

log = logging.getLogger(__name__)

#: Passed to a request's callback when the peer refused our CURVE key.
REFUSED: Any = object()
Callback = Callable[[Any], object]
#: ``on_result(closed)``: True if nothing listens (refused), False if something accepted, None
#: if the host did not say within PORT_CHECK_S.
PortCallback = Callable[["bool | None"], None]
_LOST = zmq.EVENT_DISCONNECTED
_AUTH = zmq.EVENT_HANDSHAKE_FAILED_AUTH


@dataclass(slots=True)
class _Conn:
    url: str
    sock: zmq.Socket
    monitor: zmq.Socket | None  # see _open
    used: float
    watched: bool = False
    waiting: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Request:
    conn: _Conn
    on_answer: Callback
    on_timeout: Callable[[], None] | None
    sent: float
    deadline: float


class Prober:
    """The outgoing connections of the housekeeping thread. Not thread-safe.

    ``on_lost(url)`` is called when a watched connection drops, ``on_refused(url)`` when a peer
    refuses our key. :attr:`rtt` times every answer."""

    def __init__(
        self,
        node: LocalNode,
        poller: zmq.Poller,
        on_lost: Callable[[str], None],
        on_refused: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._node = node
        self._poller = poller
        self._on_lost = on_lost
        self._on_refused = on_refused
        self._clock = clock
        self.rtt = RoundTrip()
        self._conns: dict[str, _Conn] = {}
        self._by_sock: dict[zmq.Socket, _Conn] = {}
        self._requests: dict[int, _Request] = {}
        #: Requests that timed out, whose late answers still count (LATE_ANSWER_S).
        self._late: dict[int, _Request] = {}
        #: Port checks under way: fd -> (socket, callback, deadline).
        self._checks: dict[int, tuple[socket.socket, PortCallback, float]] = {}
        #: Port checks waiting for one of those MAX_PROBE_SOCKETS to end: (url, callback,
        #: deadline), oldest first.
        self._queued: deque[tuple[str, PortCallback, float]] = deque()
        self._ids = itertools.count(random.randrange(1, 2**31))

    def __len__(self) -> int:
        return len(self._requests)

    def watch(self, peers: dict[str, str | None]) -> None:
        """Keep connections to ``peers`` (control URL -> CURVE key) open and watched; the other
        connections close once idle."""
        for conn in self._conns.values():
            conn.watched = conn.url in peers
        for url, key in peers.items():
            opened = self._conns.get(url) or self._open(url, key, watched=True)
            if opened is not None:
                opened.watched = True
                if opened.monitor is None:  # opened for a request: watch its drops from now
                    opened.monitor = self._monitor(opened.sock)
                    self._by_sock[opened.monitor] = opened

    def request(self, url: str, key: str | None, body: dict[str, Any], timeout: float,
                on_answer: Callback, on_timeout: Callable[[], None] | None = None) -> bool:
        """Send ``body`` as a request to the control endpoint at ``url``. ``on_answer`` gets
        the answer's body (an error reply's too) or REFUSED; ``on_timeout`` runs if none came
        within ``timeout`` s, and an answer that still comes within LATE_ANSWER_S goes to
        ``on_answer`` then. False if it could not be sent now."""
        conn = self._conn(url, key)
        if conn is None:
            return False
        msg_id = next(self._ids) & 0xFFFFFFFF or 1
        if not self._send(conn, msg_id, body):
            return False
        now = self._clock()
        conn.waiting.add(msg_id)
        self._requests[msg_id] = _Request(conn, on_answer, on_timeout, now, now + timeout)
        return True

    def send(self, url: str, key: str | None, body: dict[str, Any]) -> bool:
        """Send ``body`` one-way (no answer expected). False if it could not be sent now."""
        conn = self._conn(url, key)
        return conn is not None and self._send(conn, 0, body)

    def expire(self, now: float) -> None:
        """Time out the requests and port checks that are due (their callbacks run)."""
        for msg_id in [i for i, r in self._requests.items() if r.deadline <= now]:
            request = self._requests.pop(msg_id)
            request.conn.waiting.discard(msg_id)
            if len(self._late) >= 4 * MAX_VERIFYING:
                self._late.pop(next(iter(self._late)))
            self._late[msg_id] = request
            if request.on_timeout is not None:
                request.on_timeout()
        for msg_id in [i for i, r in self._late.items() if now - r.deadline > LATE_ANSWER_S]:
            del self._late[msg_id]
        for fd in [fd for fd, c in self._checks.items() if c[2] <= now]:
            self._end_check(fd, None)
        while self._queued and self._queued[0][2] <= now:
            self._queued.popleft()[1](None)

    def next_deadline(self) -> float | None:
        """When :meth:`expire` or :meth:`close_idle` has work next."""
        times = [r.deadline for r in self._requests.values()]
        times += [c[2] for c in self._checks.values()]
        if self._queued:
            times.append(self._queued[0][2])
        idle = [c.used for c in self._conns.values() if not (c.waiting or c.watched)]
        if idle:
            times.append(min(idle) + PROBE_IDLE_S)
        return min(times, default=None)

    def check_port(self, url: str, on_result: PortCallback) -> None:
        """Whether anything listens at ``url`` (tcp://IPv4:port): see :data:`PortCallback`.
        When MAX_PROBE_SOCKETS checks are under way, this one waits for a free socket (within
        its PORT_CHECK_S): a death storm asks for many at once, and a check skipped left a
        killed node in the table until anti-entropy. Beyond MAX_QUEUED_CHECKS waiting, the
        answer is None at once (counted: ``port_checks_dropped``)."""
        if len(self._checks) < MAX_PROBE_SOCKETS:
            self._start_check(url, on_result, self._clock() + PORT_CHECK_S)
        elif len(self._queued) < MAX_QUEUED_CHECKS:
            self._queued.append((url, on_result, self._clock() + PORT_CHECK_S))
        else:
            self._node.counters.add("port_checks_dropped")
            on_result(None)

    def _start_check(self, url: str, on_result: PortCallback, deadline: float) -> None:
        host, _, port = url[len("tcp://"):].rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex((host, int(port)))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            self._checks[sock.fileno()] = (sock, on_result, deadline)
            self._poller.register(sock.fileno(), zmq.POLLOUT)
            return
        sock.close()
        on_result(_closed(err))

    def on_readable(self, sock: zmq.Socket | int) -> bool:
        """Read answers (or monitor events) from ``sock``; False if it is not ours."""
        if isinstance(sock, int):
            if sock not in self._checks:
                return False
            err = self._checks[sock][0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._end_check(sock, _closed(err))
            return True
        conn = self._by_sock.get(sock)
        if conn is None:
            return False
        if sock is conn.monitor:
            self._on_monitor(conn)
            return True
        while self._conns.get(conn.url) is conn:  # a callback may have closed it
            try:
                frames = recv_frames(sock, NOBLOCK)  # C-level receives, bounded in all
            except zmq.Again:
                break
            try:
                header, body = wire.parse_reply(frames)
            except RemoteProtocolError as exc:
                self._node.counters.add("refused_probe_answers")
                log.debug("bad answer from %s: %s", conn.url, exc)
                continue
            conn.used = self._clock()
            request = self._requests.pop(header.msg_id, None) or self._late.pop(header.msg_id,
                                                                                 None)
            if request is not None and request.conn is conn:
                conn.waiting.discard(header.msg_id)
                self.rtt.sample(conn.used - request.sent)
                request.on_answer(body)
        return True

    def close_idle(self, now: float) -> None:
        for conn in [c for c in self._conns.values()
                     if not (c.waiting or c.watched) and now - c.used >= PROBE_IDLE_S]:
            self._close(conn)

    def close(self, linger_ms: int = 0) -> None:
        """Close every connection; ``linger_ms`` lets queued one-way messages leave."""
        for conn in list(self._conns.values()):
            self._close(conn, linger_ms)
        for fd in list(self._checks):
            self._poller.unregister(fd)
            self._checks.pop(fd)[0].close()
        self._queued.clear()

    def _end_check(self, fd: int, closed: bool | None) -> None:
        sock, callback, _ = self._checks.pop(fd)
        self._poller.unregister(fd)
        sock.close()
        callback(closed)
        while self._queued and len(self._checks) < MAX_PROBE_SOCKETS:
            self._start_check(*self._queued.popleft())

    # --- internals -----------------------------------------------------------------------------

    def _conn(self, url: str, key: str | None) -> _Conn | None:
        conn = self._conns.get(url)
        if conn is not None:
            conn.used = self._clock()
            return conn
        if len(self._conns) >= MAX_PROBE_SOCKETS:
            idle = [c for c in self._conns.values() if not (c.waiting or c.watched)]
            if not idle:
                self._node.counters.add("probes_throttled")
                return None
            self._close(min(idle, key=lambda c: c.used))
        return self._open(url, key)

    def _open(self, url: str, key: str | None, watched: bool = False) -> _Conn | None:
        """A connection to ``url``, monitored if it is ``watched`` (its drops are news) or
        CURVE (a refused key is news): a short-lived one of an unsecured node has nothing to
        report, and each socket polled costs every wake of the thread (a death storm opens a
        dozen)."""
        sockets = self._node.sockets
        sock = sockets.socket(zmq.DEALER, sync=True)
        sock.setsockopt(zmq.IMMEDIATE, 0)  # queue the first message while connecting
        sock.setsockopt(zmq.HEARTBEAT_IVL, 0)
        monitor = self._monitor(sock) if watched or key is not None else None
        try:
            sockets.connect(sock, url, key)
        except FabricError as exc:
            log.debug("cannot connect to %s: %s", url, exc)
            if monitor is not None:
                self._poller.unregister(monitor)
                sock.disable_monitor()
                monitor.close(0)
            sock.close(0)
            return None
        conn = _Conn(url, sock, monitor, self._clock())
        self._conns[url] = conn
        self._by_sock[sock] = conn
        if monitor is not None:
            self._by_sock[monitor] = conn
        self._poller.register(sock, zmq.POLLIN)
        return conn

    def _monitor(self, sock: zmq.Socket) -> zmq.Socket:
        """A monitor of ``sock``'s drops and refused handshakes, polled (mapped to its
        connection by the caller, through ``_by_sock``)."""
        monitor = self._node.sockets.monitor(sock, _LOST | _AUTH, sync=True)
        self._poller.register(monitor, zmq.POLLIN)
        return monitor

    def _send(self, conn: _Conn, msg_id: int, body: dict[str, Any]) -> bool:
        header = wire.pack_header(wire.Kind.REQUEST, msg_id, time.time())
        try:
            send_frames(conn.sock, [b"", header, wire.pack_body(body)], NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("cannot send to %s: %s", conn.url, exc)
            return False
        return True

    def _on_monitor(self, conn: _Conn) -> None:
        seen, monitor = 0, conn.monitor
        while monitor is not None:
            try:
                seen |= recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
        if seen & _AUTH:
            # ZeroMQ does not retry after a refusal: nothing will ever come back on it.
            waiting = [self._requests.pop(i) for i in conn.waiting if i in self._requests]
            self._close(conn)
            for request in waiting:
                request.on_answer(REFUSED)
            self._on_refused(conn.url)
        elif seen & _LOST and conn.watched:
            self._on_lost(conn.url)

    def _close(self, conn: _Conn, linger_ms: int = 0) -> None:
        self._conns.pop(conn.url, None)
        self._by_sock.pop(conn.sock, None)
        self._poller.unregister(conn.sock)
        for msg_id in conn.waiting:
            request = self._requests.pop(msg_id, None)
            if request is not None:  # it can get no answer any more: it times out now
                request.deadline = self._clock()
                self._requests[msg_id] = request
        conn.waiting.clear()
        for msg_id in [i for i, late in self._late.items() if late.conn is conn]:
            del self._late[msg_id]
        if conn.monitor is not None:
            self._by_sock.pop(conn.monitor, None)
            self._poller.unregister(conn.monitor)
            conn.sock.disable_monitor()
            conn.monitor.close(0)
        conn.sock.close(linger_ms)


def _closed(err: int) -> bool | None:
    """A TCP connect's outcome: refused (True), accepted (False), or unknown (None)."""
    if err == errno.ECONNREFUSED:
        return True
    return False if err == 0 else None
