"""What every device shares: a node-advertised front end, a back end that follows discovery, a
thread that relays, and a steering socket for PAUSE / RESUME / TERMINATE / STATISTICS.

Sockets belong to the device thread while it runs. Discovery only posts "connect/disconnect this
address" for the back end to the device's :class:`~zmqfabric.transport.inbox.Inbox` and interrupts
the relay; the device thread applies the change and relays on. The steering socket is the one
socket used from several threads, always under its lock.

Discovery's thread never waits for the device thread: it calls the watcher while holding the
directory's lock, and the device thread may be waiting for that lock or answering another steering
call. So a watcher resolves the peer's CURVE key itself (the lock is re-entrant), and interrupts
with commands whose replies it does not wait for: they are "owed", and the next steering call
reads them first (:meth:`Device._settle_locked`).
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import zmq

from zmqfabric.constants import MAX_SUBSCRIPTION_SIZE, THREAD_JOIN_TIMEOUT_S
from zmqfabric.core.records import EndpointKind, validate_endpoint_name
from zmqfabric.errors import ClosedError, FabricTimeoutError
from zmqfabric.node import Node
from zmqfabric.patterns.base import Bound
from zmqfabric.runtime import NodeRuntime
from zmqfabric.transport.inbox import Inbox

log = logging.getLogger(__name__)

PAUSE, RESUME, TERMINATE, STATISTICS = b"PAUSE", b"RESUME", b"TERMINATE", b"STATISTICS"
#: How long a STATISTICS answer may take (s) before the caller gets a timeout error.
STEER_TIMEOUT_S = 2.0
_COUNTER_NAMES = (
    "front_frames_in", "front_bytes_in", "front_frames_out", "front_bytes_out",
    "back_frames_in", "back_bytes_in", "back_frames_out", "back_bytes_out",
)


class DeviceState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """Frames (message parts) and bytes through a device, each way (front end and back end).
    Frames, not messages: libzmq's proxy counts each frame of a multipart message (4.3.5: a
    fabric request of 4 frames counts 4), and the queue counts the same way. Until 0.1 these
    were named ``*_msgs_*``."""

    front_frames_in: int = 0
    front_bytes_in: int = 0
    front_frames_out: int = 0
    front_bytes_out: int = 0
    back_frames_in: int = 0
    back_bytes_in: int = 0
    back_frames_out: int = 0
    back_bytes_out: int = 0

    def __add__(self, other: DeviceStats) -> DeviceStats:
        return DeviceStats(*(getattr(self, n) + getattr(other, n) for n in _COUNTER_NAMES))

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> DeviceStats:
        return cls(*(struct.unpack("=Q", frame)[0] for frame in frames[:8]))

    def to_frames(self) -> list[bytes]:
        return [struct.pack("=Q", getattr(self, n)) for n in _COUNTER_NAMES]

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in _COUNTER_NAMES}


class FrontEnd(Bound):
    """A device's bound, advertised front end (a plain socket served by the device thread)."""

    sync_socket = True

    def __init__(self, runtime: NodeRuntime, kind: EndpointKind, name: str, socket_type: int,
                 allow: Iterable[str] | None = None) -> None:
        self.kind = kind
        self.noun = kind.noun
        if socket_type == zmq.XPUB:
            # Upstream of an XPUB come subscriptions only. libzmq keeps each in a trie of one
            # node per byte and frees it recursively: a 200 KiB subscription overflowed the
            # reaper thread's stack when the device stopped (SIGSEGV). Bigger frames are refused
            # before they are read (the peer is disconnected).
            self.max_message_size = MAX_SUBSCRIPTION_SIZE
        super().__init__(runtime, name, socket_type, allow)
        self.socket = self._sock
        if socket_type == zmq.XPUB:
            runtime.sockets.guard_upstream(self._sock)  # bounded subscriptions per connection

    def advertise(self) -> None:
        self._advertise()


