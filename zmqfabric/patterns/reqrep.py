"""Request/reply: services (ROUTER, bound and advertised) and requesters (DEALER, connected to
every provider, load-balanced round robin; replies matched by message id, so a late answer to an
abandoned attempt is dropped rather than returned to the wrong call)."""

from __future__ import annotations

import inspect
import itertools
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import zmq

from ..core import wire
from ..core.records import EndpointKind
from ..errors import (
    AuthorizationError,
    LocalProtocolError,
    NoProviderError,
    RemoteError,
    RemoteProtocolError,
    RequestTimeoutError,
)
from ..sockets import sync_view
from .base import AsyncConnector, Bound, SyncConnector, deadline_after

if TYPE_CHECKING:
    from ..nodebase import NodeBase

log = logging.getLogger(__name__)
Handler = Callable[[Any], Any]


class ServiceEndpoint(Bound):
    """One reply service: a bound ROUTER and its handler. Served by the node's serve loop."""

    kind = EndpointKind.REPLY
    noun = "service"

    def __init__(
        self, node: NodeBase, name: str, handler: Handler, allow: Iterable[str] | None = None
    ) -> None:
        super().__init__(node, name, zmq.ROUTER, allow)
        self.handler = handler
        self.socket = self._sock
        self._reply_sock = sync_view(self._sock)
        self._advertise()

    def parse(self, frames: list[bytes]) -> tuple[list[bytes], wire.Header, Any] | None:
        """Split and decode a request. Malformed input is counted and, when the route is
        readable, answered with an error reply (repeating the request's id if its header is
        readable); returns None then."""
        try:
            route, payload = wire.split_route(frames)
        except RemoteProtocolError as exc:
            self._refused("request", exc)
            return None
        try:
            header, body = wire.parse_request(payload)
        except RemoteProtocolError as exc:
            self._refused("request", exc)
            try:
                msg_id = wire.unpack_header(payload[0]).msg_id if payload else 0
            except RemoteProtocolError:
                msg_id = 0
            self.reply_error(route, msg_id, exc, refused=True)
            return None
        return route, header, body

    def serve(self, frames: list[bytes]) -> None:
        """Answer one request with the (sync) handler. Never raises for bad input."""
        parsed = self.parse(frames)
        if parsed is None:
            return
        route, header, body = parsed
        try:
            result = self.handler(body)
        except Exception as exc:
            log.debug("service %s handler raised", self.name, exc_info=True)
            self.reply_error(route, header.msg_id, exc)
        else:
            self.reply(route, header.msg_id, result)

    async def serve_async(self, frames: list[bytes]) -> None:
        """Answer one request; the handler may be a coroutine function."""
        parsed = self.parse(frames)
        if parsed is None:
            return
        route, header, body = parsed
        try:
            result = self.handler(body)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.debug("service %s handler raised", self.name, exc_info=True)
            self.reply_error(route, header.msg_id, exc)
        else:
            self.reply(route, header.msg_id, result)

    def reply(self, route: list[bytes], msg_id: int, result: Any) -> None:
        try:
            body = wire.pack_body(result)
        except LocalProtocolError as exc:
            self.reply_error(route, msg_id, exc)
            return
        self._send(route + [wire.pack_header(wire.Kind.REPLY, msg_id, time.time()), body])

    def reply_error(
        self, route: list[bytes], msg_id: int, exc: BaseException, refused: bool = False
    ) -> None:
        self._node.counters.add("refused_request_replies" if refused else "handler_errors")
        header = wire.pack_header(wire.Kind.ERROR, msg_id, time.time())
        self._send(route + [header, wire.pack_body(wire.error_body(exc))])

    def _send(self, frames: list[bytes]) -> None:
        try:
            self._reply_sock.send_multipart(frames, zmq.NOBLOCK)
            self._node.counters.add("replies_sent")
        except zmq.ZMQError:  # client vanished (ROUTER_MANDATORY) or its queue is full
            self._node.counters.add("replies_undeliverable")


