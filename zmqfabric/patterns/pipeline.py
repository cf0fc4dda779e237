"""Push/pull pipelines: pullers (workers, sinks) bind a PULL socket and advertise the pipeline;
pushers connect a PUSH socket to every puller found, and ZeroMQ deals messages round robin among
the pullers that are connected (IMMEDIATE: never to a puller that is gone)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator

import msgpack
import zmq

from ..constants import DECODE_CHECK_SIZE, LINGER_MS, MAX_BATCH, ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.records import EndpointKind
from ..core.wire import FLOAT64, FLOAT64_AT, pack_canonical
from ..errors import MessageTooLargeError, NoProviderError, RemoteProtocolError
from ..transport.frames import (
    NOBLOCK,
    deadline_after,
    ms_left,
    recv_frames,
    recv_rest,
    sticky_rcvtimeo,
)
from .base import Bound, Connector
from .encoder import BINARY, Encoder
from .pending import Pending
from .plan import drive, drive_async
from .waiting import AsyncConnector, AsyncHandle, SyncConnector

# Hot path (see wire_layout's canonical encodings): the pre-packed prefix of a message.
_MESSAGE = wire.MESSAGE_PREFIX[wire.Kind.MESSAGE]
_BATCH = wire.BATCH_PREFIX[wire.Kind.MESSAGE]
#: The C-level receive (no attribute lookup through pyzmq's Socket classes) and msgpack's decoder.
_RECV = zmq.backend.Socket.recv
_SEND = zmq.backend.Socket.send
_UNPACKB = msgpack.unpackb
#: Bytes of packed bodies a pusher holds at most (a batch then stays under DECODE_CHECK_SIZE,
#: which its receiver decodes without the expansion check).
_HOLD_ROOM = DECODE_CHECK_SIZE - 64
#: The clock of message timestamps, without the module attribute lookup (hot path).
_now = time.time

if TYPE_CHECKING:
    from ..runtime import NodeRuntime


class PullerBase(Bound):
    """What the sync and the asyncio puller share: binding, decoding."""

    kind = EndpointKind.PIPELINE
    noun = "pipeline"
    #: The rest of the batch last received.
    _pending: Pending

    def _decode(self, frames: list[bytes]) -> wire.Message | None:
        """The message in ``frames`` (the first of a batch: the rest wait in ``_pending``), or
        None (counted) when it is malformed."""
        try:
            header, body = wire.parse_frames(frames, wire.Kind.MESSAGE)
        except RemoteProtocolError as exc:
            self._refused("message", exc)
            return None
        return self._pending.first(header, body)

    def _receive(self, timeout: float | None) -> Any:
        """The plan of ``recv_message``: the rest of a batch first (see Handle._receive)."""
        if self._pending:
            return self._pending.next()
        return (yield from super()._receive(timeout))


class Puller(PullerBase):
    """Receives a pipeline's messages (a worker or a sink). Owned by one thread."""

    def __init__(
        self, runtime: NodeRuntime, pipeline: str, allow: Iterable[str] | None = None
    ) -> None:
        super().__init__(runtime, pipeline, zmq.PULL, allow)
        self._pending = Pending()
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._rcvtimeo = -1  # the socket's receive timeout (ms) as last set by recv(); -1: none
        self._advertise()

    def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        """The next message, or None after ``timeout`` seconds (None: wait forever)."""
        return drive(self._receive(timeout), self._waits)

    def recv(self, timeout: float | None = None) -> Any:
        """The next body. Raises FabricTimeoutError after ``timeout`` seconds."""
        if self._closed:
            self._check_open()
        sock = self._sock
        if timeout is None:
            deadline, wait = None, -1
        else:
            deadline, wait = time.monotonic() + timeout, max(0, int(timeout * 1000))
        while True:
            if self._pending:  # the rest of a batch
                return self._pending.popleft()
            # Hot path, as a raw PULL does it: one blocking receive with the socket's receive
            # timeout (a puller has no directory changes to watch, so nothing else to poll), the
            # frame as bytes, one msgpack decode. A canonical one-frame message is recognised
            # by its first bytes (see wire_layout); frames after it (a malformed message) are
            # read next as messages of their own, so nothing of another message is mixed in.
            if wait != self._rcvtimeo:  # a call only when the wait changes (see sticky_rcvtimeo)
                self._rcvtimeo = sticky_rcvtimeo(sock, self._rcvtimeo, wait)
            try:
                data = _RECV(sock, 0)
            except zmq.Again:
                raise self._timeout(timeout) from None
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc
            if len(data) <= DECODE_CHECK_SIZE:
                try:
                    if data[FLOAT64_AT] == FLOAT64:
                        if data.startswith(_MESSAGE):
                            return _UNPACKB(data, raw=False, strict_map_key=False)[4]
                        if data.startswith(_BATCH):
                            fields = _UNPACKB(data, raw=False, strict_map_key=False)
                            if type(fields[4]) is list and fields[4]:
                                return self._pending.take(fields)
                except Exception:  # noqa: S110 - refused (and counted) by the parser below
                    pass
            message = self._decode(recv_rest(sock, data))
            if message is not None:
                return message.body
            if deadline is not None:
                wait = ms_left(deadline) or 0

    def _recv(self, deadline: float | None) -> list[bytes] | None:
        """The next multipart message, or None when ``deadline`` passes (the RECV step)."""
        while True:
            try:
                return recv_frames(self._sock, NOBLOCK)
            except zmq.Again:
                left = ms_left(deadline)
                if left == 0 or not self._poller.poll(left):
                    return None
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc

    def __iter__(self) -> Iterator[Any]:
        while (message := self.recv_message()) is not None:
            yield message.body


