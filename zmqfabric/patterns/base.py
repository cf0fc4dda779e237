"""What every endpoint handle shares: socket ownership, directory changes, bounded waits.

A handle owns one socket and belongs to one thread (sync) or one event loop (asyncio). Discovery
never touches the socket: the directory calls the handle's watcher from zeroconf's thread, which
only queues "connect/disconnect URL" and wakes the owner:

- sync: the handle's :class:`~zmqfabric.transport.inbox.Inbox` (a deque of callables plus a pipe
  whose read end sits in the owner's poller next to the socket); the owner applies queued changes
  before each send/receive (one truthiness test on the hot path);
- asyncio: ``loop.call_soon_threadsafe`` runs the change in the loop that owns the socket.

Sends and receives try the socket without blocking first (the hot path is a plain
``send_multipart``/``recv_multipart``) and only poll, with a deadline, when it would block.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..core.records import VIA_KIND, EndpointKind
from ..errors import ClosedError, FabricError
from ..stats import RateLimitedLog
from ..transport.frames import NOBLOCK, ms_left, recv_frames, send_frames
from ..transport.inbox import Inbox
from ..transport.sockets import sync_view, zmq_error

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

log = logging.getLogger(__name__)
rlog = RateLimitedLog(log)
#: An asyncio handle retries a disconnect that had to wait for queued input this often (s).
DEFER_DISCONNECT_S = 0.05

_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Handle:
    """Base of every endpoint handle: one socket, one owner, closed once."""

    kind: EndpointKind
    noun = "endpoint"

    #: True for handles served by a node-owned thread even on an asyncio node.
    sync_socket = False

    def __init__(self, runtime: NodeRuntime, name: str, socket_type: int) -> None:
        self._rt = runtime
        self.name = name
        self._sock: zmq.Socket = runtime.sockets.socket(socket_type, sync=self.sync_socket)
        self._closed = False
        runtime.track(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the socket. Idempotent. Call from the owning thread (or after it is done)."""
        if self._closed:
            return
        self._closed = True
        self._on_close()
        self._sock.close()
        self._rt.untrack(self)

    def _on_close(self) -> None:
        pass

    def _zmq_error(self, exc: zmq.ZMQError) -> FabricError:
        """The fabric error for a ZMQError on this handle's socket (ClosedError once closed)."""
        return zmq_error(exc, f"{self.noun} {self.name!r}", self._closed)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.noun} {self.name!r} is closed")

    def _refused(self, what: str, exc: Exception) -> None:
        """Count and log (rate-limited) one malformed message from a peer."""
        self._rt.counters.add(f"refused_{what}")
        rlog.warning(what, "%s %r dropped a malformed %s: %s", self.noun, self.name, what, exc)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.name!r} {state}>"


class Bound(Handle):
    """A handle whose socket binds a port of the node's scope and is advertised."""

    #: The port to bind; 0 picks a free one.
    fixed_port = 0
    #: Largest message this endpoint accepts (None: the node's ``max_message_size``). Set before
    #: the bind: the connections a listener accepts take its options as they were then.
    max_message_size: int | None = None

    def __init__(
        self, runtime: NodeRuntime, name: str, socket_type: int, allow: Iterable[str] | None = None
    ) -> None:
        super().__init__(runtime, name, socket_type)
        try:
            if self.max_message_size is not None:
                self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
            domain = runtime.zap_domain(self.kind, name, allow)
            self.port = runtime.sockets.bind(self._sock, self.fixed_port, domain)
        except BaseException:
            self.close()
            raise

    def _advertise(self) -> None:
        self._rt.add_endpoint(self.kind, self.name, self.port)

    def _on_close(self) -> None:
        self._rt.remove_endpoint(self.kind, self.name)


