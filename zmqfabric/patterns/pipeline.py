"""Push/pull pipelines: pullers (workers, sinks) bind a PULL socket and advertise the pipeline;
pushers connect a PUSH socket to every puller found, and ZeroMQ deals messages round robin among
the pullers that are connected (IMMEDIATE: never to a puller that is gone)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator

import zmq

from ..core import wire
from ..core.records import EndpointKind
from ..errors import FabricTimeoutError, NoProviderError, RemoteProtocolError
from .base import AsyncConnector, Bound, SyncConnector, _ms_left, _s_left, deadline_after
from .pubsub import _Encoder

if TYPE_CHECKING:
    from ..nodebase import NodeBase


class _PullerBase(Bound):
    kind = EndpointKind.PIPELINE
    noun = "pipeline"

    def _decode(self, frames: list[bytes]) -> wire.Message | None:
        try:
            return wire.parse_message(frames)
        except RemoteProtocolError as exc:
            self._refused("message", exc)
            return None


class Puller(_PullerBase):
    """Receives a pipeline's messages (a worker or a sink). Owned by one thread."""

    def __init__(self, node: NodeBase, pipeline: str, allow: Iterable[str] | None = None) -> None:
        super().__init__(node, pipeline, zmq.PULL, allow)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._advertise()

    def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        """The next message, or None after ``timeout`` seconds (None: wait forever)."""
        self._check_open()
        deadline = deadline_after(timeout)
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                left = _ms_left(deadline)
                if left == 0 or not self._poller.poll(left):
                    return None
                continue
            message = self._decode(frames)
            if message is not None:
                return message

    def recv(self, timeout: float | None = None) -> Any:
        """The next body. Raises FabricTimeoutError after ``timeout`` seconds."""
        message = self.recv_message(timeout)
        if message is None:
            raise FabricTimeoutError(f"no message on pipeline {self.name!r} within {timeout} s",
                                     timeout=timeout)
        return message.body

    def __iter__(self) -> Iterator[Any]:
        while (message := self.recv_message()) is not None:
            yield message.body


class AsyncPuller(_PullerBase):
    def __init__(self, node: NodeBase, pipeline: str, allow: Iterable[str] | None = None) -> None:
        super().__init__(node, pipeline, zmq.PULL, allow)
        self._advertise()

    async def recv_message(self, timeout: float | None = None) -> wire.Message | None:
        self._check_open()
        deadline = deadline_after(timeout)
        while True:
            try:
                frames = await asyncio.wait_for(self._sock.recv_multipart(), _s_left(deadline))
            except asyncio.TimeoutError:
                return None
            message = self._decode(frames)
            if message is not None:
                return message

    async def recv(self, timeout: float | None = None) -> Any:
        message = await self.recv_message(timeout)
        if message is None:
            raise FabricTimeoutError(f"no message on pipeline {self.name!r} within {timeout} s",
                                     timeout=timeout)
        return message.body

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (message := await self.recv_message()) is not None:
            yield message.body


class Pusher(_Encoder, SyncConnector):
    """Sends into a pipeline, round robin over its pullers. Owned by one thread."""

    kind = EndpointKind.PIPELINE
    noun = "pipeline"

    def __init__(self, node: NodeBase, pipeline: str, via: str | None = None) -> None:
        SyncConnector.__init__(self, node, pipeline, zmq.PUSH, via)
        self._init_encoder(wire.Kind.MESSAGE)

    def send(self, body: Any, timeout: float | None = None) -> None:
        """Send ``body`` to one puller. Waits up to ``timeout`` s (None: forever) while no puller
        is connected or all are HWM messages behind; then raises NoProviderError."""
        self._check_open()
        frames, copy = self._encode(body)
        if not self._send(frames, deadline_after(timeout), copy):
            raise NoProviderError("pipeline", self.name, timeout)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected to every puller known now (at least one); False after
        ``timeout`` s."""
        return self._wait_ready(deadline_after(timeout))


class AsyncPusher(_Encoder, AsyncConnector):
    kind = EndpointKind.PIPELINE
    noun = "pipeline"

    def __init__(self, node: NodeBase, pipeline: str, via: str | None = None) -> None:
        AsyncConnector.__init__(self, node, pipeline, zmq.PUSH, via)
        self._init_encoder(wire.Kind.MESSAGE)

    async def send(self, body: Any, timeout: float | None = None) -> None:
        self._check_open()
        frames, copy = self._encode(body)
        if not await self._send(frames, deadline_after(timeout), copy):
            raise NoProviderError("pipeline", self.name, timeout)

    async def wait_ready(self, timeout: float) -> bool:
        """Coroutine twin of the sync ``wait_ready``."""
        return await self._wait_ready(deadline_after(timeout))
