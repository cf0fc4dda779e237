"""Request/reply, the callers' side: requesters (ROUTER, connected to every provider,
load-balanced round robin; replies matched by message id, so a late answer to an abandoned attempt
is dropped rather than returned to the wrong call). Services are in
:mod:`zmqfabric.patterns.service`.

A request is one plan (``RequesterBase._plan``: wait for providers, send, receive, retry), driven
by :class:`Requester` (blocking) and :class:`~zmqfabric.patterns.reqrep_aio.AsyncRequester`
(awaiting); see :mod:`.plan`."""

from __future__ import annotations

import errno
import itertools
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from ..constants import DECODE_CHECK_SIZE, ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.records import EndpointKind
from ..core.wire import FLOAT64, FLOAT64_AT, pack_canonical
from ..errors import (
    AuthorizationError,
    MessageTooLargeError,
    NoProviderError,
    RemoteError,
    RemoteProtocolError,
    RequestTimeoutError,
)
from ..transport.frames import (
    MORE_NOBLOCK,
    NOBLOCK,
    csend,
    ms_left,
    recv_frames,
    send_frames,
    sticky_rcvtimeo,
)
from ..transport.sockets import sync_view
from .base import Connector
from .encoder import BINARY, nbytes
from .plan import RECV, WAIT_CHANGE, WAIT_PROVIDERS, WAIT_USABLE, Plan, drive
from .waiting import SyncConnector

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

log = logging.getLogger(__name__)

# Hot path (see wire_layout's canonical encodings): pre-packed prefixes of a request naming its
# service and of a reply.
_REQUEST = wire.MAPPED_PREFIX[wire.Kind.REQUEST]
_REPLY = wire.MESSAGE_PREFIX[wire.Kind.REPLY]
_UNPACKB = msgpack.unpackb
_pack_canonical = pack_canonical
_now = time.time
_monotonic = time.monotonic
#: The C-level receive (a routing id as bytes).
_RECV = zmq.backend.Socket.recv
#: Body types that are never raw bytes (one set lookup, cheaper than isinstance).
_PACKED = frozenset({dict, list, tuple, str, int, float, bool, type(None)})
#: A request that no connected provider takes yet is tried again at least this often (s).
RESEND_CHECK_S = 0.01


