"""A bound on what each peer of an XPUB socket may send upstream.

Upstream of a publisher (or a forwarder's front end) come subscriptions, and libzmq keeps every
one in a trie, one node (about 48 bytes) per byte, added in whatever thread next touches the
socket, before the application sees anything: 20,000 distinct 1 KB subscriptions from one hostile
connection cost 700-950 MiB. No socket option bounds that, and an XPUB does not say which
connection sent what. So the node watches the TCP connections its XPUB sockets accept (a socket
monitor gives each one's file descriptor) and the bytes each has received (``TCP_INFO``): a
connection that sent more than MAX_UPSTREAM_BYTES (plus a heartbeat allowance per second) is cut;
libzmq then frees its subscriptions. Legitimate subscribers send a few subscriptions and
heartbeats. A peer address cut this way has its new connections cut at once for
UPSTREAM_PENALTY_S (a raw XSUB reconnects and sends all its subscriptions again).

The count is read when data arrives (an edge-triggered epoll on libzmq's descriptors wakes the
watch), not on a timer: a flood grows the trie at hundreds of MB/s, and a watch waiting for its
next tick let one connection cost 100-200 MiB on a loaded machine. Cutting is a filter that drops
every packet the connection receives, then ``shutdown(SHUT_RD)`` (see :func:`_shutdown`).

Frames bigger than a subscription never get this far: the XPUB's MAXMSGSIZE refuses them.
:class:`UpstreamWatch` owns a thread and the monitors' PAIR sockets; :meth:`UpstreamWatch.add` is
called by the XPUB's owner thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..constants import (
    MAX_UPSTREAM_BYTES,
    THREAD_JOIN_TIMEOUT_S,
    UPSTREAM_ALLOWANCE_PER_S,
    UPSTREAM_CHECK_FAST_MS,
    UPSTREAM_CHECK_MS,
    UPSTREAM_PENALTY_S,
)
from .inbox import Inbox

log = logging.getLogger(__name__)

_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
           | zmq.EVENT_MONITOR_STOPPED)
#: ``struct tcp_info``'s tcpi_bytes_received (Linux 4.1+): a u64 at offset 128.
_BYTES_RECEIVED = struct.Struct("=Q")
_TCP_INFO_SIZE = 136
#: A connection that received this much since the last check makes checks frequent.
_HOT_BYTES = 4096
#: Peer addresses remembered as flooders (bounded).
_MAX_PENALTIES = 1024
#: A classic BPF socket filter of one instruction, ``ret #0``: drop the packet.
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_DROP_INSN = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, 0), 8)
#: ``struct sock_fprog``: the instruction count and a pointer to the instructions.
_DROP_ALL = struct.pack("@HP", 1, ctypes.addressof(_DROP_INSN))


@dataclass(slots=True)
class _Conn:
    inode: int
    since: float
    seen: int = 0
    peer: str = ""


@dataclass(slots=True)
class _Guarded:
    monitor: zmq.Socket
    budget: int
    conns: dict[int, _Conn] = field(default_factory=dict)


class UpstreamWatch:
    """Allocates only; the thread starts with the first :meth:`add` and stops in :meth:`stop`
    (idempotent; before the context terminates). ``on_refusal()`` is called in the thread for
    each connection shut down."""

    def __init__(self, on_refusal: Callable[[], None], clock: Callable[[], float]) -> None:
        self._on_refusal = on_refusal
        self._clock = clock
        self._inbox = Inbox()
        self._guarded: dict[zmq.Socket, _Guarded] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._fresh = False
        #: Peer addresses cut for a flood, until when their new connections are cut at once.
        self._penalty: dict[str, float] = {}
        #: Wakes the thread when data arrives on a watched connection (made by the thread).
        self._arrivals: select.epoll | None = None
        self._by_fd: dict[int, _Guarded] = {}

    def add(self, monitor: zmq.Socket, budget: int = MAX_UPSTREAM_BYTES) -> None:
        """Watch the connections of the XPUB that ``monitor`` (a connected PAIR receiving its
        ACCEPTED/DISCONNECTED/CLOSED events) reports on. Thread-safe."""
        with self._lock:
            if self._stopping:
                monitor.close(0)
                return
            if self._thread is None:
                self._inbox.open()
                self._thread = threading.Thread(target=self._run, name="zmqfabric-upstream")
                self._thread.start()
        self._inbox.post(self._add, monitor, budget)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._inbox.wake()
        thread.join(THREAD_JOIN_TIMEOUT_S)
        if not thread.is_alive():
            self._inbox.close()

    # --- the thread ------------------------------------------------------------------------------

    def _add(self, monitor: zmq.Socket, budget: int) -> None:
        self._guarded[monitor] = _Guarded(monitor, budget)
        self._poller.register(monitor, zmq.POLLIN)

    def _run(self) -> None:
        self._poller = poller = zmq.Poller()
        poller.register(self._inbox.fd, zmq.POLLIN)
        self._arrivals = arrivals = select.epoll()
        poller.register(arrivals.fileno(), zmq.POLLIN)
        hot = False
        try:
            while not self._stopping:
                busy = any(g.conns for g in self._guarded.values())
                timeout = (UPSTREAM_CHECK_FAST_MS if hot else UPSTREAM_CHECK_MS) if busy else None
                events = self._inbox.poll(poller, timeout)
                self._inbox.run_pending()
                self._fresh = False
                arrived = False
                for sock in events:
                    guarded = self._guarded.get(sock) if isinstance(sock, zmq.Socket) else None
                    if guarded is not None:
                        self._on_events(guarded)
                    elif sock == arrivals.fileno():
                        arrived = True
                if arrived:
                    hot = self._check_arrivals(arrivals)
                if not events or self._fresh:  # the periodic check: allowances, quiet newcomers
                    hot = self._check() or self._fresh
        except Exception:  # a bug here must not take the node down
            log.exception("error in the upstream watch thread")
        finally:
            for guarded in list(self._guarded.values()):
                guarded.monitor.close(0)
            self._guarded.clear()
            self._by_fd.clear()
            arrivals.close()

    def _check_arrivals(self, arrivals: select.epoll) -> bool:
        """Check the connections data arrived on; True if one received much."""
        now, hot = self._clock(), False
        for fd, _ in arrivals.poll(0):
            guarded = self._by_fd.get(fd)
            conn = guarded.conns.get(fd) if guarded is not None else None
            if guarded is None or conn is None:
                self._forget(fd)
                continue
            hot = self._check_conn(guarded, fd, conn, now) or hot
        return hot

    def _watch_arrivals(self, guarded: _Guarded, fd: int) -> None:
        assert self._arrivals is not None
        try:
            self._arrivals.register(fd, select.EPOLLIN | select.EPOLLET)
        except (OSError, ValueError):  # closed meanwhile, or already registered
            pass
        self._by_fd[fd] = guarded

    def _forget(self, fd: int) -> None:
        """Stop watching ``fd`` (closing it already removed it from the epoll, if it was)."""
        self._by_fd.pop(fd, None)
        if self._arrivals is not None:
            try:
                self._arrivals.unregister(fd)
            except (OSError, ValueError):
                pass

    def _on_events(self, guarded: _Guarded) -> None:
        while True:
            try:
                event = recv_monitor_message(guarded.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, fd = event["event"], event["value"]
            if kind == zmq.EVENT_ACCEPTED:
                try:
                    conn = _Conn(os.fstat(fd).st_ino, self._clock(), peer=_peer(fd))
                except OSError:
                    continue
                if self._penalty.get(conn.peer, 0.0) > conn.since:
                    _shutdown(fd, conn.inode)  # it flooded a moment ago: not again at once
                    continue
                guarded.conns[fd] = conn
                self._watch_arrivals(guarded, fd)
                self._fresh = True  # a newcomer is checked at once
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                if guarded.conns.pop(fd, None) is not None:
                    self._forget(fd)
            elif kind == zmq.EVENT_MONITOR_STOPPED:  # the XPUB closed
                self._poller.unregister(guarded.monitor)
                guarded.monitor.close(0)
                del self._guarded[guarded.monitor]
                return

    def _check(self) -> bool:
        """Shut down the connections over budget; True if one received much since last time."""
        now, hot = self._clock(), False
        for guarded in self._guarded.values():
            for fd, conn in list(guarded.conns.items()):
                hot = self._check_conn(guarded, fd, conn, now) or hot
        return hot

    def _check_conn(self, guarded: _Guarded, fd: int, conn: _Conn, now: float) -> bool:
        """Shut ``conn`` down if over budget; True if it received much since last time."""
        received = _bytes_received(fd, conn.inode)
        if received is None:  # gone (its close event is on its way)
            del guarded.conns[fd]
            self._forget(fd)
            return False
        hot = received - conn.seen > _HOT_BYTES
        conn.seen = received
        allowed = guarded.budget + (now - conn.since) * UPSTREAM_ALLOWANCE_PER_S
        if received <= allowed:
            return hot
        del guarded.conns[fd]
        self._forget(fd)
        _shutdown(fd, conn.inode)
        self._penalty[conn.peer] = now + UPSTREAM_PENALTY_S
        while len(self._penalty) > _MAX_PENALTIES:
            del self._penalty[next(iter(self._penalty))]
        self._on_refusal()
        log.warning("disconnected a subscriber that sent %d bytes upstream of a publisher (at "
                    "most %d): a subscription flood?", received, guarded.budget)
        return False


def _bytes_received(fd: int, inode: int) -> int | None:
    """Bytes the connection on ``fd`` received, or None if ``fd`` is no longer that socket."""
    try:
        if os.fstat(fd).st_ino != inode:
            return None
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor is libzmq's: never close it here
    if len(info) < _TCP_INFO_SIZE:
        return None
    return int(_BYTES_RECEIVED.unpack_from(info, 128)[0])


def _peer(fd: int) -> str:
    """The peer address of the connection on ``fd`` ("" if unknown)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return ""
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return ""
    finally:
        sock.detach()


def _shutdown(fd: int, inode: int) -> None:
    """End the connection on ``fd`` (libzmq sees it close and drops its subscriptions)."""
    try:
        if os.fstat(fd).st_ino != inode:
            return
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        # Linux goes on queueing what arrives after SHUT_RD, and libzmq reads end-of-file only
        # once the queue is empty, which a flood never lets happen: first a filter that drops
        # every packet the connection receives, so the queue drains.
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, _DROP_ALL)
    except OSError:
        pass
    try:
        # The reading side only: libzmq reads end-of-file and closes the connection itself.
        # (SHUT_RDWR makes its writes fail first, and libzmq 4.3.5 then aborts on
        # "!_io_error" in stream_engine_base.cpp when the read side reports.)
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    finally:
        sock.detach()


def watched_events() -> int:
    """The monitor events :meth:`UpstreamWatch.add` needs."""
    return _EVENTS
