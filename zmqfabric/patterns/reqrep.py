"""Request/reply: services (ROUTER, bound and advertised) and requesters (ROUTER, connected to
every provider, load-balanced round robin; replies matched by message id, so a late answer to an
abandoned attempt is dropped rather than returned to the wrong call)."""

from __future__ import annotations

import asyncio
import errno
import inspect
import itertools
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import msgpack
import zmq

from ..constants import ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.records import EndpointKind
from ..core.wire import FLOAT64, FLOAT64_AT, HEADER_SIZE, pack_canonical, unpack_canonical
from ..errors import (
    AuthorizationError,
    LocalProtocolError,
    NoProviderError,
    RemoteError,
    RemoteProtocolError,
    RequestTimeoutError,
)
from ..transport.frames import (
    NOBLOCK,
    deadline_after,
    ms_left,
    recv_frames,
    s_left,
    send_frames,
    sticky_rcvtimeo,
)
from ..transport.sockets import sync_view
from .aioconn import AsyncConnector
from .base import Bound, SyncConnector
from .encoder import BINARY

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

log = logging.getLogger(__name__)
Handler = Callable[[Any], Any]

# Hot path (see wire's canonical header): pre-packed header prefixes.
_REQUEST = wire.HEADER_PREFIX[wire.Kind.REQUEST]
_REPLY = wire.HEADER_PREFIX[wire.Kind.REPLY]


def _encode(
    pack: Callable[[Any], bytes], kind: wire.Kind, prefix: bytes, msg_id: int, body: Any
) -> tuple[bytes, Any, bool]:
    """(header, body frame, copy flag) of one request or reply. Bytes bodies of at least
    ZERO_COPY_THRESHOLD travel raw and uncopied; others as msgpack with a canonical header.
    Raises LocalProtocolError for a body msgpack cannot encode."""
    if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
        return wire.pack_header(kind, msg_id, time.time(), wire.RAW_HEADERS), body, False
    try:
        data = pack(body)
    except wire.PACK_ERRORS as exc:
        raise wire.unencodable(exc) from exc
    return pack_canonical(prefix, msg_id, FLOAT64, time.time()), data, True


class ServiceEndpoint(Bound):
    """One reply service: a bound ROUTER and its handler. Served by the node's serve loop."""

    kind = EndpointKind.REPLY
    noun = "service"
    sent_counter = "replies_sent"  # the control endpoint counts its own (not traffic)

    def __init__(
        self, runtime: NodeRuntime, name: str, handler: Handler, allow: Iterable[str] | None = None
    ) -> None:
        super().__init__(runtime, name, zmq.ROUTER, allow)
        self.handler = handler
        self.socket = self._sock
        self._reply_sock = sync_view(self._sock)
        self._pack = msgpack.Packer().pack  # one Packer per handle: packb builds one per call
        self._advertise()

    def _request(self, frames: list[bytes]) -> tuple[list[bytes], int, Any] | None:
        """(route, msg_id, body) of a request, or None when it was refused (see ``parse``)."""
        # Fast path: [identity, "", canonical request header, msgpack body] from one DEALER hop.
        if len(frames) == 4 and not frames[1]:
            head = frames[2]
            if (len(head) == HEADER_SIZE and head.startswith(_REQUEST)
                    and head[FLOAT64_AT] == FLOAT64):
                try:
                    return frames[:2], unpack_canonical(head)[1], wire.unpack_body(frames[3])
                except RemoteProtocolError:
                    pass  # parse() below refuses it, counts it and answers with an error
        parsed = self.parse(frames)
        if parsed is None:
            return None
        route, header, body = parsed
        return route, header.msg_id, body

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
        request = self._request(frames)
        if request is None:
            return
        route, msg_id, body = request
        try:
            result = self.handler(body)
        except Exception as exc:
            log.debug("service %s handler raised", self.name, exc_info=True)
            self.reply_error(route, msg_id, exc)
        else:
            self.reply(route, msg_id, result)

    async def serve_async(self, frames: list[bytes]) -> None:
        """Answer one request; the handler may be a coroutine function."""
        request = self._request(frames)
        if request is None:
            return
        route, msg_id, body = request
        try:
            result = self.handler(body)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.debug("service %s handler raised", self.name, exc_info=True)
            self.reply_error(route, msg_id, exc)
        else:
            self.reply(route, msg_id, result)

    def reply(self, route: list[bytes], msg_id: int, result: Any) -> None:
        try:
            header, body, copy = _encode(self._pack, wire.Kind.REPLY, _REPLY, msg_id, result)
        except LocalProtocolError as exc:
            self.reply_error(route, msg_id, exc)
            return
        self._send(route + [header, body], copy)

    def reply_error(
        self, route: list[bytes], msg_id: int, exc: BaseException, refused: bool = False
    ) -> None:
        self._rt.counters.add("refused_request_replies" if refused else "handler_errors")
        header = wire.pack_header(wire.Kind.ERROR, msg_id, time.time())
        self._send(route + [header, wire.pack_body(wire.error_body(exc))])

    def _send(self, frames: list[Any], copy: bool = True) -> None:
        try:
            send_frames(self._reply_sock, frames, NOBLOCK, copy)
            self._rt.counters.add(self.sent_counter)
        except zmq.ZMQError:  # client vanished (ROUTER_MANDATORY) or its queue is full
            self._rt.counters.add("replies_undeliverable")