class Connector(Handle):
    """A handle whose socket connects to every provider of (kind, name) the directory knows, or,
    ``via`` a device node, to that device's front end for (kind, name) only."""

    #: A ROUTER that chooses the provider of each message itself (routing id = the URL).
    routed = False

    def __init__(
        self, runtime: NodeRuntime, name: str, socket_type: int, via: str | None = None
    ) -> None:
        super().__init__(runtime, name, socket_type)
        self.via = via
        self._urls: set[str] = set()
        self._unwatch: Callable[[], None] | None = None
        # Connection events tell when a provider is really reachable (wait_ready) and why one
        # is not (a refused CURVE handshake). Made before the first connect so none is missed.
        self._monitor: zmq.Socket = runtime.sockets.monitor(
            self._sock, _MONITOR_EVENTS, sync=self.sync_socket
        )
        self._handshaken: set[str] = set()
        self._refused_by: dict[str, int] = {}

    def _on_monitor_event(self, event: dict[str, Any]) -> None:
        url = event["endpoint"].decode() if isinstance(event["endpoint"], bytes) else event["endpoint"]
        kind = event["event"]
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._handshaken.add(url)
            self._refused_by.pop(url, None)
        elif kind == zmq.EVENT_DISCONNECTED:
            self._handshaken.discard(url)
        else:  # a failed handshake: the peer refused our keys, or spoke garbage
            self._refused_by[url] = kind

    def _read_monitor(self) -> None:
        """Apply the connection events that arrived (never waits; sync or asyncio handles)."""
        monitor = sync_view(self._monitor)
        while True:
            try:
                self._on_monitor_event(recv_monitor_message(monitor, zmq.NOBLOCK))
            except zmq.Again:
                return

    def _all_refused(self) -> list[str]:
        """The provider URLs when every one of them refused our handshake, else []."""
        if self._urls and all(url in self._refused_by for url in self._urls):
            return sorted(self._urls)
        return []

    def _settled(self) -> bool:
        """Every provider's handshake has either succeeded or been refused."""
        return all(u in self._handshaken or u in self._refused_by for u in self._urls)

    def _ready(self, at_least: int = 1) -> bool:
        """Every provider known now has finished its handshake (and there is one at least)."""
        return len(self._urls) >= at_least and self._urls <= self._handshaken

    def _watch(self) -> None:
        self._unwatch = self._rt.directory.watch(*self._watched(), self._post, self.via)

    def _watched(self) -> tuple[EndpointKind, str]:
        return (VIA_KIND[self.kind] if self.via else self.kind), self.name

    def _post(self, op: str, url: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _apply(self, op: str, url: str) -> bool:
        """Connect or disconnect; runs in the owner's thread/loop only. False when a disconnect
        must wait: libzmq aborts the process (assertion ``!_more`` in fq.cpp, libzmq #2163) when
        a pipe with a multipart message still queued is disconnected, so a socket that has input
        waiting keeps the peer until that input has been read."""
        if self._closed:
            return True
        try:
            log.debug("%s %r: %s %s", self.noun, self.name, op, url)
            if op == "connect" and url not in self._urls:
                if self.routed:  # the peer's routing id is its URL: we address it by name
                    self._sock.setsockopt(zmq.CONNECT_ROUTING_ID, url.encode())
                self._rt.connect(self._sock, url)
                self._urls.add(url)
            elif op == "disconnect" and url in self._urls:
                if sync_view(self._sock).get(zmq.EVENTS) & zmq.POLLIN:
                    return False
                self._urls.discard(url)
                self._handshaken.discard(url)
                self._refused_by.pop(url, None)
                self._sock.disconnect(url)
        except (zmq.ZMQError, FabricError) as exc:
            log.warning("%s %r: cannot %s %s: %s", self.noun, self.name, op, url, exc)
        return True

    @property
    def providers(self) -> int:
        """How many providers this handle is connected to (as last applied)."""
        return len(self._urls)

    def _on_close(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        self._sock.disable_monitor()
        self._monitor.close(0)


class SyncConnector(Connector):
    """A connector owned by one thread; waits with a poller on the socket and its inbox.

    Discovery posts directory changes to the handle's :class:`Inbox` and the owner applies them
    before each send/receive (``if self._ops: self._drain()``, one truthiness test on the hot
    path) and whenever a wait is woken. A disconnect that must wait for queued input stays
    queued, so the inbox is made with ``always_wake``: every post writes its pipe, and a wait
    never spins on what is still queued.
    """

    def __init__(
        self, runtime: NodeRuntime, name: str, socket_type: int, via: str | None = None
    ) -> None:
        super().__init__(runtime, name, socket_type, via)
        self._inbox = Inbox(always_wake=True)
        wake = self._inbox.open()
        #: The inbox's queue: truthy while changes wait (the hot path's one test).
        self._ops = self._inbox.pending
        self._poll_in = zmq.Poller()
        self._poll_in.register(self._sock, zmq.POLLIN)
        self._poll_in.register(wake, zmq.POLLIN)
        self._poll_out = zmq.Poller()
        self._poll_out.register(self._sock, zmq.POLLOUT)
        self._poll_out.register(wake, zmq.POLLIN)
        self._watch()
        self._drain()

    def _post(self, op: str, url: str) -> None:
        # zeroconf's thread: queue and wake, never touch the socket.
        self._inbox.post(self._change, op, url)

    def _change(self, op: str, url: str) -> None:
        if not self._apply(op, url):
            # Retried at the next send or receive, once input has been read.
            self._inbox.defer(self._change, op, url)

    def _drain(self) -> None:
        """Apply the directory changes queued so far (owner only)."""
        self._inbox.run_pending()

    def _recv(self, deadline: float | None) -> list[bytes] | None:
        """Receive one multipart message, or None when ``deadline`` (monotonic) passes. Tries the
        socket first (the hot path: one receive per frame, no poll); polls only when it would
        block."""
        if self._ops:
            self._drain()
        try:
            return recv_frames(self._sock, NOBLOCK)
        except zmq.Again:
            return self._wait_recv(deadline)
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc

    def _wait_recv(self, deadline: float | None) -> list[bytes] | None:
        """Poll the socket and the inbox until a message is there, then receive it; None when
        ``deadline`` passes. Directory changes that arrive meanwhile are applied."""
        sock, inbox, poller = self._sock, self._inbox, self._poll_in
        while True:
            timeout = ms_left(deadline)
            if timeout == 0:
                return None
            try:
                events = inbox.poll(poller, timeout)
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc
            if inbox.fd in events:
                self._drain()
            if sock in events:
                try:
                    return recv_frames(sock, NOBLOCK)
                except zmq.Again:
                    continue
                except zmq.ZMQError as exc:
                    raise self._zmq_error(exc) from exc

    def _send(self, frames: list[Any], deadline: float | None, copy: bool = True) -> bool:
        """Send one multipart message; False when it could not go out before ``deadline``.
        ``copy`` applies to the last frame (the body); the others are small and always copied."""
        if self._ops:
            self._drain()
        sock = self._sock
        try:
            send_frames(sock, frames, NOBLOCK, copy)
            return True
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc
        inbox, poller = self._inbox, self._poll_out
        while True:
            timeout = ms_left(deadline)
            if timeout == 0:
                return False
            try:
                events = inbox.poll(poller, timeout)
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc
            if inbox.fd in events:
                self._drain()
            if sock in events:
                try:
                    send_frames(sock, frames, NOBLOCK, copy)
                    return True
                except zmq.Again:
                    continue
                except zmq.ZMQError as exc:
                    raise self._zmq_error(exc) from exc

    def _wait_providers(self, deadline: float | None) -> bool:
        """Wait until at least one provider is connected; False at the deadline."""
        if self._ops:
            self._drain()
        if self._urls:
            return True
        poller = zmq.Poller()
        poller.register(self._inbox.fd, zmq.POLLIN)
        while not self._urls:
            timeout = ms_left(deadline)
            if timeout == 0:
                return False
            if self._inbox.poll(poller, timeout):
                self._drain()
        return True

    def _wait_ready(self, deadline: float | None) -> bool:
        """Wait until every provider known now has completed its connection handshake."""
        return self._wait_monitor(self._ready, deadline)

    def _wait_settled(self, deadline: float | None) -> bool:
        """Wait until every provider's handshake succeeded or was refused (secured nodes)."""
        return self._wait_monitor(self._settled, deadline)

    def _wait_monitor(self, done: Callable[[], bool], deadline: float | None) -> bool:
        poller = zmq.Poller()
        poller.register(self._inbox.fd, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            self._drain()
            self._read_monitor()
            if done():
                return True
            timeout = ms_left(deadline)
            if timeout == 0:
                return False
            self._inbox.poll(poller, timeout)

    def _on_close(self) -> None:
        super()._on_close()
        self._inbox.close()
