"""Where the sync and the asyncio handles differ: how directory changes reach the socket's owner,
and how the owner waits. Everything a call decides is in the plans (:mod:`.plan`) and the
handle classes; the connectors below only supply the waits a plan's steps name.

- :class:`SyncConnector`, owned by one thread: discovery posts directory changes to the handle's
  :class:`~zmqfabric.transport.inbox.Inbox` (a deque of callables plus a pipe whose read end sits
  in the owner's poller next to the socket); the owner applies them before each send/receive (one
  truthiness test on the hot path) and whenever a wait is woken. Sends and receives try the
  socket without blocking first (the hot path is a plain send/receive) and poll, with a deadline,
  only when it would block.
- :class:`AsyncConnector`, owned by one event loop: ``loop.call_soon_threadsafe`` runs each change
  in the loop, and waiting is awaiting.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ..errors import ClosedError
from ..transport.frames import NOBLOCK, ms_left, recv_frames, s_left, send_frames
from ..transport.inbox import Inbox
from .base import Connector, Handle

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

#: An asyncio handle retries a disconnect that had to wait for queued input this often (s).
DEFER_DISCONNECT_S = 0.05
T = TypeVar("T")


def _send_frames(sock: zmq.Socket, frames: list[Any], copy: bool) -> bool:
    send_frames(sock, frames, NOBLOCK, copy)
    return True


class SyncConnector(Connector):
    """A connector owned by one thread; waits with a poller on the socket and its inbox.

    A disconnect that must wait for queued input stays queued (see ``Connector._apply``), so the
    inbox is made with ``always_wake``: every post writes its pipe, and a wait never spins on
    what is still queued.
    """

    def __init__(
        self, runtime: NodeRuntime, name: str, socket_type: int, via: str | None = None
    ) -> None:
        super().__init__(runtime, name, socket_type, via)
        self._inbox = Inbox(always_wake=True)
        wake = self._inbox.open()
        #: The inbox's queue: truthy while changes wait (the hot path's one test).
        self._ops = self._inbox.pending
        self._poll_in = zmq.Poller()
        self._poll_in.register(self._sock, zmq.POLLIN)
        self._poll_in.register(wake, zmq.POLLIN)
        self._poll_out = zmq.Poller()
        self._poll_out.register(self._sock, zmq.POLLOUT)
        self._poll_out.register(wake, zmq.POLLIN)
        #: Directory changes and connection events.
        self._poll_change = zmq.Poller()
        self._poll_change.register(wake, zmq.POLLIN)
        self._poll_change.register(self._monitor, zmq.POLLIN)
        self._watch()
        self._drain()

    def _post(self, op: str, url: str) -> None:
        # zeroconf's thread: queue and wake, never touch the socket.
        self._inbox.post(self._change, op, url)

    def _change(self, op: str, url: str) -> None:
        if not self._apply(op, url):
            # Retried at the next send or receive, once input has been read.
            self._inbox.defer(self._change, op, url)

    def _drain(self) -> None:
        """Apply the directory changes queued so far (owner only)."""
        self._inbox.run_pending()

    def _recv(self, deadline: float | None) -> list[bytes] | None:
        """Receive one multipart message, or None when ``deadline`` (monotonic) passes."""
        return self._when_ready(self._poll_in, recv_frames, self._sock, NOBLOCK, deadline=deadline)

    def _send(self, frames: list[Any], deadline: float | None, copy: bool = True) -> bool:
        """Send one multipart message; False when it could not go out before ``deadline``.
        ``copy`` applies to the last frame (the body); the others are small and always copied."""
        sent = self._when_ready(self._poll_out, _send_frames, self._sock, frames, copy,
                                deadline=deadline)
        return sent is not None

    def _when_ready(
        self, poller: zmq.Poller, op: Callable[..., T], *args: Any, deadline: float | None
    ) -> T | None:
        """``op(*args)``, a send or receive that raises zmq.Again when it would block: tried at
        once (the hot path: no poll), then each time ``poller`` (the socket, the inbox) wakes;
        None when ``deadline`` passes first. Directory changes are applied meanwhile."""
        while True:
            if self._ops:
                self._drain()
            try:
                return op(*args)
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise self._zmq_error(exc) from exc
            if not self._poll(poller, deadline):
                return None

    def _poll(self, poller: zmq.Poller, deadline: float | None) -> bool:
        """Sleep until ``poller`` (the socket, the inbox) has an event; False at ``deadline``."""
        timeout = ms_left(deadline)
        if timeout == 0:
            return False
        try:
            self._inbox.poll(poller, timeout)
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc
        return True

    def _wait_providers(self, deadline: float | None) -> bool:
        """Wait until at least one provider is connected; False at the deadline."""
        if self._ops:
            self._drain()
        return bool(self._urls) or self._wait_monitor(self._known, deadline)

    def _wait_change(self, deadline: float | None) -> None:
        """Wait for a directory change or a connection event, at most until ``deadline``."""
        self._poll(self._poll_change, deadline)
        self._drain()
        self._read_monitor()

    def _wait_ready(self, deadline: float | None) -> bool:
        """Wait until every provider known now has completed its connection handshake."""
        return self._wait_monitor(self._ready, deadline)

    def _wait_usable(self, deadline: float | None) -> bool:
        """Wait until a provider's handshake succeeded, or every one has finished (secured
        nodes): a provider whose handshake never completes does not hold up the ready ones."""
        return self._wait_monitor(self._usable, deadline)

    def _wait_monitor(self, done: Callable[[], bool], deadline: float | None) -> bool:
        while True:
            self._drain()
            self._read_monitor()
            if done():
                return True
            if not self._poll(self._poll_change, deadline):
                return False

    def _on_close(self) -> None:
        super()._on_close()
        self._inbox.close()


class AsyncHandle(Handle):
    """What every asyncio handle that waits shares (connectors and pullers): the RECV step, and
    errors of a wait. pyzmq cancels what waits on a socket when it closes; a coroutine awaiting
    a handle that is closed meanwhile gets ClosedError, not a cancellation it never asked for."""

    async def _recv(self, deadline: float | None) -> list[bytes] | None:
        """One multipart message, or None at ``deadline``."""
        return await self._within(self._aio_sock.recv_multipart(), deadline)

    @property
    def _aio_sock(self) -> zmq.asyncio.Socket:
        """The socket as what it is in an asyncio handle (pyzmq types it as a plain one)."""
        return cast(zmq.asyncio.Socket, self._sock)

    async def _within(self, wait: Awaitable[T], deadline: float | None) -> T | None:
        """``wait`` (a receive or send of this handle's socket), or None at ``deadline``."""
        try:
            return await asyncio.wait_for(wait, s_left(deadline))
        except asyncio.TimeoutError:
            return None
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc
        except asyncio.CancelledError:
            self._closed_meanwhile()
            raise

    def _closed_meanwhile(self) -> None:
        """On a CancelledError: raise ClosedError instead if closing this handle caused it (the
        task itself was not cancelled)."""
        task = asyncio.current_task()
        if self._closed and task is not None and not task.cancelling():
            raise ClosedError(f"{self.noun} {self.name!r} was closed while waiting") from None


class AsyncConnector(AsyncHandle, Connector):
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

    async def _send(self, frames: list[Any], deadline: float | None, copy: bool = True) -> bool:
        """Send one multipart message; False when it could not go out before ``deadline``."""
        return await self._within(self._sent(frames, copy), deadline) is not None

    async def _sent(self, frames: list[Any], copy: bool) -> bool:
        await self._aio_sock.send_multipart(frames, copy=copy)
        return True

    async def _wait_ready(self, deadline: float | None) -> bool:
        """Wait until every provider known now has completed its connection handshake."""
        return await self._wait_monitor(self._ready, deadline)

    async def _wait_usable(self, deadline: float | None) -> bool:
        """Wait until a provider's handshake succeeded, or every one has finished (secured
        nodes): a provider whose handshake never completes does not hold up the ready ones."""
        return await self._wait_monitor(self._usable, deadline)

    async def _wait_monitor(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Apply connection events until ``done()``; False at the deadline."""
        while not done():
            left = s_left(deadline)
            if left == 0:
                return False
            try:
                event: dict[str, Any] = await asyncio.wait_for(
                    cast("Awaitable[dict[str, Any]]", recv_monitor_message(self._monitor)), left
                )
            except asyncio.TimeoutError:
                return done()
            except asyncio.CancelledError:
                self._closed_meanwhile()
                raise
            self._on_monitor_event(event)
        return True

    async def _wait_providers(self, deadline: float | None) -> bool:
        """Wait until at least one provider is connected; False at the deadline (or once
        closed)."""
        while not self._urls and not self._closed:
            if not await self._wait_change(deadline):
                break
        return bool(self._urls)

    def _on_close(self) -> None:
        super()._on_close()
        self._changed.set()  # wake the waits for a change: they look at ``_closed``

    async def _wait_change(self, deadline: float | None) -> bool:
        """Wait for a directory change, at most until ``deadline``; False if none came."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), s_left(deadline))
        except asyncio.TimeoutError:
            return False
        return True
