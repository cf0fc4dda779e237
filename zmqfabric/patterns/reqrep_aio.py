"""Request/reply from an asyncio loop: :class:`AsyncRequester`, the awaiting driver of the
request plan of :class:`~zmqfabric.patterns.reqrep.RequesterBase`, with a wait for replies of
its own (:class:`~zmqfabric.transport.readable.Receiver`, not pyzmq's asyncio socket)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import zmq

from ..transport.frames import NOBLOCK, recv_frames
from ..transport.readable import Receiver
from .plan import RECV, drive_async
from .reqrep import RequesterBase
from .waiting import AsyncConnector

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

_monotonic = time.monotonic
#: Body types that are never raw bytes (one set lookup, cheaper than isinstance).
_PACKED = frozenset({dict, list, tuple, str, int, float, bool, type(None)})


class AsyncRequester(RequesterBase, AsyncConnector):
    """Calls one service by name from one asyncio loop.

    Replies are awaited by a :class:`~zmqfabric.transport.readable.Receiver` (on the socket's
    descriptor), not through pyzmq's asyncio socket."""

    steps = {**AsyncConnector.steps, RECV: "_await_reply"}

    def __init__(self, runtime: NodeRuntime, service: str, via: str | None = None) -> None:
        super().__init__(runtime, service, via)
        self._replies = Receiver(self._out, self._loop)

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
                    ok, result = self._match(reply, msg_id)
                    if ok:
                        return result
                raise self._failure(timeout, 1)
            timeout = max(0.0, deadline - _monotonic())  # none took it: the plan waits
        return await drive_async(self._plan(body, timeout, retries), self._waits)

    async def _await_reply(self, deadline: float | None) -> list[bytes] | None:
        """The frames of the next message on the socket after its routing id (see
        :meth:`~zmqfabric.patterns.reqrep.Requester._await_reply`), or None at ``deadline``
        (None: no deadline): the routing id by the :class:`Receiver`, the rest, there with it,
        at once.
        Raises ClosedError when the handle is closed meanwhile. Call from the loop's thread."""
        try:
            if await self._replies.recv(deadline) is None:  # the routing id, not needed
                return None
            return recv_frames(self._out, NOBLOCK)  # the rest is there with it
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc
        except asyncio.CancelledError:
            self._closed_meanwhile()
            raise

    def _on_close(self) -> None:
        super()._on_close()
        self._replies.close()  # the waiting request raises ClosedError (_closed_meanwhile)
