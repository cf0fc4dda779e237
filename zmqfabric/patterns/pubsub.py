"""Publish/subscribe: publishers bind a PUB socket and advertise the stream; subscribers connect a
SUB socket to every publisher of the stream, including ones that appear later. Topic filters are
ZeroMQ prefix subscriptions on the first frame, applied at the publisher."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..constants import ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.records import EndpointKind
from ..errors import FabricTimeoutError, RemoteProtocolError
from .aioconn import AsyncConnector
from .base import Bound, SyncConnector, _closed_or
from .io import (
    NOBLOCK,
    _ms_left,
    deadline_after,
    recv_frames,
    send_frames,
)

if TYPE_CHECKING:
    from ..nodebase import NodeBase


# Hot path (see wire.CANONICAL): pre-packed header prefixes and the struct calls.
_EVENT = wire.canonical_prefix(wire.Kind.EVENT)
_PACK = wire.CANONICAL.pack
_UNPACK = wire.CANONICAL.unpack
_FLOAT64 = wire.FLOAT64
BINARY = (bytes, bytearray, memoryview)
#: Encoded topics a publisher keeps (a bounded cache: cleared when full).
_TOPIC_CACHE = 1024
#: events_sent reaches the node's counters in batches (and on close): a locked update per event
#: would cost more than the rest of the send.
_COUNT_BATCH = 256


class _Encoder:
    """Pre-packed message framing shared by publishers and pushers: a header prefix per kind,
    one msgpack Packer per handle (``msgpack.packb`` builds one per call), a sequence number.
    The sync ``send`` methods inline ``_encode``; keep them in step."""

    def _init_encoder(self, kind: wire.Kind) -> None:
        self._kind = kind
        self._prefix = wire.canonical_prefix(kind)
        self._pack = msgpack.Packer().pack
        self._seq = 0

    def _encode(self, body: Any) -> tuple[list[Any], bool]:
        """(header + body frames, copy flag). Large bytes bodies go raw and uncopied.
        Raises LocalProtocolError for a body msgpack cannot encode."""
        self._seq += 1
        if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
            header = wire.pack_header(self._kind, self._seq, time.time(), wire.RAW_HEADERS)
            return [header, body], False
        try:
            data = self._pack(body)
        except wire.PACK_ERRORS as exc:
            raise wire.unencodable(exc) from exc
        return [_PACK(self._prefix, self._seq, _FLOAT64, time.time()), data], True


class Publisher(_Encoder, Bound):
    """Publishes one stream. ``send`` never blocks: a subscriber that falls HWM messages behind
    loses messages (ZeroMQ PUB semantics). Thread-affine; works for sync and asyncio nodes."""

    kind = EndpointKind.STREAM
    noun = "stream"
    sync_socket = True  # PUB never waits, so asyncio nodes use the plain socket too

    def __init__(self, node: NodeBase, stream: str, allow: Iterable[str] | None = None) -> None:
        Bound.__init__(self, node, stream, zmq.PUB, allow)
        self._init_encoder(wire.Kind.EVENT)
        # Subscriber connections, watched from before the stream is advertised so none is missed.
        self._monitor = node._sockets.monitor(
            self._sock, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED, sync=True
        )
        self._subscribers = 0
        self._topics: dict[str, bytes] = {}
        self._unsent_count = 0
        self._advertise()

    @property
    def subscribers(self) -> int:
        """Subscribers connected now (completed handshakes less disconnections)."""
        return self._read_subscribers()

    def wait_subscribers(self, n: int, timeout: float) -> int:
        """Wait until ``n`` subscribers are connected, at most ``timeout`` s; return how many are.
        Pub/sub drops what is sent before a subscriber's subscription arrives, which follows its
        connection within about a millisecond (see ``Subscription.wait_ready``)."""
        self._check_open()
        deadline = deadline_after(timeout)
        while self._read_subscribers() < n:
            left = _ms_left(deadline)
            if left == 0:
                break
            self._monitor.poll(left)
        return self._subscribers

    def _read_subscribers(self) -> int:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return self._subscribers
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._subscribers += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self._subscribers = max(0, self._subscribers - 1)

    def _on_close(self) -> None:
        self._flush_count()
        self._sock.disable_monitor()
        self._monitor.close(0)
        super()._on_close()

    def _flush_count(self) -> None:
        if self._unsent_count:
            self._node.counters.add("events_sent", self._unsent_count)
            self._unsent_count = 0

    def send(self, topic: str, body: Any) -> None:
        """Publish ``body`` under ``topic``. Raises LocalProtocolError for an unencodable body or
        topic. The node's ``events_sent`` counter is updated every 256 events and on close."""
        if self._closed:
            self._check_open()
        head = self._topics.get(topic)
        if head is None:
            head = self._topic(topic)
        self._seq = seq = self._seq + 1
        if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
            header = wire.pack_header(self._kind, seq, time.time(), wire.RAW_HEADERS)
            send_frames(self._sock, [head, header, body], 0, False)
        else:
            try:
                data = self._pack(body)
            except wire.PACK_ERRORS as exc:
                raise wire.unencodable(exc) from exc
            send_frames(self._sock, [head, _PACK(self._prefix, seq, _FLOAT64, time.time()), data], 0)
        self._unsent_count += 1
        if self._unsent_count >= _COUNT_BATCH:
            self._flush_count()

    def _topic(self, topic: str) -> bytes:
        head = wire.encode_topic(topic)
        if isinstance(topic, str):
            if len(self._topics) >= _TOPIC_CACHE:
                self._topics.clear()
            self._topics[topic] = head
        return head


