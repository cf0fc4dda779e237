"""Push/pull pipelines: pullers (workers, sinks) bind a PULL socket and advertise the pipeline;
pushers connect a PUSH socket to every puller found, and ZeroMQ deals messages round robin among
the pullers that are connected (IMMEDIATE: never to a puller that is gone)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator

import msgpack
import zmq

from ..constants import ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.records import EndpointKind
from ..core.wire import FLOAT64, FLOAT64_AT, HEADER_SIZE, pack_canonical, unpack_canonical
from ..errors import MessageTooLargeError, NoProviderError, RemoteProtocolError
from ..transport.frames import (
    NOBLOCK,
    deadline_after,
    ms_left,
    recv_frames,
    sticky_rcvtimeo,
)
from .base import Bound, Connector
from .encoder import BINARY, Encoder
from .plan import drive, drive_async
from .waiting import AsyncConnector, AsyncHandle, SyncConnector

# Hot path (see wire's canonical header): the pre-packed header prefix.
_MESSAGE = wire.HEADER_PREFIX[wire.Kind.MESSAGE]
#: The C-level receive (no attribute lookup through pyzmq's Socket classes) and msgpack's decoder.
_RECV = zmq.backend.Socket.recv
_SEND = zmq.backend.Socket.send
_NOBLOCK_MORE = NOBLOCK | int(zmq.SNDMORE)
_UNPACKB = msgpack.unpackb
#: The clock of message timestamps, without the module attribute lookup (hot path).
_now = time.time

if TYPE_CHECKING:
    from ..runtime import NodeRuntime


class PullerBase(Bound):
    """What the sync and the asyncio puller share: binding, decoding."""

    kind = EndpointKind.PIPELINE
    noun = "pipeline"

    def _decode(self, frames: list[bytes]) -> wire.Message | None:
        """The message in ``frames``, or None (counted) when it is malformed."""
        try:
            if len(frames) == 2:  # fast path: [canonical message header, msgpack body]
                header = frames[0]
                if (len(header) == HEADER_SIZE and header.startswith(_MESSAGE)
                        and header[FLOAT64_AT] == FLOAT64):
                    _, msg_id, _, timestamp = unpack_canonical(header)
                    return wire.Message(wire.Kind.MESSAGE, msg_id, timestamp,
                                        wire.unpack_body(frames[1]))
            return wire.parse_message(frames)
        except RemoteProtocolError as exc:
            self._refused("message", exc)
            return None


class Puller(PullerBase):
    """Receives a pipeline's messages (a worker or a sink). Owned by one thread."""

    def __init__(
        self, runtime: NodeRuntime, pipeline: str, allow: Iterable[str] | None = None
    ) -> None:
        super().__init__(runtime, pipeline, zmq.PULL, allow)
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
            # Hot path, as a raw PULL does it: one blocking receive with the socket's receive
            # timeout (a puller has no directory changes to watch, so nothing else to poll).
            # The header comes as a zmq Frame, whose ``more`` is cheaper than
            # getsockopt(RCVMORE); the body of a canonical header comes as bytes, unchecked:
            # frames after it (a malformed message) are read next as a message of their own
            # (see the wire spec), so nothing of another message is ever mixed in.
            if wait != self._rcvtimeo:  # a call only when the wait changes (see sticky_rcvtimeo)
                self._rcvtimeo = sticky_rcvtimeo(sock, self._rcvtimeo, wait)
            try:
                head = _RECV(sock, 0, False)
            except zmq.Again:
                raise self._timeout(timeout) from None
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc
            header = head.bytes
            if not head.more:
                frames = [header]
            elif (len(header) == HEADER_SIZE and header[FLOAT64_AT] == FLOAT64
                  and header.startswith(_MESSAGE)):
                data = _RECV(sock, NOBLOCK)  # the rest of a message is there with its first frame
                try:
                    return _UNPACKB(data, raw=False, strict_map_key=False)
                except Exception as exc:  # wire.unpack_body inlined: its catch, its error
                    self._refused("message", wire.undecodable(exc))
                    if deadline is not None:
                        wait = ms_left(deadline) or 0
                    continue
            else:
                frames = [header]
                part = head
                while part.more:
                    part = _RECV(sock, NOBLOCK, False)
                    frames.append(part.bytes)
            message = self._decode(frames)
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
    """Sends into a pipeline, round robin over its pullers. Owned by one thread."""

    def send(self, body: Any, timeout: float | None = None) -> None:
        """Send ``body`` to one puller. Waits up to ``timeout`` s (None: forever) while no puller
        is connected or all are HWM messages behind; then raises NoProviderError. Raises
        LocalProtocolError for a body msgpack cannot encode, MessageTooLargeError for one over
        the node's ``max_message_size`` (nothing is sent then)."""
        if self._closed:
            self._check_open()
        # Encoder._encode and send_frames inlined (hot path).
        if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
            header, copy = self._raw_header(body), False
        else:
            self._seq = seq = self._seq + 1
            try:
                body = self._pack(body)
            except wire.PACK_ERRORS as exc:
                raise wire.unencodable(exc) from exc
            if len(body) > self._limit:
                raise MessageTooLargeError(len(body), self._limit)
            header = pack_canonical(self._prefix, seq, FLOAT64, _now())
            copy = True
        if self._ops:
            self._drain()
        sock = self._sock
        try:
            # Once ZeroMQ takes the first frame it takes the whole message: only this can fail.
            _SEND(sock, header, _NOBLOCK_MORE)
            _SEND(sock, body, NOBLOCK, copy)
            return
        except zmq.Again:
            pass  # no puller yet, or all are HWM behind: wait (below) with a deadline
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc
        if not self._send([header, body], deadline_after(timeout), copy):
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

    async def wait_ready(self, timeout: float) -> bool:
        """Coroutine twin of the sync ``wait_ready``."""
        return await self._wait_ready(deadline_after(timeout))
