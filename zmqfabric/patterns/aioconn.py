"""The asyncio flavour of a connector: owned by one event loop; directory changes arrive by
``call_soon_threadsafe`` and waiting is awaiting."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..transport.frames import s_left
from .base import DEFER_DISCONNECT_S, Connector

if TYPE_CHECKING:
    from ..runtime import NodeRuntime


class AsyncConnector(Connector):
    """A connector owned by one asyncio loop: directory changes arrive by call_soon_threadsafe."""

    def __init__(
        self, runtime: NodeRuntime, name: str, socket_type: int, via: str | None = None
    ) -> None:
        super().__init__(runtime, name, socket_type, via)
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._watch()

    def _post(self, op: str, url: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._apply_and_signal, op, url)
        except RuntimeError:
            pass  # loop closed: the handle is going away with it

    def _apply_and_signal(self, op: str, url: str) -> None:
        if not self._apply(op, url):
            self._loop.call_later(DEFER_DISCONNECT_S, self._apply_and_signal, op, url)
            return
        self._changed.set()

    def _watch(self) -> None:
        self._owner = threading.get_ident()
        kind, name = self._watched()
        self._unwatch = self._rt.directory.watch(kind, name, self._apply_or_post, self.via)

    def _apply_or_post(self, op: str, url: str) -> None:
        # The initial providers arrive inside watch(), in the owning loop's thread: apply them now
        # so that the first send can go out; later changes come from zeroconf's thread.
        if threading.get_ident() == self._owner:
            self._apply_and_signal(op, url)
        else:
            self._post(op, url)

    async def _recv(self, deadline: float | None) -> list[bytes] | None:
        try:
            return await asyncio.wait_for(self._sock.recv_multipart(), s_left(deadline))
        except asyncio.TimeoutError:
            return None
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc

    async def _send(self, frames: list[Any], deadline: float | None, copy: bool = True) -> bool:
        try:
            await asyncio.wait_for(self._sock.send_multipart(frames, copy=copy), s_left(deadline))
            return True
        except asyncio.TimeoutError:
            return False
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc

    async def _wait_ready(self, deadline: float | None) -> bool:
        """Wait until every provider known now has completed its connection handshake."""
        return await self._wait_monitor(self._ready, deadline)

    async def _wait_settled(self, deadline: float | None) -> bool:
        """Wait until every provider's handshake succeeded or was refused (secured nodes)."""
        return await self._wait_monitor(self._settled, deadline)

    async def _wait_monitor(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Apply connection events until ``done()``; False at the deadline."""
        while not done():
            left = s_left(deadline)
            if left == 0:
                return False
            try:
                event = await asyncio.wait_for(recv_monitor_message(self._monitor), left)
            except asyncio.TimeoutError:
                return done()
            self._on_monitor_event(event)
        return True

    async def _wait_providers(self, deadline: float | None) -> bool:
        while not self._urls:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), s_left(deadline))
            except asyncio.TimeoutError:
                return bool(self._urls)
        return True
