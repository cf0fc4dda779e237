"""What every endpoint handle shares: socket ownership, directory changes, the receive plan.

A handle owns one socket and belongs to one thread (sync) or one event loop (asyncio). Discovery
never touches the socket: the directory calls the handle's watcher from zeroconf's thread, which
only queues "connect/disconnect URL" and wakes the owner (:mod:`.waiting` holds the sync and the
asyncio way of doing that, and of waiting).

What a call decides is written once, as a plan (:mod:`.plan`) that the sync and the asyncio
handles drive with their own waits: here, receiving one message (``Handle._receive``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..constants import UPSTREAM_HWM
from ..core import wire
from ..core.records import VIA_KIND, EndpointKind
from ..errors import ClosedError, FabricError, FabricTimeoutError
from ..stats import RateLimitedLog
from ..transport.frames import deadline_after
from ..transport.sockets import sync_view, zmq_error
from .plan import RECV, WAIT_CHANGE, WAIT_PROVIDERS, WAIT_USABLE, Plan

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

log = logging.getLogger(__name__)
rlog = RateLimitedLog(log)
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
    #: What this handle receives, for errors ("no event on stream 'prices' within 1 s").
    received = "message"

    #: True for handles served by a node-owned thread even on an asyncio node.
    sync_socket = False
    #: The waits of this handle's plans: step -> the name of the method that does it (blocking
    #: in a sync handle, a coroutine in an asyncio one; see plan.py).
    steps: ClassVar[Mapping[int, str]] = {RECV: "_recv"}
    #: The socket's ZeroMQ heartbeat interval (ms), if not the node's.
    heartbeat_ivl_ms: int | None = None

    def __init__(self, runtime: NodeRuntime, name: str, socket_type: int) -> None:
        self._rt = runtime
        self.name = name
        self._sock: zmq.Socket = runtime.sockets.socket(
            socket_type, sync=self.sync_socket, heartbeat_ivl_ms=self.heartbeat_ivl_ms
        )
        self._closed = False
        self._steps: dict[int, Callable[[Any], Any]] | None = None  # see _waits
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

    @property
    def _waits(self) -> dict[int, Callable[[Any], Any]]:
        """``steps`` made into bound methods, for a plan's driver (made at the first wait).

        Kept in an attribute that ``__init__`` made, not a ``functools.cached_property``: that
        writes the instance's ``__dict__``, and on CPython 3.11 making the ``__dict__`` of an
        instance moves its attribute values out of the object into a dict, after which every
        attribute access of the handle takes a slower path (measured: a publisher's ``send``
        ran 2,500 more instructions per event, +20%, once ``wait_subscribers`` had run)."""
        steps = self._steps
        if steps is None:
            steps = self._steps = {step: getattr(self, name) for step, name in self.steps.items()}
        return steps

    def _receive(self, timeout: float | None) -> Plan[wire.Message | None]:
        """The plan of ``recv_message``: the next well-formed message, or None after ``timeout``
        seconds (None: no limit). Malformed messages are counted and skipped. Raises ClosedError
        once closed."""
        self._check_open()
        deadline = deadline_after(timeout)
        while (frames := (yield RECV, deadline)) is not None:
            message = self._decode(frames)
            if message is not None:
                return message
        return None

    def _decode(self, frames: list[bytes]) -> wire.Message | None:  # pragma: no cover
        """The message in ``frames``, or None (counted) when it is malformed."""
        raise NotImplementedError

    def _timeout(self, timeout: float | None) -> FabricTimeoutError:
        """The error of a receive that got nothing within ``timeout`` s."""
        return FabricTimeoutError(
            f"no {self.received} on {self.noun} {self.name!r} within {timeout} s", timeout=timeout
        )

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
            if socket_type == zmq.XPUB:
                # Upstream of an XPUB come subscriptions, which libzmq adds to its trie (about
                # 48 bytes a byte) in whatever thread next touches the socket, as many as its
                # inbound pipe holds. A short pipe makes each such step small and stops libzmq
                # reading a flooding connection until the upstream watch has cut it.
                self._sock.setsockopt(zmq.RCVHWM, UPSTREAM_HWM)
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
    steps: ClassVar[Mapping[int, str]] = {
        RECV: "_recv",
        WAIT_PROVIDERS: "_wait_providers",
        WAIT_USABLE: "_wait_usable",
        WAIT_CHANGE: "_wait_change",
    }

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

    def _on_monitor_event(self, event: Mapping[str, Any]) -> None:
        url = event["endpoint"]
        url = url.decode() if isinstance(url, bytes) else url
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

    def _usable(self) -> bool:
        """A provider's handshake succeeded, or every one has finished (some refused)."""
        return bool(self._handshaken & self._urls) or self._settled()

    def _known(self) -> bool:
        """At least one provider is connected (as last applied)."""
        return bool(self._urls)

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
                if sync_view(self._sock).get(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[arg-type, operator]
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