class RequesterBase(Connector):
    """What the sync and the asyncio requester share: the request plan, encoding, choosing the
    provider, matching replies.

    A requester is a ROUTER connected to every provider with the provider's URL as its routing
    id, so it picks the provider of each request itself: round robin over the providers it is
    connected to, and a retry goes to another provider than the attempt before (a DEALER's round
    robin may send it to the same one again)."""

    kind = EndpointKind.REPLY
    noun = "service"
    routed = True

    def __init__(self, runtime: NodeRuntime, service: str, via: str | None = None) -> None:
        #: (URL, routing id) of every provider connected, sorted: made when providers change.
        self._routes: list[tuple[str, bytes]] = []
        self._turn = random.randrange(1 << 16)  # fresh requesters do not all start at one provider
        self._ids = itertools.count(random.getrandbits(40))
        self._secured = runtime.config.keys is not None
        self._svc_tail = wire.service_tail(service)  # requests name their service
        self._raw_map = {**wire.RAW_HEADERS, wire.SERVICE_KEY: service}
        self._limit = runtime.config.max_message_size
        self._pack = msgpack.Packer().pack
        super().__init__(runtime, service, zmq.ROUTER, via)
        #: Requests go out through the blocking view with NOBLOCK: they never wait.
        self._out = sync_view(self._sock)

    def _apply(self, op: str, url: str) -> bool:
        applied = super()._apply(op, url)
        self._routes = [(u, u.encode()) for u in sorted(self._urls)]
        return applied

    def _plan(self, body: Any, timeout: float | None, retries: int) -> Plan[Any]:
        """The request (see :meth:`Requester.request`): every decision, no waiting."""
        self._check_open()
        if timeout is None:
            timeout = self._rt.config.request_timeout_s
        msg_id, frames, copy = self._frames(body)  # an unencodable body fails before any wait
        last: str | None = None
        attempt = 0
        for attempt in range(1, retries + 2):
            deadline = time.monotonic() + timeout
            if not (yield WAIT_PROVIDERS, deadline):
                self._check_open()  # closed meanwhile (asyncio: by another coroutine)
                raise NoProviderError("service", self.name, timeout)
            if self._secured:
                if not self._settled():
                    # New connections: learn of refusals at once, but never wait on a provider
                    # whose handshake does not complete while another one is ready.
                    yield WAIT_USABLE, deadline
                else:
                    self._read_monitor()  # refusals (or successes) since the last call
                if self._all_refused():
                    break
            if attempt > 1:
                msg_id, frames, copy = self._frames(body)
            avoid = last
            # While no provider is connected yet, wait for a directory change or a connection.
            while (last := self._send_to_one(frames, copy, avoid)) is None:
                if ms_left(deadline) == 0:
                    break
                yield WAIT_CHANGE, min(deadline, time.monotonic() + RESEND_CHECK_S)
            if last is None:
                continue
            while (reply := (yield RECV, deadline)) is not None:
                ok, result = self._match(reply, msg_id)
                if ok:
                    return result
        raise self._failure(timeout, attempt)

    def _frames(self, body: Any) -> tuple[int, list[Any], bool]:
        """(message id, frames with a slot for the routing id, copy flag) of a new request.
        Raises LocalProtocolError for a body msgpack cannot encode, MessageTooLargeError for one
        over the node's max_message_size (which the provider would refuse)."""
        msg_id = next(self._ids)
        if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
            size = nbytes(body)
            if size > self._limit:
                raise MessageTooLargeError(size, self._limit)
            header = wire.pack_header(wire.Kind.REQUEST, msg_id, time.time(), self._raw_map)
            return msg_id, [b"", b"", header, body], False
        try:
            data = self._pack(body)
        except wire.PACK_ERRORS as exc:
            raise wire.unencodable(exc) from exc
        if len(data) > self._limit:
            raise MessageTooLargeError(len(data), self._limit)
        return msg_id, [b"", b"", pack_canonical(_REQUEST, msg_id, FLOAT64, time.time()) + data
                        + self._svc_tail], True

    def _send_packed(self, body: Any) -> tuple[int, str | None]:
        """The hot path's send: (message id, the provider's URL or None when none took it) of a
        new request whose body msgpack packs (not raw bytes), sent as one frame after the route
        to the provider in turn (:meth:`_frames` and :meth:`_send_to_one` inlined). Raises as
        :meth:`_frames`. Never blocks."""
        msg_id = next(self._ids)
        pack = self._pack  # a local: calling the attribute would look it up as a method
        try:
            data = pack(body)
        except wire.PACK_ERRORS as exc:
            raise wire.unencodable(exc) from exc
        if len(data) > self._limit:
            raise MessageTooLargeError(len(data), self._limit)
        frame = _pack_canonical(_REQUEST, msg_id, FLOAT64, _now()) + data + self._svc_tail
        routes = self._routes
        turn = self._turn % len(routes)
        out = self._out
        try:
            csend(out, routes[turn][1], MORE_NOBLOCK)  # refused: nothing was queued
            csend(out, b"", MORE_NOBLOCK)
            csend(out, frame, NOBLOCK)
        except zmq.ZMQError:  # not connected (yet), or full: try every provider
            return msg_id, self._send_to_one([b"", b"", frame], True, None)
        self._turn = turn + 1
        return msg_id, routes[turn][0]

    def _match(self, frames: list[bytes], msg_id: int) -> tuple[bool, Any]:
        """(True, body) for our reply; (False, None) for stale or malformed replies.
        Raises RemoteError for an error reply to our request."""
        # Fast path: ["", canonical one-frame reply] (the whole frame decoded first, as
        # parse_reply: a malformed reply is refused, stale or not).
        if len(frames) == 2 and not frames[0]:
            data = frames[1]
            if data.startswith(_REPLY) and len(data) <= DECODE_CHECK_SIZE:
                try:
                    fields = (_UNPACKB(data, raw=False, strict_map_key=False)
                              if data[FLOAT64_AT] == FLOAT64 else None)
                except Exception:  # refused (and counted) by parse_reply below
                    fields = None
                if fields is not None:
                    if fields[2] != msg_id:
                        self._rt.counters.add("stale_replies")
                        return False, None
                    return True, fields[4]
        try:
            header, body = wire.parse_reply(frames)
        except RemoteProtocolError as exc:
            self._refused("reply", exc)
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
        routes = self._routes
        count = len(routes)
        skipped = -1
        for turn in range(self._turn, self._turn + count):
            i = turn % count
            if count > 1 and routes[i][0] == avoid:
                skipped = i
                continue
            if self._send_route(i, frames, copy):
                return routes[i][0]
        if skipped >= 0 and self._send_route(skipped, frames, copy):
            return routes[skipped][0]
        return None

    def _send_route(self, i: int, frames: list[Any], copy: bool) -> bool:
        """Send to provider ``i`` of ``_routes``; False when it is not connected (yet) or its
        queue is full."""
        frames[0] = self._routes[i][1]
        try:
            send_frames(self._out, frames, NOBLOCK, copy)
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                return False
            raise self._zmq_error(exc) from exc
        self._turn = i + 1
        return True

    def _failure(self, timeout: float, attempts: int) -> Exception:
        """The error for a request that got no answer: refused by every provider, or timed out."""
        self._read_monitor()
        refused = self._all_refused()
        if refused:
            return AuthorizationError("service", self.name, self._rt.server_names(refused))
        return RequestTimeoutError(self.name, timeout, attempts, len(self._urls))