class AsyncPuller(AsyncHandle, PullerBase):
    """Receives a pipeline's messages in an asyncio loop. ``async for body in puller``."""

    def __init__(
        self, runtime: NodeRuntime, pipeline: str, allow: Iterable[str] | None = None
    ) -> None:
        super().__init__(runtime, pipeline, zmq.PULL, allow)
        self._pending = Pending()
        self._advertise()

    async def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        """Coroutine of :meth:`Puller.recv_message` (the same plan, awaited)."""
        return await drive_async(self._receive(timeout), self._waits)

    async def recv(self, timeout: float | None = None) -> Any:
        """The next body. Raises FabricTimeoutError after ``timeout`` seconds."""
        message = await self.recv_message(timeout)
        if message is None:
            raise self._timeout(timeout)
        return message.body

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (message := await self.recv_message()) is not None:
            yield message.body


class PusherBase(Encoder, Connector):
    """What the sync and the asyncio pusher share: the socket, framing."""

    kind = EndpointKind.PIPELINE
    noun = "pipeline"

    def __init__(self, runtime: NodeRuntime, pipeline: str, via: str | None = None) -> None:
        super().__init__(runtime, pipeline, zmq.PUSH, via)
        self._init_encoder(wire.Kind.MESSAGE, runtime.config.max_message_size)


