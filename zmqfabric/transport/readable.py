"""Receiving from a ZeroMQ socket in an asyncio loop without pyzmq's asyncio socket, whose
receive costs several ``get(EVENTS)`` calls (about 8,000 instructions each: pyzmq builds an
enum per call) and futures per message. :class:`Receiver` waits on the socket's descriptor
itself; the request/reply hot paths use it (the asyncio requester, the asyncio services)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable, cast

import zmq

#: ``getsockopt`` and the receive as C methods, their arguments plain ints.
_GET = cast("Callable[[Any, int], int]", zmq.backend.Socket.get)
_RECV = zmq.backend.Socket.recv
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_monotonic = time.monotonic


class Receiver:
    """Receives first frames from ``sock`` in ``loop`` (the running one by default), waiting on
    a duplicate of the socket's descriptor (pyzmq's asyncio socket may have registered the
    descriptor itself: the duplicate keeps the two registrations apart).

    ZeroMQ's descriptor says only that the socket may have changed, and only once: a message
    queued behind one already taken wakes nobody. So the socket is asked (``get(EVENTS)``,
    which also clears the descriptor's signal) before each wait and after it (a wake-up may be
    for something else; a receive that finds nothing would raise zmq.Again, which costs twice
    a ``get``). The descriptor stays registered with the loop between receives (registering
    costs two system calls and a raised KeyError in asyncio): while nobody waits, a wake-up only
    clears the signal, so that the loop does not report it on every turn. One timer serves
    consecutive deadlines: it is set again only when it would fire after the new deadline, and
    one that fires early sets itself for the deadline of the receive waiting then.

    Use from the loop's thread only; one receive at a time. :meth:`close` before the socket."""

    def __init__(self, sock: zmq.Socket[Any], loop: asyncio.AbstractEventLoop | None = None,
                 ) -> None:
        self._sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._fd = os.dup(cast(int, sock.get(zmq.FD)))  # -1 once closed
        self._waiter: asyncio.Future[None] | None = None  # while a receive waits
        self._until: float | None = None  # its deadline
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False  # the descriptor is registered with the loop

    async def recv(self, deadline: float | None = None) -> bytes | None:
        """The next frame as bytes (the first of a message: see
        :func:`~zmqfabric.transport.frames.recv_frames` for the rest), or None at ``deadline``
        (monotonic, the loop's clock; None: none). Raises zmq.ZMQError as the socket's receive,
        CancelledError when closed meanwhile (or when the task is cancelled)."""
        sock = self._sock
        while not _GET(sock, _EVENTS) & _POLLIN:
            if deadline is not None and deadline <= _monotonic():
                return None
            await self._readable(deadline)
        return cast(bytes, _RECV(sock, _NOBLOCK))

    async def _readable(self, deadline: float | None) -> None:
        """Wait until the descriptor is readable or ``deadline`` has passed."""
        loop = self._loop
        if self._fd < 0:
            raise asyncio.CancelledError  # closed
        if not self._watching:
            loop.add_reader(self._fd, self._wake)
            self._watching = True
        self._until = deadline
        timer = self._timer
        if deadline is not None and (timer is None or timer.when() > deadline):
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        self._waiter = waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def check(self) -> None:
        """Call after using the socket otherwise while a receive may wait (a send from the same
        loop): that call may have taken the descriptor's signal for a message that arrived
        meanwhile, and the loop would never report it. Wakes the waiting receive if a message is
        there."""
        waiter = self._waiter
        if (waiter is not None and not waiter.done() and self._fd >= 0
                and _GET(self._sock, _EVENTS) & _POLLIN):
            waiter.set_result(None)

    def _wake(self) -> None:
        """The descriptor is readable (the loop calls this)."""
        waiter = self._waiter
        if waiter is None:
            try:
                _GET(self._sock, _EVENTS)  # clear the signal nobody waits for
            except zmq.ZMQError:  # the socket was closed first: nothing to clear
                pass
        elif not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        waiter, until = self._waiter, self._until
        if waiter is None or waiter.done() or until is None:
            return
        if until <= self._loop.time():
            waiter.set_result(None)
        else:
            self._timer = self._loop.call_at(until, self._on_timer)

    def close(self) -> None:
        """Unregister and close the descriptor; a receive waiting gets CancelledError.
        Idempotent. Call from the loop's thread, before closing the socket."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        if self._watching:
            self._watching = False
            self._loop.remove_reader(fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiter is not None:
            self._waiter.cancel()
        os.close(fd)