class _RequesterBase:
    """Shared by the sync and asyncio requesters: encoding and reply matching."""

    kind = EndpointKind.REPLY
    noun = "service"
    name: str
    _node: NodeBase

    def _setup(self) -> None:
        self._ids = itertools.count(random.getrandbits(40))
        self._secured = self._node.config.keys is not None

    def _frames(self, body: Any) -> tuple[int, list[bytes]]:
        msg_id = next(self._ids)
        header = wire.pack_header(wire.Kind.REQUEST, msg_id, time.time())
        return msg_id, [b"", header, wire.pack_body(body)]

    def _match(self, frames: list[bytes], msg_id: int) -> tuple[bool, Any]:
        """(True, body) for our reply; (False, None) for stale or malformed replies.
        Raises RemoteError for an error reply to our request."""
        try:
            header, body = wire.parse_reply(frames)
        except RemoteProtocolError as exc:
            self._refused("reply", exc)  # type: ignore[attr-defined]
            return False, None
        if header.msg_id != msg_id:
            self._node.counters.add("stale_replies")
            return False, None
        if header.kind is wire.Kind.ERROR:
            raise RemoteError(self.name, body["type"], body["message"])
        return True, body

    def _timeouts(self, timeout: float | None) -> float:
        return self._node.config.request_timeout_s if timeout is None else timeout

    def _failure(self, timeout: float, attempts: int) -> Exception:
        """The error for a request that got no answer: refused by every provider, or timed out."""
        self._read_monitor()  # type: ignore[attr-defined]
        refused = self._all_refused()  # type: ignore[attr-defined]
        if refused:
            return AuthorizationError("service", self.name, self._node._server_names(refused))
        return RequestTimeoutError(self.name, timeout, attempts, len(self._urls))  # type: ignore[attr-defined]


class Requester(_RequesterBase, SyncConnector):
    """Calls one service by name. Owned by one thread; not thread-safe."""

    def __init__(self, node: NodeBase, service: str, via: str | None = None) -> None:
        SyncConnector.__init__(self, node, service, zmq.DEALER, via)
        self._setup()

    def request(self, body: Any, timeout: float | None = None, retries: int = 0) -> Any:
        """Send ``body`` to one provider and return its reply.

        Each attempt waits ``timeout`` seconds (default: the node's request timeout); on no answer,
        up to ``retries`` more attempts go to the next provider. Raises NoProviderError,
        RequestTimeoutError, RemoteError (the handler raised), ClosedError.
        """
        self._check_open()
        timeout = self._timeouts(timeout)
        for attempt in range(1, retries + 2):
            deadline = deadline_after(timeout)
            if not self._wait_providers(deadline):
                raise NoProviderError("service", self.name, timeout)
            if self._secured and not self._settled():
                self._wait_settled(deadline)  # new connections: learn of refusals at once
                if self._all_refused():
                    break
            msg_id, frames = self._frames(body)
            if not self._send(frames, deadline):
                continue
            while (reply := self._recv(deadline)) is not None:
                ok, result = self._match(reply, msg_id)
                if ok:
                    return result
        raise self._failure(timeout, attempt)


class AsyncRequester(_RequesterBase, AsyncConnector):
    """Calls one service by name from one asyncio loop."""

    def __init__(self, node: NodeBase, service: str, via: str | None = None) -> None:
        AsyncConnector.__init__(self, node, service, zmq.DEALER, via)
        self._setup()

    async def request(self, body: Any, timeout: float | None = None, retries: int = 0) -> Any:
        """Coroutine twin of :meth:`Requester.request`."""
        self._check_open()
        timeout = self._timeouts(timeout)
        for attempt in range(1, retries + 2):
            deadline = deadline_after(timeout)
            if not await self._wait_providers(deadline):
                raise NoProviderError("service", self.name, timeout)
            msg_id, frames = self._frames(body)
            if not await self._send(frames, deadline):
                continue
            while (reply := await self._recv(deadline)) is not None:
                ok, result = self._match(reply, msg_id)
                if ok:
                    return result
        raise self._failure(timeout, attempt)