class Requester(RequesterBase, SyncConnector):
    """Calls one service by name. Owned by one thread; not thread-safe."""

    steps = {**SyncConnector.steps, RECV: "_await_reply"}

    def __init__(self, runtime: NodeRuntime, service: str, via: str | None = None) -> None:
        self._rcvtimeo = -1  # the socket's receive timeout (ms) as last set; -1: none
        super().__init__(runtime, service, via)

    def request(self, body: Any, timeout: float | None = None, retries: int = 0) -> Any:
        """Send ``body`` to one provider and return its reply.

        Each attempt waits ``timeout`` seconds (default: the node's request timeout); on no answer,
        up to ``retries`` more attempts go to the next provider. Raises NoProviderError,
        RequestTimeoutError, RemoteError (the handler raised), AuthorizationError (every provider
        refused our key), LocalProtocolError (an unencodable body), MessageTooLargeError,
        ClosedError.
        """
        if retries == 0 and self._urls and not self._secured and not self._ops:
            # Hot path: the plan's steps for one attempt to a connected provider, without the
            # generator and the driver (one send, one blocking receive per reply).
            if self._closed:
                self._check_open()
            if timeout is None:
                timeout = self._rt.config.request_timeout_s
            if self._routes and type(body) in _PACKED:
                msg_id, sent = self._send_packed(body)
                deadline = _monotonic() + timeout
            else:
                msg_id, frames, copy = self._frames(body)
                deadline = _monotonic() + timeout
                sent = self._send_to_one(frames, copy, None)
            if sent is not None:
                while (reply := self._await_reply(deadline)) is not None:
                    # _match's fast path inlined: ["", canonical one-frame reply].
                    if len(reply) == 2 and not reply[0]:
                        data = reply[1]
                        if (data.startswith(_REPLY) and len(data) <= DECODE_CHECK_SIZE
                                and data[FLOAT64_AT] == FLOAT64):
                            try:
                                fields = _UNPACKB(data, strict_map_key=False)
                            except Exception:  # noqa: S112 - refused (and counted) by _match
                                fields = None
                            if fields is not None and fields[2] == msg_id:
                                return fields[4]
                    ok, result = self._match(reply, msg_id)
                    if ok:
                        return result
                raise self._failure(timeout, 1)
            timeout = max(0.0, deadline - _monotonic())  # none took it: the plan waits
        return drive(self._plan(body, timeout, retries), self._waits)

    def _await_reply(self, deadline: float | None) -> list[bytes] | None:
        """The frames of the next message on the socket after its routing id (which no caller
        needs: replies are matched by message id), or None at ``deadline``: a blocking receive,
        as a raw REQ socket does. The request has just gone out, so trying without blocking
        first would only fail (a raised zmq.Again) and polling would add syscalls to every
        round trip. Directory changes that arrive meanwhile wait for the next send. The receive
        timeout may overshoot the deadline by 1/64 of the time left, so that it is rarely
        reset."""
        if deadline is None:
            left = -1  # no deadline: wait as long as it takes
        else:  # ms_left inlined
            wait = deadline - _monotonic()
            if wait <= 0:
                return None
            left = max(1, int(wait * 1000))
        sock = self._sock
        if left != self._rcvtimeo:  # a call only when the wait changes (see sticky_rcvtimeo)
            self._rcvtimeo = sticky_rcvtimeo(sock, self._rcvtimeo, left)
        try:
            _RECV(sock, 0)  # the routing id (as bytes: recv_routed inlined), not needed
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            raise self._zmq_error(exc) from exc
        return recv_frames(sock, NOBLOCK)  # the rest is there once the first frame is