class Pusher(PusherBase, SyncConnector):
    """Sends into a pipeline, round robin over its pullers. Owned by one thread.

    **Batching under load.** A message leaves at once while the socket takes it. When every
    connected puller is HWM messages behind (the sender outruns the receivers; not while the
    connections are still being made, when ``send`` waits for them), ``send`` holds
    the message instead of waiting, and the next sends join it: the held messages leave as one
    batch frame (docs/PROTOCOL.md, section 5.7) as soon as the socket takes it, tried at every
    send; once MAX_BATCH are held (or 16 KiB), ``send`` waits for the socket as before. Held
    messages also leave with :meth:`flush`, :meth:`send_many` and :meth:`close` (which waits
    at most LINGER_MS for the socket); a sender that stops while its pullers are behind calls
    :meth:`flush` to wait until they are out of its hands."""

    _held: list[bytes]
    _held_size = 0
    _held_first = 0

    def send(self, body: Any, timeout: float | None = None) -> None:
        """Send ``body`` to one puller. Waits up to ``timeout`` s (None: forever) while no puller
        is connected, or while every puller is behind and MAX_BATCH messages are held (see the
        class); then raises NoProviderError. Raises LocalProtocolError for a body msgpack
        cannot encode, MessageTooLargeError for one over the node's ``max_message_size``
        (nothing is sent then)."""
        if self._closed:
            self._check_open()
        # Encoder._encode inlined (hot path): one frame, one send.
        if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
            if self._held_size:
                self.flush(timeout)
            frames, copy = [self._raw_header(body), body], False
        else:
            self._seq = seq = self._seq + 1
            try:
                packed = self._pack(body)
            except wire.PACK_ERRORS as exc:
                raise wire.unencodable(exc) from exc
            if len(packed) > self._limit:
                raise MessageTooLargeError(len(packed), self._limit)
            if self._ops:
                self._drain()
            if self._held_size:
                self._hold(packed, seq, timeout)
                return
            data = pack_canonical(self._prefix, seq, FLOAT64, _now()) + packed
            try:
                _SEND(self._sock, data, NOBLOCK)
                return
            except zmq.Again:
                pass  # no puller yet, or all are HWM behind
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc
            if len(packed) < _HOLD_ROOM and self._behind():  # pullers, all behind: hold it
                self._held, self._held_first = [packed], seq
                self._held_size = len(packed)
                return
            frames, copy = [data], True
        if self._ops:
            self._drain()
        if not self._send(frames, deadline_after(timeout), copy):
            raise NoProviderError("pipeline", self.name, timeout)

    def _behind(self) -> bool:
        """The socket refused a message while a puller's connection is up (its handshake done):
        the pullers are HWM messages behind. Not while connections are still being made (the
        message would wait for them, held, however short the wait): then ``send`` waits."""
        self._read_monitor()
        return bool(self._handshaken & self._urls)

    def _hold(self, packed: bytes, seq: int, timeout: float | None) -> None:
        """Add a message to those held (in order: its id follows theirs), then try to send them
        all as one batch; wait (``timeout``) when as many are held as a batch takes."""
        if seq != self._held_first + len(self._held) or self._held_size + len(packed) > _HOLD_ROOM:
            self.flush(timeout)  # (an id gap: a raw body went between) or no room: out first
            self._held, self._held_first, self._held_size = [packed], seq, len(packed)
        else:
            self._held.append(packed)
            self._held_size += len(packed)
        if len(self._held) >= MAX_BATCH:
            self.flush(timeout)
            return
        try:
            _SEND(self._sock, self._held_frame(), NOBLOCK)
        except zmq.Again:
            return  # still behind: keep holding
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc
        self._sent_held()

    def _held_frame(self) -> bytes:
        """The held messages as one frame: a batch, or one message on its own."""
        held = self._held
        if len(held) == 1:
            return pack_canonical(self._prefix, self._held_first, FLOAT64, _now()) + held[0]
        return b"".join((pack_canonical(self._batch_prefix, self._held_first, FLOAT64, _now()),
                         self._array_header(len(held)), *held))

    def _sent_held(self) -> None:
        if len(self._held) > 1:
            self._rt.counters.add("batches_sent")
        self._held, self._held_size = [], 0

    def flush(self, timeout: float | None = None) -> None:
        """Send the messages held while the pullers were behind (see the class), waiting up to
        ``timeout`` s (None: forever) for the socket to take them; raises NoProviderError then
        (they stay held). Nothing held: returns at once."""
        if not self._held_size:
            return
        self._check_open()
        if not self._send([self._held_frame()], deadline_after(timeout)):
            raise NoProviderError("pipeline", self.name, timeout)
        self._sent_held()

    def _on_close(self) -> None:
        """Held messages get LINGER_MS to leave (close never blocks longer); counted as
        ``messages_dropped`` otherwise."""
        if self._held_size:
            try:
                if self._sock.poll(LINGER_MS, zmq.POLLOUT):
                    _SEND(self._sock, self._held_frame(), NOBLOCK)
                    self._sent_held()
            except zmq.ZMQError:
                pass
            if self._held_size:
                self._rt.counters.add("messages_dropped", len(self._held))
        super()._on_close()

    def send_many(self, bodies: Iterable[Any], timeout: float | None = None) -> None:
        """Send ``bodies`` in order, packed up to 256 a frame (batches: one puller gets each
        frame, and its receives return them one by one). Waits and raises as :meth:`send`,
        ``timeout`` counting for each frame; every body is encoded first, so an unencodable
        one or one over the limit sends nothing."""
        if self._closed:
            self._check_open()
        batches = list(self._batches(bodies))  # every body encoded before anything is sent
        self.flush(timeout)
        for frames, copy in batches:
            if self._ops:
                self._drain()
            if not self._send(frames, deadline_after(timeout), copy):
                raise NoProviderError("pipeline", self.name, timeout)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected to every puller known now (at least one); False after
        ``timeout`` s."""
        return self._wait_ready(deadline_after(timeout))


class AsyncPusher(PusherBase, AsyncConnector):
    """Sends into a pipeline from an asyncio loop, round robin over its pullers."""

    async def send(self, body: Any, timeout: float | None = None) -> None:
        """Coroutine of :meth:`Pusher.send`."""
        self._check_open()
        frames, copy = self._encode(body)
        if not await self._send(frames, deadline_after(timeout), copy):
            raise NoProviderError("pipeline", self.name, timeout)

    async def send_many(self, bodies: Iterable[Any], timeout: float | None = None) -> None:
        """Coroutine of :meth:`Pusher.send_many`."""
        self._check_open()
        for frames, copy in self._batches(bodies):
            if not await self._send(frames, deadline_after(timeout), copy):
                raise NoProviderError("pipeline", self.name, timeout)

    async def wait_ready(self, timeout: float) -> bool:
        """Coroutine twin of the sync ``wait_ready``."""
        return await self._wait_ready(deadline_after(timeout))