class _RequesterBase:
    """Shared by the sync and asyncio requesters: encoding, choosing the provider, matching replies.

    A requester is a ROUTER connected to every provider with the provider's URL as its routing
    id, so it picks the provider of each request itself: round robin over the providers it is
    connected to, and a retry goes to another provider than the attempt before (a DEALER's round
    robin may send it to the same one again)."""

    _rt: NodeRuntime

    kind = EndpointKind.REPLY
    noun = "service"
    routed = True
    name: str
    _runtime: NodeRuntime
    _urls: set[str]
    _sock: zmq.Socket

    def _setup(self) -> None:
        self._turn = random.randrange(1 << 16)  # fresh requesters do not all start at one provider
        self._ids = itertools.count(random.getrandbits(40))
        self._secured = self._rt.config.keys is not None
        self._pack = msgpack.Packer().pack

    def _frames(self, body: Any) -> tuple[int, list[Any], bool]:
        """(message id, frames, copy flag) of a new request."""
        msg_id = next(self._ids)
        header, data, copy = _encode(self._pack, wire.Kind.REQUEST, _REQUEST, msg_id, body)
        return msg_id, [b"", header, data], copy

    def _match(self, frames: list[bytes], msg_id: int) -> tuple[bool, Any]:
        """(True, body) for our reply; (False, None) for stale or malformed replies.
        Raises RemoteError for an error reply to our request."""
        # Fast path: ["", canonical reply header, msgpack body].
        if len(frames) == 3 and not frames[0]:
            head = frames[1]
            if (len(head) == HEADER_SIZE and head.startswith(_REPLY)
                    and head[FLOAT64_AT] == FLOAT64):
                try:  # the body first, as parse_reply: a malformed reply is refused, stale or not
                    body = wire.unpack_body(frames[2])
                except RemoteProtocolError as exc:
                    self._refused("reply", exc)  # type: ignore[attr-defined]
                    return False, None
                if unpack_canonical(head)[1] != msg_id:
                    self._rt.counters.add("stale_replies")
                    return False, None
                return True, body
        try:
            header, body = wire.parse_reply(frames)
        except RemoteProtocolError as exc:
            self._refused("reply", exc)  # type: ignore[attr-defined]
            return False, None
        if header.msg_id != msg_id:
            self._rt.counters.add("stale_replies")
            return False, None
        if header.kind is wire.Kind.ERROR:
            raise RemoteError(self.name, body["type"], body["message"])
        return True, body

    def _send_to_one(self, frames: list[Any], copy: bool, avoid: str | None) -> str | None:
        """Send to the next provider in turn that is connected, ``avoid`` only if no other one
        is; return its URL, or None when none is connected now. Never blocks."""
        order = sorted(self._urls)
        count = len(order)
        if not count:
            return None
        start = self._turn % count
        turns = [order[(start + k) % count] for k in range(count)]
        if avoid in self._urls and count > 1:
            turns.remove(avoid)
            turns.append(avoid)
        sock = sync_view(self._sock)
        for url in turns:
            try:
                send_frames(sock, [url.encode(), *frames], NOBLOCK, copy)
            except zmq.ZMQError as exc:
                if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                    continue  # not connected (yet), or that provider's queue is full
                raise self._zmq_error(exc) from exc  # type: ignore[arg-type]
            self._turn = order.index(url) + 1
            return url
        return None

    def _timeouts(self, timeout: float | None) -> float:
        return self._rt.config.request_timeout_s if timeout is None else timeout

    def _failure(self, timeout: float, attempts: int) -> Exception:
        """The error for a request that got no answer: refused by every provider, or timed out."""
        self._read_monitor()  # type: ignore[attr-defined]
        refused = self._all_refused()  # type: ignore[attr-defined]
        if refused:
            return AuthorizationError("service", self.name, self._rt.server_names(refused))
        return RequestTimeoutError(self.name, timeout, attempts, len(self._urls))  # type: ignore[attr-defined]