class _SubscriptionBase:
    kind = EndpointKind.STREAM
    noun = "stream"
    _sock: zmq.Socket

    def _subscribe_topics(self, topics: Iterable[str] | None) -> None:
        for topic in topics if topics is not None else [""]:
            self._sock.setsockopt(zmq.SUBSCRIBE, wire.encode_topic(topic))

    def _decode(self, frames: list[bytes]) -> wire.Message | None:
        """The event in ``frames``, or None (counted) when it is malformed."""
        try:
            if len(frames) == 3:  # fast path: [topic, canonical event header, msgpack body]
                header = frames[1]
                if len(header) == 21 and header.startswith(_EVENT) and header[12] == _FLOAT64:
                    _, msg_id, _, timestamp = _UNPACK(header)
                    return wire.Message(wire.Kind.EVENT, msg_id, timestamp,
                                        wire.unpack_body(frames[2]), wire.decode_topic(frames[0]))
            return wire.parse_event(frames)
        except RemoteProtocolError as exc:
            self._refused("event", exc)  # type: ignore[attr-defined]
            return None


class Subscription(_SubscriptionBase, SyncConnector):
    """Receives one stream from every publisher. Iterate for ``(topic, body)`` pairs.

    Owned by one thread. ZeroMQ pub/sub is at most once: messages published before the
    connection is up, or beyond the HWM, are not delivered.
    """

    def __init__(
        self,
        node: NodeBase,
        stream: str,
        topics: Iterable[str] | None = None,
        via: str | None = None,
    ) -> None:
        SyncConnector.__init__(self, node, stream, zmq.SUB, via)
        self._subscribe_topics(topics)

    def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        """The next event as a Message, or None after ``timeout`` seconds (None: wait forever)."""
        self._check_open()
        deadline = deadline_after(timeout)
        while (frames := self._recv(deadline)) is not None:
            message = self._decode(frames)
            if message is not None:
                return message
        return None

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
            try:
                frames = recv_frames(self._sock, NOBLOCK)
            except zmq.Again:
                if not waited:
                    deadline, waited = deadline_after(timeout), True
                got = self._wait_recv(deadline)
                if got is None:
                    raise _timeout(self.name, timeout) from None
                frames = got
            except zmq.ZMQError as exc:
                raise _closed_or(self, exc) from exc
            if len(frames) == 3:  # fast path: [topic, canonical event header, msgpack body]
                header = frames[1]
                if len(header) == 21 and header.startswith(_EVENT) and header[12] == _FLOAT64:
                    try:
                        return wire.decode_topic(frames[0]), wire.unpack_body(frames[2])
                    except RemoteProtocolError as exc:
                        self._refused("event", exc)
                        continue
            message = self._decode(frames)
            if message is not None:
                return message.topic or "", message.body

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the connections to every publisher known now (at least one) are up; False
        after ``timeout`` s. ZeroMQ pub/sub drops what is published before a subscription
        reaches the publisher, and the subscription follows the handshake: a publisher applies it
        within about a millisecond of its own activity, so events published in that window may
        still be missed. Where the first event matters, use a pipeline or tasks, or have the
        publisher wait (``Publisher.wait_subscribers``) and pause briefly."""
        return self._wait_ready(deadline_after(timeout))

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while (message := self.recv_message()) is not None:
            yield message.topic or "", message.body


class AsyncSubscription(_SubscriptionBase, AsyncConnector):
    """Receives one stream in an asyncio loop. ``async for topic, body in sub``."""

    def __init__(
        self,
        node: NodeBase,
        stream: str,
        topics: Iterable[str] | None = None,
        via: str | None = None,
    ) -> None:
        AsyncConnector.__init__(self, node, stream, zmq.SUB, via)
        self._subscribe_topics(topics)

    async def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        self._check_open()
        deadline = deadline_after(timeout)
        while (frames := await self._recv(deadline)) is not None:
            message = self._decode(frames)
            if message is not None:
                return message
        return None

    async def recv(self, timeout: float | None = None) -> tuple[str, Any]:
        message = await self.recv_message(timeout)
        if message is None:
            raise _timeout(self.name, timeout)
        return message.topic or "", message.body

    async def wait_ready(self, timeout: float) -> bool:
        """Coroutine twin of the sync ``wait_ready``."""
        return await self._wait_ready(deadline_after(timeout))

    async def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        while (message := await self.recv_message()) is not None:
            yield message.topic or "", message.body


def _timeout(stream: str, timeout: float | None) -> FabricTimeoutError:
    return FabricTimeoutError(f"no event on stream {stream!r} within {timeout} s", timeout=timeout)