class Device:
    """Base of the queue, forwarder and streamer. Use as a context manager or start()/stop().

    ``node`` is the (started) node the device runs in: its name is the name clients give as
    ``via=``. ``name`` is the service, stream or pipeline relayed.
    """

    front_kind: EndpointKind
    relayed_kind: EndpointKind
    front_type: int
    back_type: int
    label = "device"

    def __init__(self, node: Node, name: str, *, allow: Iterable[str] | None = None) -> None:
        rt = self._rt = node.runtime
        rt.check_started()
        self.node = node
        self.name = validate_endpoint_name(name, self.relayed_kind.noun)
        self.state = DeviceState.NEW
        self._front = FrontEnd(rt, self.front_kind, name, self.front_type, allow)
        self.front = self._front.socket
        # The node closes the device (which closes its front end after its thread ended), not
        # the front end under the running thread.
        rt.untrack(self._front)
        rt.track(self)
        self.back = rt.sockets.socket(self.back_type, sync=True)
        self.back.setsockopt(zmq.IMMEDIATE, 1)
        #: Back-end changes posted by discovery, run by the device thread (``_apply_ops``).
        self._inbox = Inbox()
        self._urls: set[str] = set()
        self._address = f"inproc://zmqfabric-device-{id(self)}"
        self.control = rt.sockets.socket(zmq.PAIR, sync=True)
        self.control.bind(self._address)
        self._steer = rt.sockets.socket(zmq.PAIR, sync=True)
        self._steer.connect(self._address)
        self._steer_lock = threading.Lock()
        #: One entry per command sent whose reply is not read yet: True for a STATISTICS reply
        #: to add to ``_carried``. Under _steer_lock.
        self._owed: collections.deque[bool] = collections.deque()
        self._carried = DeviceStats()
        self._stopping = False
        self._closed = False
        self._unwatch: Callable[[], None] | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"zmqfabric-{self.label}-{node.name}-{name}"
        )

    # --- lifetime --------------------------------------------------------------------------

    def start(self) -> Device:
        """Start relaying in a device-owned thread, then advertise the front end."""
        if self.state is not DeviceState.NEW:
            raise ClosedError(f"{self.label} {self.name!r} was started already")
        self.state = DeviceState.RUNNING
        self._inbox.open()
        self._unwatch = self._rt.directory.watch(self.relayed_kind, self.name, self._post)
        self._rt.add_stats_source(f"{self.label}:{self.name}", self.stats_dict)
        self._thread.start()
        self._front.advertise()
        return self

    def stop(self) -> None:
        """Stop relaying, withdraw the front end and close every socket. Idempotent; also after
        the device thread failed."""
        if self._closed:
            return
        self._closed = True
        started = self._thread.is_alive()
        self.state = DeviceState.STOPPED
        self._stopping = True
        if self._unwatch is not None:
            self._unwatch()
        self._rt.remove_stats_source(f"{self.label}:{self.name}")
        if started:
            self._terminate()
            self._thread.join(THREAD_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("%s %s did not stop within %s s", self.label, self.name,
                          THREAD_JOIN_TIMEOUT_S)
        if not self._thread.is_alive():  # else a late wake-up of the stuck thread stays safe
            self._inbox.close()
        self._front.close()
        for sock in (self.back, self.control, self._steer):
            sock.close(0)
        self._rt.untrack(self)

    def close(self) -> None:
        """The node closes its tracked handles, devices included: same as stop()."""
        self.stop()

    def __enter__(self) -> Device:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the device thread to end (TERMINATE or stop()); False on timeout."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- steering (any thread) ---------------------------------------------------------------

    def pause(self) -> None:
        """Stop relaying; messages wait in the sockets' queues (up to their HWM)."""
        if self.state is DeviceState.RUNNING:
            self.state = DeviceState.PAUSED
            self._steer_call(PAUSE)

    def resume(self) -> None:
        if self.state is DeviceState.PAUSED:
            self.state = DeviceState.RUNNING
            self._steer_call(RESUME)
            if self._inbox.pending:
                self._interrupt()  # changes that arrived while paused

    def statistics(self) -> DeviceStats:
        """Counters since start. Raises FabricTimeoutError if the device does not answer."""
        if self.state in (DeviceState.NEW, DeviceState.STOPPED):
            return self._carried_stats()
        with self._steer_lock:
            reply = self._steer_call_locked(STATISTICS)
            if reply is None or len(reply) < 8:
                raise FabricTimeoutError(f"{self.label} {self.name!r} did not report statistics",
                                         timeout=STEER_TIMEOUT_S)
            return self._carried_stats() + DeviceStats.from_frames(reply)

    def stats_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "relays": self.name, "providers": len(self._urls),
                **self.statistics().as_dict()}

    def _terminate(self) -> None:
        """Make the device thread return (it answers with an empty frame)."""
        self._steer_call(TERMINATE)

    def _steer_call(self, command: bytes) -> list[bytes] | None:
        """Send a steering command and return the device's reply (every command gets one:
        an empty frame, or 8 counters for STATISTICS); None if it did not answer in time."""
        with self._steer_lock:
            return self._steer_call_locked(command)

    def _steer_call_locked(self, command: bytes) -> list[bytes] | None:
        self._settle_locked(wait=True)
        while self._steer.poll(0):  # a late reply to an earlier call that timed out
            self._steer.recv_multipart()
        self._steer.send(command)
        if not self._steer.poll(int(STEER_TIMEOUT_S * 1000)):
            return None
        return self._steer.recv_multipart()

    def _send_owed_locked(self, command: bytes, replies: bool = True, carry: bool = False) -> None:
        """Send a command without waiting for its reply (if it gets one: ``replies``); the next
        steering call reads it. ``carry``: the reply is a STATISTICS answer to keep."""
        self._settle_locked(wait=False)
        self._steer.send(command)
        if replies:
            self._owed.append(carry)

    def _settle_locked(self, wait: bool) -> None:
        """Read the owed replies (``wait``: up to STEER_TIMEOUT_S each; else those already here)."""
        while self._owed:
            if not self._steer.poll(int(STEER_TIMEOUT_S * 1000) if wait else 0):
                if wait:
                    log.warning("%s %s: %d steering replies did not come; counts may be short",
                                self.label, self.name, len(self._owed))
                    self._owed.clear()
                return
            reply = self._steer.recv_multipart()
            if self._owed.popleft() and len(reply) >= 8:
                self._carried = self._carried + DeviceStats.from_frames(reply)

    # --- back end ----------------------------------------------------------------------------

    def _post(self, op: str, url: str) -> None:
        """Discovery's thread, under the directory's lock: post the change (with the peer's key,
        so that the device thread never needs that lock) and interrupt the relay. Never waits."""
        if self._stopping:
            return
        if op == "connect":
            self._inbox.post(self._connect, url, self._rt.directory.key_for(url))
        else:
            self._inbox.post(self._disconnect, url)
        self._interrupt()

    def _interrupt(self) -> None:
        """Discovery's thread, after a post: make the device thread take it soon, without
        waiting for that thread. A thread that sleeps in ``inbox.poll`` was woken by the post
        itself (the queue); the proxy devices override this to leave ``zmq.proxy_steerable``."""

    def _apply_ops(self) -> None:
        """Device thread: run the back-end changes discovery posted so far."""
        self._inbox.run_pending()

    def _connect(self, url: str, key: str | None) -> None:
        """Device thread: connect the back end to a provider (its CURVE key, if secured)."""
        if url in self._urls:
            return
        try:
            self._rt.sockets.connect(self.back, url, key)
            self._urls.add(url)
        except Exception as exc:  # a bad peer must not stop the device
            log.warning("%s %s: cannot connect %s: %s", self.label, self.name, url, exc)

    def _disconnect(self, url: str) -> None:
        """Device thread: disconnect the back end from a provider that left."""
        if url not in self._urls:
            return
        self._urls.discard(url)
        try:
            self.back.disconnect(url)
        except Exception as exc:
            log.warning("%s %s: cannot disconnect %s: %s", self.label, self.name, url, exc)

    def _main(self) -> None:
        try:
            self._relay()
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("%s %s stopped on an error", self.label, self.name)
        finally:
            if self.state is not DeviceState.STOPPED:
                self.state = DeviceState.STOPPED

    def _relay(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _carried_stats(self) -> DeviceStats:
        """Counts from earlier runs of the relay (a restarted proxy starts from zero)."""
        return self._carried
