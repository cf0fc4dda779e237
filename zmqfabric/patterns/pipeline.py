"""Push/pull pipelines: pullers (workers, sinks) bind a PULL socket and advertise the pipeline;
pushers connect a PUSH socket to every puller found, and ZeroMQ deals messages round robin among
the pullers that are connected (IMMEDIATE: never to a puller that is gone)."""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator

import msgpack
import zmq

from ..constants import DECODE_CHECK_SIZE, MAX_BATCH, ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.records import EndpointKind
from ..core.wire import FLOAT64, FLOAT64_AT, pack_canonical
from ..errors import MessageTooLargeError, NoProviderError, RemoteProtocolError
from ..transport.frames import (
    NOBLOCK,
    body_of,
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
#: The header frame of a large raw body as zmqfabric writes it (wire_layout's RAW_PREFIX):
#: recognised by its prefix, length, float tag and map.
_RAW = wire.RAW_PREFIX[wire.Kind.MESSAGE]
_RAW_MAP = wire.RAW_MAP
_RAW_SIZE = wire.RAW_HEADER_SIZE
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
    #: Its bodies (``_pending.bodies``): the receives' first test.
    _bodies: collections.deque[Any]
    #: Large raw bodies as memoryviews over their frames (``copy=False``), not bytes.
    _keep: bool

    def _decode(self, frames: list[bytes]) -> wire.Message | None:
        """The message in ``frames`` (the first of a batch: the rest wait in ``_pending``), or
        None (counted) when it is malformed."""
        try:
            header, body = wire.parse_frames(frames, wire.Kind.MESSAGE)
        except RemoteProtocolError as exc:
            self._refused("message", exc)
            return None
        return self._pending.first(header, body)

    def _on_close(self) -> None:
        self._pending.clear()  # a closed puller delivers nothing more
        super()._on_close()

    def _receive(self, timeout: float | None) -> Any:
        """The plan of ``recv_message``: the rest of a batch first (see Handle._receive)."""
        if self._pending:
            return self._pending.next()
        return (yield from super()._receive(timeout))


class Puller(PullerBase):
    """Receives a pipeline's messages (a worker or a sink). Owned by one thread."""

    def __init__(
        self, runtime: NodeRuntime, pipeline: str, allow: Iterable[str] | None = None,
        copy: bool = True,
    ) -> None:
        super().__init__(runtime, pipeline, zmq.PULL, allow)
        self._pending = Pending()
        #: The pending bodies' deque, tested first by ``recv`` (see Pending.bodies).
        self._bodies = self._pending.bodies
        #: ``copy=False``: a raw body of ZERO_COPY_THRESHOLD bytes or more is a memoryview over
        #: the received frame (see frames.body_of), as pyzmq's ``recv(copy=False)`` opts in.
        self._keep = not copy
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._rcvtimeo = -1  # the socket's receive timeout (ms) as last set by recv(); -1: none
        self._advertise()

    def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        """The next message, or None after ``timeout`` seconds (None: wait forever)."""
        return drive(self._receive(timeout), self._waits)

    def recv(self, timeout: float | None = None) -> Any:
        """The next body. Raises FabricTimeoutError after ``timeout`` seconds, ClosedError
        once closed."""
        bodies = self._bodies
        if bodies:  # the rest of a batch (emptied on close): no socket call
            return bodies.popleft()
        if self._closed:
            self._check_open()
        sock = self._sock
        if timeout is None:
            deadline, wait = None, -1
        else:
            deadline, wait = time.monotonic() + timeout, max(0, int(timeout * 1000))
        while True:
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
            frames = recv_rest(sock, data, self._keep)
            if len(frames) == 2 and data.startswith(_RAW) and len(data) == _RAW_SIZE and (
                data.endswith(_RAW_MAP) and data[FLOAT64_AT] == FLOAT64
            ):  # [2, 5 | 16, id, ts, {"enc": "raw"}] as zmqfabric writes it: the body as it is
                return frames[1]
            message = self._decode(frames)
            if message is not None:
                return message.body
            if deadline is not None:
                wait = ms_left(deadline) or 0

    def recv_many(self, timeout: float | None = None, max_count: int = MAX_BATCH) -> list[Any]:
        """The next bodies, in order: the one :meth:`recv` returns and those that came in the
        same frame with it (a batch of ``send_many``), at most ``max_count`` (the rest stay for
        the next receive). A message that came alone comes alone: this never waits for more.
        Waits and raises as :meth:`recv`."""
        first = self.recv(timeout)
        bodies = self._bodies
        if not bodies:
            return [first]
        return _take(first, bodies, max_count)

    def _recv(self, deadline: float | None) -> list[bytes] | None:
        """The next multipart message, or None when ``deadline`` passes (the RECV step)."""
        while True:
            try:
                return recv_frames(self._sock, NOBLOCK, self._keep)
            except zmq.Again:
                left = ms_left(deadline)
                if left == 0 or not self._poller.poll(left):
                    return None
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc

    def __iter__(self) -> Iterator[Any]:
        """Every body, as :meth:`recv` returns them (forever; ClosedError once closed)."""
        recv = self.recv
        while True:
            yield recv()


class AsyncPuller(AsyncHandle, PullerBase):
    """Receives a pipeline's messages in an asyncio loop. ``async for body in puller``."""

    def __init__(
        self, runtime: NodeRuntime, pipeline: str, allow: Iterable[str] | None = None,
        copy: bool = True,
    ) -> None:
        super().__init__(runtime, pipeline, zmq.PULL, allow)
        self._pending = Pending()
        self._bodies = self._pending.bodies
        self._keep = not copy  # as Puller's
        self._advertise()

    async def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        """Coroutine of :meth:`Puller.recv_message` (the same plan, awaited)."""
        return await drive_async(self._receive(timeout), self._waits)

    async def recv(self, timeout: float | None = None) -> Any:
        """The next body. Raises FabricTimeoutError after ``timeout`` seconds, ClosedError
        once closed."""
        if self._bodies:  # the rest of a batch (emptied on close)
            return self._bodies.popleft()
        message = await self.recv_message(timeout)
        if message is None:
            raise self._timeout(timeout)
        return message.body

    async def recv_many(
        self, timeout: float | None = None, max_count: int = MAX_BATCH
    ) -> list[Any]:
        """Coroutine of :meth:`Puller.recv_many`."""
        first = await self.recv(timeout)
        bodies = self._bodies
        if not bodies:
            return [first]
        return _take(first, bodies, max_count)

    async def _recv(self, deadline: float | None) -> list[Any] | None:
        """One multipart message, large frames after the first kept (see recv_frames), or None
        at ``deadline``."""
        frames = await self._within(self._aio_sock.recv_multipart(copy=False), deadline)
        if frames is None:
            return None
        if self._keep:
            return [frames[0].bytes, *(body_of(frame) for frame in frames[1:])]
        return [frame.bytes for frame in frames]

    async def __aiter__(self) -> AsyncIterator[Any]:
        """Every body, as :meth:`recv` returns them (forever; ClosedError once closed)."""
        while True:
            yield await self.recv()


def _take(first: Any, bodies: collections.deque[Any], max_count: int) -> list[Any]:
    """``first`` and the next bodies of ``bodies``, at most ``max_count`` in all (recv_many)."""
    if len(bodies) < max_count:
        taken = [first, *bodies]
        bodies.clear()
        return taken
    taken = [first]
    popleft = bodies.popleft
    for _ in range(max_count - 1):
        taken.append(popleft())
    return taken


class PusherBase(Encoder, Connector):
    """What the sync and the asyncio pusher share: the socket, framing."""

    kind = EndpointKind.PIPELINE
    noun = "pipeline"

    def __init__(self, runtime: NodeRuntime, pipeline: str, via: str | None = None) -> None:
        super().__init__(runtime, pipeline, zmq.PUSH, via)
        self._init_encoder(wire.Kind.MESSAGE, runtime.config.max_message_size)


class Pusher(PusherBase, SyncConnector):
    """Sends into a pipeline, round robin over its pullers. Owned by one thread.

    A message is in ZeroMQ's hands when ``send`` returns: it leaves whether or not the sender
    sends again. While every puller is HWM messages behind, ``send`` waits for room (ZeroMQ's
    backpressure). :meth:`send_many` packs messages into batch frames (docs/PROTOCOL.md, 5.7).
    The pusher does not hold messages back to batch them by itself: a message held until the
    next send was stranded when the sender went idle (the demo's pipeline lost 184 jobs)."""

    def send(self, body: Any, timeout: float | None = None) -> None:
        """Send ``body`` to one puller. Waits up to ``timeout`` s (None: forever) while no puller
        is connected or every puller is behind; then raises NoProviderError. Raises
        LocalProtocolError for a body msgpack cannot encode, MessageTooLargeError for one over
        the node's ``max_message_size`` (nothing is sent then)."""
        if self._closed:
            self._check_open()
        # Encoder._encode inlined (hot path): one frame, one send.
        if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
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
            data = pack_canonical(self._prefix, seq, FLOAT64, _now()) + packed
            try:
                _SEND(self._sock, data, NOBLOCK)
                return
            except zmq.Again:
                pass  # no puller yet, or all are HWM behind: wait below
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc
            frames, copy = [data], True
        if self._ops:
            self._drain()
        if not self._send(frames, deadline_after(timeout), copy):
            raise NoProviderError("pipeline", self.name, timeout)

    def send_many(self, bodies: Iterable[Any], timeout: float | None = None) -> None:
        """Send ``bodies`` in order, packed up to 256 a frame (batches: one puller gets each
        frame, and its receives return them one by one). Waits and raises as :meth:`send`,
        ``timeout`` counting for each frame; every body is encoded first, so an unencodable
        one or one over the limit sends nothing."""
        if self._closed:
            self._check_open()
        sock = self._sock
        for frames, copy in self._batches(bodies):  # every body encoded before anything is sent
            if self._ops:
                self._drain()
            if copy:  # one frame: tried at once (the hot path), as send does
                try:
                    _SEND(sock, frames[0], NOBLOCK)
                    continue
                except zmq.Again:
                    pass  # no puller yet, or all are HWM behind: wait below
                except zmq.ZMQError as exc:
                    raise self._zmq_error(exc) from exc
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
