"""Publish/subscribe: publishers (:mod:`zmqfabric.patterns.publisher`) bind an XPUB socket and
advertise the stream; subscriptions connect a SUB socket to every publisher of the stream,
including ones that appear later. Topic filters are ZeroMQ prefix subscriptions on the frame's
first bytes (an event is ``topic NUL message``, one frame), applied at the publisher. Each
subscription also subscribes to a marker of its own, after its topics (see
:mod:`~zmqfabric.patterns.publisher`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator

import msgpack
import zmq

from ..constants import DECODE_CHECK_SIZE, MAX_TOPIC_SIZE
from ..core import wire
from ..core.records import EndpointKind
from ..core.wire import FLOAT64
from ..errors import LocalProtocolError, RemoteProtocolError
from ..transport.frames import NOBLOCK, deadline_after, recv_rest
from .base import Connector
from .pending import Pending
from .plan import drive, drive_async
from .publisher import (
    MARKER_PREFIX,
    MAX_MARKERS,
    AsyncPublisher,
    Publisher,
    PublisherBase,
    new_marker,
)
from .waiting import AsyncConnector, SyncConnector

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

__all__ = [
    "MARKER_PREFIX", "MAX_MARKERS", "AsyncPublisher", "AsyncSubscription", "Publisher",
    "PublisherBase", "Subscription", "SubscriptionBase", "new_marker",
]

# Hot path (see wire_layout's canonical encodings): the prefixes of an event and of a batch.
_EVENT = wire.MESSAGE_PREFIX[wire.Kind.EVENT]
_BATCH = wire.BATCH_PREFIX[wire.Kind.EVENT]
#: Where the float64 tag sits after a topic's end.
_TAG_AFTER_END = 1 + wire.FLOAT64_AT
#: A topic's end (NUL) is looked for in a frame's first bytes only.
_TOPIC_SCAN = MAX_TOPIC_SIZE + 1
_RECV = zmq.backend.Socket.recv
_UNPACKB = msgpack.unpackb
#: Topics a subscription keeps decoded (a bounded cache: cleared when full).
_TOPIC_CACHE = 1024


def _filters(topics: Iterable[str] | None) -> list[bytes]:
    """The encoded topic filters of a subscription (None: everything). Raises
    LocalProtocolError for a topic that cannot be encoded or that starts like a marker."""
    heads = [wire.encode_topic(topic) for topic in (topics if topics is not None else [""])]
    for head in heads:
        if head.startswith(MARKER_PREFIX):
            raise LocalProtocolError(f"topic {head!r} starts with the subscriber marker prefix")
    return heads


class SubscriptionBase(Connector):
    """What the sync and the asyncio subscription share: topics, the marker, decoding."""

    kind = EndpointKind.STREAM
    noun = "stream"
    received = "event"

    def __init__(
        self,
        runtime: NodeRuntime,
        stream: str,
        topics: Iterable[str] | None = None,
        via: str | None = None,
    ) -> None:
        heads = _filters(topics)  # before the socket exists: a bad topic leaks nothing
        super().__init__(runtime, stream, zmq.SUB, via)
        # A connection's subscriptions reach a publisher in order (on a reconnection, in byte
        # order, where the marker sorts last too): the marker comes after the topics.
        for head in heads:
            self._sock.setsockopt(zmq.SUBSCRIBE, head)
        #: This subscription's marker: subscribed after its topics, so that publishers can tell
        #: when those are applied (see the module docstring).
        self.marker = new_marker()
        self._sock.setsockopt(zmq.SUBSCRIBE, self.marker)
        #: The rest of the batch last received.
        self._pending = Pending()
        self._held = self._pending.bodies  # truthy while a batch's rest waits (hot path)
        #: Topics decoded (bytes -> text), for the hot path.
        self._names: dict[bytes, str] = {}

    def _decode(self, frames: list[bytes]) -> wire.Message | None:
        """The event in ``frames`` (the first of a batch: the rest wait in ``_pending``), or
        None (counted) when it is malformed."""
        try:
            if not frames:
                raise RemoteProtocolError("empty event")
            topic, first = wire.split_topic(frames[0])
            header, body = wire.parse_frames([first, *frames[1:]], wire.Kind.EVENT)
            return self._pending.first(header, body, wire.decode_topic(topic))
        except RemoteProtocolError as exc:
            self._refused("event", exc)
            return None

    def _receive(self, timeout: float | None) -> Any:
        """The plan of ``recv_message``: the rest of a batch first (see Handle._receive)."""
        if self._pending:
            return self._pending.next()
        return (yield from super()._receive(timeout))

    def _fast(self, data: bytes) -> tuple[str, Any] | None:
        """``(topic, body)`` of a canonical event or batch frame of at most DECODE_CHECK_SIZE
        bytes whose topic is known; None for anything else (the parser decides). Hot path:
        the checks of wire_layout's canonical encodings, after the topic's end."""
        end = data.find(0, 0, _TOPIC_SCAN)
        if end < 0 or len(data) > DECODE_CHECK_SIZE:
            return None
        topic = self._names.get(data[:end])
        if topic is None:
            return None
        try:
            if data[end + _TAG_AFTER_END] != FLOAT64:
                return None
            if data.startswith(_EVENT, end + 1):
                return topic, _UNPACKB(data[end + 1:], raw=False, strict_map_key=False)[4]
            if data.startswith(_BATCH, end + 1):
                fields = _UNPACKB(data[end + 1:], raw=False, strict_map_key=False)
                if type(fields[4]) is list and fields[4]:
                    return topic, self._pending.take(fields, topic)
        except Exception:  # refused (and counted) by the parser
            return None
        return None

    def _learn(self, message: wire.Message) -> None:
        """Remember the decoded topic of ``message`` for the hot path."""
        topic = message.topic or ""
        names = self._names
        if len(names) >= _TOPIC_CACHE:
            names.clear()
        names[topic.encode()] = topic


class Subscription(SubscriptionBase, SyncConnector):
    """Receives one stream from every publisher. Iterate for ``(topic, body)`` pairs.

    Owned by one thread. ZeroMQ pub/sub is at most once: messages published before the
    subscription reaches a publisher, or beyond the HWM, are not delivered. A publisher that must
    not lose the first events waits for its subscribers (``Publisher.wait_subscribers``).
    Raises LocalProtocolError for a topic that cannot be encoded.
    """

    def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        """The next event as a Message, or None after ``timeout`` seconds (None: wait forever)."""
        return drive(self._receive(timeout), self._waits)

    def recv(self, timeout: float | None = None) -> tuple[str, Any]:
        """The next ``(topic, body)``. Raises FabricTimeoutError after ``timeout`` seconds."""
        if self._closed:
            self._check_open()
        deadline: float | None = None
        waited = False
        while True:
            # Hot path, as _recv: take what is there; compute a deadline only to wait.
            if self._ops:
                self._drain()
            if self._held:  # the rest of a batch
                return self._pending.pop_event()
            try:
                data = _RECV(self._sock, NOBLOCK)
            except zmq.Again:
                if not waited:
                    deadline, waited = deadline_after(timeout), True
                if not self._poll(self._poll_in, deadline):
                    raise self._timeout(timeout) from None
                continue
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc
            # _fast's first case inlined: a canonical event whose topic is known.
            end = data.find(0, 0, _TOPIC_SCAN)
            if end >= 0 and len(data) <= DECODE_CHECK_SIZE:
                topic = self._names.get(data[:end])
                if topic is not None and data.startswith(_EVENT, end + 1):
                    try:
                        if data[end + _TAG_AFTER_END] == FLOAT64:
                            return topic, _UNPACKB(data[end + 1:], raw=False,
                                                   strict_map_key=False)[4]
                    except Exception:  # noqa: S110 - refused (and counted) below
                        pass
            event = self._fast(data)
            if event is not None:
                return event
            decoded = self._decode(recv_rest(self._sock, data))
            if decoded is not None:
                self._learn(decoded)
                return decoded.topic or "", decoded.body

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the connections to every publisher known now (at least one) are up; False
        after ``timeout`` s (or while no publisher is known). Our subscription follows the
        connection's handshake, so a publisher may apply it a moment later (about a millisecond):
        events published in that moment are missed, and a subscriber cannot see when it has
        been applied. Where the first events matter, the publisher waits instead:
        ``Publisher.wait_subscribers(n)`` returns once ``n`` subscriptions are applied, and
        nothing sent after it returns is lost to a subscription on its way."""
        return self._wait_ready(deadline_after(timeout))

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while (message := self.recv_message()) is not None:
            yield message.topic or "", message.body


class AsyncSubscription(SubscriptionBase, AsyncConnector):
    """Receives one stream in an asyncio loop. ``async for topic, body in sub``."""

    async def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        """Coroutine of :meth:`Subscription.recv_message` (the same plan, awaited)."""
        return await drive_async(self._receive(timeout), self._waits)

    async def recv(self, timeout: float | None = None) -> tuple[str, Any]:
        """The next ``(topic, body)``. Raises FabricTimeoutError after ``timeout`` seconds."""
        message = await self.recv_message(timeout)
        if message is None:
            raise self._timeout(timeout)
        return message.topic or "", message.body

    async def wait_ready(self, timeout: float) -> bool:
        """Coroutine twin of the sync ``wait_ready``: connections up, not yet a guarantee that
        publishers have applied the subscription (``Publisher.wait_subscribers`` is)."""
        return await self._wait_ready(deadline_after(timeout))

    async def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        while (message := await self.recv_message()) is not None:
            yield message.topic or "", message.body
