"""Request/reply from an asyncio loop: :class:`AsyncRequester`, the awaiting driver of the
request plan of :class:`~zmqfabric.patterns.reqrep.RequesterBase`, with a wait for replies of
its own (on the socket's ZeroMQ descriptor, not through pyzmq's asyncio socket)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Callable, cast

import zmq

from ..transport.frames import NOBLOCK, recv_frames
from .plan import RECV, drive_async
from .reqrep import RequesterBase
from .waiting import AsyncConnector

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

_monotonic = time.monotonic
#: The C-level receive (a routing id as bytes) and ``getsockopt``, its arguments plain ints.
_RECV = zmq.backend.Socket.recv
_GET = cast("Callable[[Any, int], int]", zmq.backend.Socket.get)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
#: Body types that are never raw bytes (one set lookup, cheaper than isinstance).
_PACKED = frozenset({dict, list, tuple, str, int, float, bool, type(None)})


class AsyncRequester(RequesterBase, AsyncConnector):
    """Calls one service by name from one asyncio loop.

    Replies are awaited on a duplicate of the socket's ZeroMQ file descriptor registered with
    the loop (see :meth:`_readable`), not through pyzmq's asyncio socket: that one costs
    several ``get(EVENTS)`` calls and futures per message (about 8,000 instructions each get).
    The duplicate keeps pyzmq's own registration of the descriptor, if it made one, apart."""

    steps = {**AsyncConnector.steps, RECV: "_await_reply"}

    def __init__(self, runtime: NodeRuntime, service: str, via: str | None = None) -> None:
        super().__init__(runtime, service, via)
        #: The descriptor waited on (see the class docstring); -1 once closed.
        self._fd = os.dup(cast(int, self._out.get(zmq.FD)))
        #: What a wait for the descriptor awaits (None while no request waits), until when,
        #: and whether the descriptor is registered with the loop (see _readable).
        self._waiter: asyncio.Future[None] | None = None
        self._until: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False

    async def request(self, body: Any, timeout: float | None = None, retries: int = 0) -> Any:
        """Coroutine of :meth:`Requester.request` (the same plan, awaited)."""
        if retries == 0 and self._routes and not self._secured and type(body) in _PACKED:
            # Hot path, as the sync one: one attempt to a connected provider without the
            # generator and the driver.
            if self._closed:
                self._check_open()
            if timeout is None:
                timeout = self._rt.config.request_timeout_s
            msg_id, sent = self._send_packed(body)
            deadline = _monotonic() + timeout
            if sent is not None:
                while (reply := await self._await_reply(deadline)) is not None:
                    ok, result = self._match(reply[1:], msg_id)
                    if ok:
                        return result
                raise self._failure(timeout, 1)
            timeout = max(0.0, deadline - _monotonic())  # none took it: the plan waits
        return await drive_async(self._plan(body, timeout, retries), self._waits)

    async def _await_reply(self, deadline: float | None) -> list[bytes] | None:
        """The next message on the socket, or None at ``deadline`` (None: no deadline).

        ZeroMQ's descriptor says only that the socket may have changed, and only once: a
        message queued behind one already taken wakes nobody. So the socket is asked
        (``get(EVENTS)``, which also clears the descriptor's pending signal) before each wait
        on the descriptor, and again after it (a wake-up may be for something else: a
        receive that finds nothing would cost a raised zmq.Again, twice a ``get``).
        Raises ClosedError when the handle is closed meanwhile. Call from the loop's thread."""
        sock = self._out
        try:
            while not _GET(sock, _EVENTS) & _POLLIN:
                if deadline is not None and deadline <= _monotonic():
                    return None
                await self._readable(deadline)
            route = _RECV(sock, NOBLOCK)
            frames = recv_frames(sock, NOBLOCK)  # the rest is there once the first frame is
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc
        except asyncio.CancelledError:
            self._closed_meanwhile()
            raise
        if frames:
            frames.insert(0, route)
        return frames

    async def _readable(self, deadline: float | None) -> None:
        """Wait until the socket's descriptor is readable or ``deadline`` (monotonic, the loop's
        clock; None: none) has passed. Raises CancelledError when the handle is closed
        meanwhile.

        The descriptor stays registered with the loop between waits (registering costs two
        system calls and a raised KeyError in asyncio), and one timer serves consecutive waits:
        it is set again only when it would fire after the deadline, and a timer that fires
        before the wait's deadline sets itself again (deadlines of consecutive requests grow, as
        with ``sticky_rcvtimeo``)."""
        loop = self._loop
        if not self._watching:
            loop.add_reader(self._fd, self._wake)
            self._watching = True
        self._until = deadline
        if deadline is not None and (self._timer is None or self._timer.when() > deadline):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        self._waiter = waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        """The descriptor is readable (the loop calls this): wake the waiting request; with
        none waiting, clear the descriptor's signal (``get(EVENTS)``), which the loop would
        otherwise report again on every turn."""
        waiter = self._waiter
        if waiter is None:
            if not self._closed:
                _GET(self._out, _EVENTS)
        elif not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        """The timer of :meth:`_readable` (the loop calls this)."""
        self._timer = None
        waiter, until = self._waiter, self._until
        if waiter is None or waiter.done() or until is None:
            return
        if until <= self._loop.time():
            waiter.set_result(None)
        else:
            self._timer = self._loop.call_at(until, self._on_timer)

    def _on_close(self) -> None:
        super()._on_close()
        fd, self._fd = self._fd, -1
        if self._watching:
            self._watching = False
            self._loop.remove_reader(fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiter is not None:
            self._waiter.cancel()  # the waiting request raises ClosedError (_closed_meanwhile)
        os.close(fd)