class Requester(_RequesterBase, SyncConnector):
    """Calls one service by name. Owned by one thread; not thread-safe."""

    def __init__(self, runtime: NodeRuntime, service: str, via: str | None = None) -> None:
        SyncConnector.__init__(self, runtime, service, zmq.ROUTER, via)
        self._setup()
        self._rcvtimeo = -1  # the socket's receive timeout (ms) as last set; -1: none

    def request(self, body: Any, timeout: float | None = None, retries: int = 0) -> Any:
        """Send ``body`` to one provider and return its reply.

        Each attempt waits ``timeout`` seconds (default: the node's request timeout); on no answer,
        up to ``retries`` more attempts go to the next provider. Raises NoProviderError,
        RequestTimeoutError, RemoteError (the handler raised), ClosedError.
        """
        self._check_open()
        timeout = self._timeouts(timeout)
        last: str | None = None
        for attempt in range(1, retries + 2):
            deadline = deadline_after(timeout)
            if not self._wait_providers(deadline):
                raise NoProviderError("service", self.name, timeout)
            if self._secured:
                if not self._settled():
                    self._wait_settled(deadline)  # new connections: learn of refusals at once
                else:
                    self._read_monitor()  # refusals (or successes) since the last call
                if self._all_refused():
                    break
            msg_id, frames, copy = self._frames(body)
            last = self._send_routed(frames, deadline, copy, last)
            if last is None:
                continue
            while (reply := self._await_reply(deadline)) is not None:
                ok, result = self._match(reply[1:], msg_id)
                if ok:
                    return result
        raise self._failure(timeout, attempt)

    def _send_routed(
        self, frames: list[Any], deadline: float, copy: bool, avoid: str | None
    ) -> str | None:
        """Send to one connected provider (see ``_send_to_one``); while none is connected yet,
        wait for a directory change or a connection, at most until ``deadline``."""
        while True:
            if self._ops:
                self._drain()
            url = self._send_to_one(frames, copy, avoid)
            if url is not None:
                return url
            left = ms_left(deadline)
            if left == 0:
                return None
            self._wait_monitor(lambda: False, deadline_after(min(left, 10) / 1000))

    def _await_reply(self, deadline: float | None) -> list[bytes] | None:
        """The next message on the socket, or None at ``deadline``: a blocking receive, as a raw
        REQ socket does. The request has just gone out, so trying without blocking first would
        only fail (a raised zmq.Again) and polling would add syscalls to every round trip.
        Directory changes that arrive meanwhile wait for the next send. The receive timeout may
        overshoot the deadline by 1/64 of the time left, so that it is rarely reset."""
        left = ms_left(deadline)
        if left is None:
            left = -1  # no deadline: wait as long as it takes
        elif left == 0:
            return None
        sock = self._sock
        self._rcvtimeo = sticky_rcvtimeo(sock, self._rcvtimeo, left)
        try:
            return recv_frames(sock, 0)
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc


class AsyncRequester(_RequesterBase, AsyncConnector):
    """Calls one service by name from one asyncio loop."""

    def __init__(self, runtime: NodeRuntime, service: str, via: str | None = None) -> None:
        AsyncConnector.__init__(self, runtime, service, zmq.ROUTER, via)
        self._setup()

    async def request(self, body: Any, timeout: float | None = None, retries: int = 0) -> Any:
        """Coroutine twin of :meth:`Requester.request`."""
        self._check_open()
        timeout = self._timeouts(timeout)
        last: str | None = None
        for attempt in range(1, retries + 2):
            deadline = deadline_after(timeout)
            if not await self._wait_providers(deadline):
                raise NoProviderError("service", self.name, timeout)
            if self._secured:
                if not self._settled():
                    await self._wait_settled(deadline)  # learn of refusals at once
                else:
                    self._read_monitor()
                if self._all_refused():
                    break
            msg_id, frames, copy = self._frames(body)
            last = await self._send_routed(frames, deadline, copy, last)
            if last is None:
                continue
            while (reply := await self._recv(deadline)) is not None:
                ok, result = self._match(reply[1:], msg_id)
                if ok:
                    return result
        raise self._failure(timeout, attempt)

    async def _send_routed(
        self, frames: list[Any], deadline: float, copy: bool, avoid: str | None
    ) -> str | None:
        """Coroutine twin of :meth:`Requester._send_routed`."""
        while True:
            url = self._send_to_one(frames, copy, avoid)
            if url is not None:
                return url
            left = s_left(deadline)
            if not left:
                return None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.01))
            except asyncio.TimeoutError:
                pass

