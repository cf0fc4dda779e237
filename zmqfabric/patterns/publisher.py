"""Publishers of publish/subscribe (subscriptions are in :mod:`zmqfabric.patterns.pubsub`):
a bound XPUB, the stream's advertisement, and the subscriber markers it counts.

Knowing when a subscription is applied: every fabric subscription subscribes, after its topics, to
a marker topic of its own (:data:`MARKER_PREFIX` + 16 hex digits). ZeroMQ hands a connection's
subscriptions to the publisher in order, so once the publisher's XPUB has reported a marker, the
topics of that subscriber are applied: an event sent from then on reaches it. The publisher keeps
the set of markers subscribed now (an unsubscribe means the subscriber left), which
``Publisher.wait_subscribers`` and ``Publisher.subscribers`` count. A forwarder device relays
subscriptions, markers included, so a publisher counts the subscribers behind it.

An event is one frame, ``topic NUL message`` (see :mod:`zmqfabric.core.wire`); ``send_many``
packs several events of one topic into one batch frame.
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Final, Iterable, cast

import zmq

from ..constants import MAX_SUBSCRIPTION_SIZE, ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.records import EndpointKind
from ..core.wire import FLOAT64, TOPIC_END
from ..errors import MessageTooLargeError, RemoteProtocolError
from ..transport.frames import NOBLOCK, deadline_after, ms_left, send_frames
from .base import Bound
from .encoder import BINARY, Encoder
from .plan import READABLE, Plan, drive, drive_async, poll_async
from .waiting import AsyncHandle

if TYPE_CHECKING:
    from ..runtime import NodeRuntime


#: The C-level send (no attribute lookup through pyzmq's Socket classes).
_SEND = zmq.backend.Socket.send
#: ``getsockopt`` as the C method, and its arguments as plain ints (see io.py).
_GET = cast("Callable[[Any, int], int]", zmq.backend.Socket.get)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
#: The clock of event timestamps, without the module attribute lookup (hot path).
_now = time.time
#: Encoded topics a publisher keeps (a bounded cache: cleared when full).
_TOPIC_CACHE = 1024
#: Body types that are never raw bytes: ``send`` tells them apart with one set lookup, cheaper
#: than ``isinstance`` with BINARY's three types (a third of the check's cost per event).
_PACKED: Final = frozenset({dict, list, tuple, str, int, float, bool, type(None)})
#: What an event's frame starts with under one topic: (the ``pack`` of a struct that packs the
#: topic's bytes, its end and the message prefix, then the id, the float64 tag and the
#: timestamp; the topic's bytes and end; those and the message prefix), so that ``send`` packs
#: all of it in one call (``wire.pack_canonical``'s layout behind the topic).
_Lead = tuple[Callable[..., bytes], bytes, bytes]


@functools.lru_cache(maxsize=None)
def _lead_struct(size: int) -> struct.Struct:
    """The struct of a lead of ``size`` bytes (topic, end and prefix): one per length (topics
    are at most MAX_TOPIC_SIZE bytes, so at most about a thousand)."""
    return struct.Struct(f">{size}sQBd")
#: events_sent reaches the node's counters in batches (and on close): a locked update per event
#: would cost more than the rest of the send. The XPUB's subscription messages are read at the same
#: moments, so that they never pile up in libzmq (which queues them without a limit) at no cost per
#: event.
_COUNT_BATCH = 256
_COUNT_MASK = _COUNT_BATCH - 1  # a power of two

#: The first bytes of every subscriber marker. 0xFF is never part of UTF-8, so no fabric topic
#: starts with it; and it sorts after every UTF-8 topic, which the ordering needs: a SUB (or a
#: forwarder's XSUB) that (re)connects to a publisher re-sends its subscriptions in byte order, not
#: in the order they were made (a marker starting with 0x00 would arrive before the topics).
MARKER_PREFIX: Final = b"\xffzf/sub/"
#: A whole marker: the prefix and 16 lowercase hex digits (64 random bits per subscription).
_MARKER: Final = re.compile(re.escape(MARKER_PREFIX) + rb"[0-9a-f]{16}")
#: Subscribers a publisher keeps track of; further markers are refused (a bound against peers
#: that subscribe markers without end, far above what one publisher can serve).
MAX_MARKERS: Final = 65_536
#: Subscription frames read per batch: a send that reads them never stalls long, even under a
#: flood from a hostile peer; ``subscribers`` reads at most _READ_MAX.
_READ_BATCH: Final = 1024
_READ_MAX: Final = 64 * _READ_BATCH


def new_marker() -> bytes:
    """A fresh subscriber marker (the topic a subscription subscribes to after its topics)."""
    return MARKER_PREFIX + secrets.token_hex(8).encode()


class PublisherBase(Encoder, Bound):
    """Publishes one stream. ``send`` never blocks: a subscriber that falls HWM messages behind
    loses messages (ZeroMQ pub/sub semantics). The socket is an XPUB, which sends exactly like a
    PUB (plain ZeroMQ SUB programs subscribe to it as to any PUB); the publisher also reads the
    subscription messages it receives, to count subscribers (see ``wait_subscribers``: blocking
    in :class:`Publisher`, a coroutine in :class:`AsyncPublisher`).
    Thread-affine: one thread uses it (on an asyncio node, the loop's thread)."""

    kind = EndpointKind.STREAM
    noun = "stream"
    sync_socket = True  # sends never wait and subscriptions are read without waiting
    #: Upstream of an XPUB come subscriptions only (libzmq frees a long one recursively, a byte
    #: per stack frame): a bigger frame disconnects its peer unread.
    max_message_size = MAX_SUBSCRIPTION_SIZE
    steps = {READABLE: "_readable"}

    def __init__(
        self, runtime: NodeRuntime, stream: str, allow: Iterable[str] | None = None
    ) -> None:
        Bound.__init__(self, runtime, stream, zmq.XPUB, allow)
        runtime.sockets.guard_upstream(self._sock)  # bounded subscriptions per connection
        self._init_encoder(wire.Kind.EVENT, runtime.config.max_message_size)
        #: Markers of the subscribers whose subscriptions are applied now.
        self._markers: set[bytes] = set()
        #: The last frame read was a malformed frame with more to come (counted once).
        self._in_junk = False
        #: Per topic (a bounded cache): see _Lead.
        self._leads: dict[str, _Lead] = {}
        #: Events up to this sequence number are in the node's ``events_sent`` counter.
        self._counted = 0
        self._advertise()

    @property
    def subscribers(self) -> int:
        """Fabric subscribers whose subscriptions this publisher has applied: an event sent now
        reaches each of them (if its topic matches). Subscribers that leave stop counting once
        their connection is gone. Plain ZeroMQ SUB sockets receive events but are not counted
        unless they subscribe to a marker (see the wire spec). Reads the subscription messages
        queued, without waiting. Call from the owning thread; raises ClosedError once closed."""
        self._check_open()
        self._read_subscriptions(_READ_MAX)
        return len(self._markers)

    def _wait_subscribers(self, n: int, timeout: float) -> Plan[int]:
        """The plan of ``wait_subscribers``."""
        deadline = deadline_after(timeout)
        # A marker read means its subscriber's topics are applied: no need to read all first.
        while True:
            self._check_open()  # also after a wait (asyncio: closed by another coroutine)
            drained = self._read_subscriptions(_READ_BATCH)
            if len(self._markers) >= n or ms_left(deadline) == 0:
                return len(self._markers)
            if drained:
                yield READABLE, deadline

    def _read_subscriptions(self, limit: int) -> bool:
        """Apply at most ``limit`` frames the XPUB has queued; True when none is left. Never
        waits. libzmq turns each frame a peer sends that starts with 1 or 0 into a one-frame
        (un)subscription message; anything else reaches us as it was sent, which no subscriber
        does: it is counted as refused (once per multipart message) and dropped."""
        recv = self._sock.recv
        for _ in range(limit):
            try:
                frame = recv(NOBLOCK, False)
            except zmq.Again:
                return True
            data = frame.bytes
            if data and data[0] <= 1:
                self._in_junk = False
                if data.startswith(MARKER_PREFIX, 1):
                    self._on_marker(data[0] == 1, data[1:])
                continue  # a topic filter: applied by libzmq, nothing to do
            if not self._in_junk:
                self._refused("subscription", RemoteProtocolError(
                    f"expected a (un)subscription frame (1 or 0 + topic), got {data[:32]!r}"))
            self._in_junk = frame.more
        return False

    def _on_marker(self, subscribe: bool, marker: bytes) -> None:
        markers = self._markers
        if not subscribe:
            markers.discard(marker)  # the subscriber left (or never was: nothing to do)
        elif marker in markers:
            pass
        elif _MARKER.fullmatch(marker) is None:
            self._refused("subscription", RemoteProtocolError(f"malformed marker {marker[:40]!r}"))
        elif len(markers) >= MAX_MARKERS:
            self._refused("subscription", RemoteProtocolError(
                f"more than {MAX_MARKERS} subscribers: marker {marker!r} not counted"))
        else:
            markers.add(marker)

    def _on_close(self) -> None:
        self._flush_count()
        super()._on_close()

    def _flush_batch(self) -> None:
        """Every _COUNT_BATCH events: update the counter; read the subscription messages if any
        are queued (asking costs a third of trying to receive one and failing)."""
        self._flush_count()
        if _GET(self._sock, _EVENTS) & _POLLIN:
            self._read_subscriptions(_READ_BATCH)

    def _flush_count(self) -> None:
        if self._seq != self._counted:  # every event sent takes one sequence number
            self._rt.counters.add("events_sent", self._seq - self._counted)
            self._counted = self._seq

    def send(self, topic: str, body: Any) -> None:
        """Publish ``body`` under ``topic``. Raises LocalProtocolError for an unencodable body or
        topic (one holding a NUL byte too), MessageTooLargeError for a body over the node's
        ``max_message_size`` (nothing is sent then). The node's ``events_sent`` counter is
        updated every 256 events and on close."""
        if self._closed:
            self._check_open()
        # Encoder._encode inlined (hot path): one frame, topic NUL header message, the topic's
        # bytes and the header's constant part packed with its sequence number and timestamp.
        lead = self._leads.get(topic)
        if lead is None:
            lead = self._lead(topic)
        if type(body) not in _PACKED and isinstance(body, BINARY) and (
                len(body) >= ZERO_COPY_THRESHOLD):
            send_frames(self._sock, [lead[1] + self._raw_header(body), body], 0, False)
            if self._seq - self._counted >= _COUNT_BATCH:
                self._flush_batch()
            return
        pack = self._pack  # a local: calling the attribute would look it up as a method
        try:
            data = pack(body)
        except wire.PACK_ERRORS as exc:
            raise wire.unencodable(exc) from exc
        if len(data) > self._limit:
            raise MessageTooLargeError(len(data), self._limit)
        seq = self._seq + 1
        _SEND(self._sock, lead[0](lead[2], seq, FLOAT64, _now()) + data)
        self._seq = seq  # taken once sent: events_sent counts the sequence numbers taken
        if not seq & _COUNT_MASK:
            self._flush_batch()

    def send_many(self, topic: str, bodies: Iterable[Any]) -> None:
        """Publish ``bodies`` under ``topic`` in order, packed up to 256 a frame (batches: a
        subscriber's receives return them one by one; a subscriber HWM frames behind loses a
        whole batch). Raises as :meth:`send`; every body is encoded first, so an unencodable
        one or one over the limit sends nothing."""
        if self._closed:
            self._check_open()
        lead = self._leads.get(topic)
        if lead is None:
            lead = self._lead(topic)
        head = lead[1]
        for frames, copy in self._batches(bodies):
            send_frames(self._sock, [head + frames[0], *frames[1:]], 0, copy)
        if self._seq - self._counted >= _COUNT_BATCH:
            self._flush_batch()

    def _lead(self, topic: str) -> _Lead:
        """What ``send`` puts before an event's body under ``topic`` (see _Lead). Raises
        LocalProtocolError for a topic that cannot be one (see ``wire.encode_topic``)."""
        head = wire.encode_topic(topic) + TOPIC_END
        lead = (_lead_struct(len(head) + len(self._prefix)).pack, head, head + self._prefix)
        if isinstance(topic, str):
            if len(self._leads) >= _TOPIC_CACHE:
                self._leads.clear()
            self._leads[topic] = lead
        return lead


class Publisher(PublisherBase):
    """Publishes one stream from one thread; ``wait_subscribers`` blocks it (see
    :class:`PublisherBase`)."""

    def wait_subscribers(self, n: int, timeout: float) -> int:
        """Wait until ``n`` fabric subscribers have their subscriptions applied here, at most
        ``timeout`` s; return how many have (``subscribers``). When it returns ``n`` or more,
        an event sent next reaches those subscribers (when its topic matches their filters):
        nothing published after this returns is lost to a subscription still on its way.
        A subscriber behind a forwarder device counts once its subscription has travelled
        through the forwarder to here; the forwarder itself does not count. Blocks the owning
        thread; raises ClosedError once closed."""
        return drive(self._wait_subscribers(n, timeout), self._waits)

    def _readable(self, deadline: float | None) -> None:
        try:
            self._sock.poll(ms_left(deadline), zmq.POLLIN)
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc


class AsyncPublisher(AsyncHandle, PublisherBase):
    """A publisher of an asyncio node: ``wait_subscribers`` is a coroutine; ``send`` never
    waits, so it stays a plain method."""

    _poll: asyncio.Future[Any] | None = None

    async def wait_subscribers(self, n: int, timeout: float) -> int:
        """Coroutine of :meth:`Publisher.wait_subscribers` (the same plan, awaited)."""
        return await drive_async(self._wait_subscribers(n, timeout), self._waits)

    async def _readable(self, deadline: float | None) -> None:
        # The socket is a plain one (it is never waited on but here): pyzmq's asyncio poller
        # watches it; closing the publisher cancels the poll, which closing the socket does not.
        self._poll = asyncio.ensure_future(poll_async(([(self._sock, zmq.POLLIN)], deadline)))
        try:
            await self._poll
        except asyncio.CancelledError:
            self._closed_meanwhile()
            raise
        finally:
            self._poll = None

    def _on_close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
        super()._on_close()
