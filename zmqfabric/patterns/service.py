"""Reply services: a bound ROUTER whose handler answers each request (the caller's side is
:mod:`zmqfabric.patterns.reqrep`).

A service is :class:`~zmqfabric.patterns.handlers.Served`: its owner (a thread of its own on a
sync node, the loop on an asyncio node; see :mod:`zmqfabric.patterns.drivers`) receives and
decodes requests (``accept``), a slot calls the handler, and the owner sends the reply
(``done``). Requests are answered in any order when ``concurrency`` > 1; each reply repeats its
request's message id, so callers match them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

import msgpack
import zmq

from ..constants import DECODE_CHECK_SIZE, ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.records import EndpointKind
from ..core.wire import FLOAT64, FLOAT64_AT, pack_canonical
from ..errors import RemoteProtocolError
from ..stats import RateLimitedLog
from ..transport.frames import MORE_NOBLOCK, NOBLOCK, csend, send_frames, send_routed
from ..transport.sockets import sync_view
from .base import Bound
from .encoder import BINARY
from .handlers import OK, Handler, Job, SlotBoard, Status, outcome

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)

# Hot path (see wire_layout's canonical encodings): the pre-packed prefixes of a reply and of
# a request naming its service.
_REPLY = wire.MESSAGE_PREFIX[wire.Kind.REPLY]
_REQUEST_MAPPED = wire.MAPPED_PREFIX[wire.Kind.REQUEST]
_HEADER_SIZE = wire.HEADER_SIZE
_UNPACKB = msgpack.unpackb
_pack_canonical = pack_canonical
_csend = csend
#: Result types that are never raw bytes (one set lookup, cheaper than isinstance).
_PACKED = frozenset({dict, list, tuple, str, int, float, bool, type(None)})
#: The clocks of reply timestamps and of handler starts, without module lookups (hot path).
_now = time.time
_monotonic = time.monotonic
_canonical_request = wire.canonical_request


class ServiceEndpoint(Bound):
    """One reply service: a bound ROUTER, its handler and its ``concurrency`` handler slots.

    ``accept``, ``done``, ``reply`` and ``reply_error`` belong to the socket's owner; ``stats``
    is thread-safe."""

    kind = EndpointKind.REPLY
    noun = "service"
    #: Counter names (the control endpoint counts its own traffic apart: monitoring is not
    #: service traffic).
    counter_sent = "replies_sent"
    counter_failed = "handler_errors"
    counter_undeliverable = "replies_undeliverable"
    #: Replies leave at once (``flush`` does nothing).
    flushes = False

    def __init__(
        self,
        runtime: NodeRuntime,
        name: str,
        handler: Handler,
        allow: Iterable[str] | None = None,
        concurrency: int = 1,
    ) -> None:
        super().__init__(runtime, name, zmq.ROUTER, allow)
        self.handler = handler
        self.concurrency = concurrency
        #: A handler slower than the request timeout is hung: its caller has given up.
        self.slots = SlotBoard(concurrency, runtime.config.request_timeout_s)
        self.socket = self._sock
        self.handled = 0
        self.failed = 0
        self._reply_sock = sync_view(self._sock)
        self._pack = msgpack.Packer().pack  # one Packer per handle: packb builds one per call
        self._svc_map = {wire.SERVICE_KEY: name}  # a request naming another service is refused
        #: Slot 0's start in ``slots`` (serve_one writes it itself), and the counters' add.
        self._started = self.slots.started
        self._count = runtime.counters.add
        self._advertise()

    # --- Served -------------------------------------------------------------------------------

    def accept(self, frames: list[bytes]) -> list[Job]:
        """The request in ``frames`` as a job, or none when it was refused (see ``parse``)."""
        # Fast path: [identity, "", canonical one-frame request] from one hop.
        if len(frames) == 3 and not frames[1]:
            found = wire.canonical_request(frames[2], self._svc_map)  # ours, or no name
            if found is not None:
                return [Job(frames[:2], found[0], found[1])]
        parsed = self.parse(frames)
        if parsed is None:
            return []
        route, header, body = parsed
        return [Job(route, header.msg_id, body)]

    def serve_one(self, frames: list[bytes]) -> tuple[Status, Any] | None:
        """The inline driver's hot path (slot 0, the driver's thread): a canonical one-frame
        request from one hop, ``[identity, "", request]``, handled whole, as ``accept``, ``call``
        and ``done`` would, with fewer Python calls (``enter``/``leave`` do nothing here).
        Returns the handler's outcome, or None for any other message, which the driver then
        handles the general way. Never raises (the handler's exceptions are its outcome)."""
        if len(frames) != 3 or frames[1]:
            return None
        data = frames[2]
        # wire.canonical_request inlined for a request naming its service (what requesters
        # send); the function itself for any other frame, which refuses what is not canonical.
        if (data.startswith(_REQUEST_MAPPED) and _HEADER_SIZE < len(data) <= DECODE_CHECK_SIZE
                and data[FLOAT64_AT] == FLOAT64):
            try:
                fields = _UNPACKB(data, strict_map_key=False)
            except Exception:  # noqa: S112 - not canonical: refused the general way
                return None
            if fields[5] != self._svc_map:
                return None  # another service's request: refused the general way
            msg_id = fields[2]
            body = fields[4]
        else:
            found = _canonical_request(data, self._svc_map)  # ours, or no name
            if found is None:
                return None
            msg_id, body = found
        # The SlotBoard's record of slot 0 (begin/end inlined; no Job: a service describes
        # none, and one is made for the log if the handler raises).
        started = self._started
        started[0] = _monotonic()
        try:
            value = self.handler(body)
        except BaseException as exc:
            status, value = outcome(self, Job(frames[:2], msg_id, body), exc)
            started[0] = 0.0
            self.handled += 1
            self.failed += 1
            self.reply_error(frames[:2], msg_id, value)
            return status, value
        started[0] = 0.0
        self.handled += 1
        if type(value) not in _PACKED:  # raw bytes or anything unusual: the general way
            self.reply(frames[:2], msg_id, value)
            return OK, value
        # reply() inlined: the reply frame after the route, three C-level sends.
        pack = self._pack
        try:
            data = pack(value)
        except wire.PACK_ERRORS:
            self.reply(frames[:2], msg_id, value)  # logs, and answers with the error
            return OK, value
        sock = self._reply_sock
        try:
            _csend(sock, frames[0], MORE_NOBLOCK)  # refused: nothing was queued
            _csend(sock, b"", MORE_NOBLOCK)
            _csend(sock, _pack_canonical(_REPLY, msg_id, FLOAT64, _now()) + data, NOBLOCK)
        except zmq.ZMQError:  # client vanished (ROUTER_MANDATORY) or its queue is full
            self._count(self.counter_undeliverable)
        else:
            self._count(self.counter_sent)
        return OK, value

    def enter(self, job: Job) -> None:
        return None

    def leave(self, token: None) -> None:
        pass

    def done(self, job: Job, status: Status, value: Any) -> None:
        """Reply with the handler's value, or with the error it raised (FATAL too: the caller
        learns at once rather than after its timeout)."""
        self.handled += 1
        if status is OK:
            self.reply(job.route, job.ref, value)
        else:
            self.failed += 1
            self.reply_error(job.route, job.ref, value)

    def flush(self) -> None:
        pass  # replies leave at once

    def describe(self, job: Job) -> str:
        return ""

    def stats(self) -> dict[str, int]:
        return {"handled": self.handled, "failed": self.failed, **self.slots.stats()}

    # --- decoding and replies ------------------------------------------------------------------

    def parse(self, frames: list[bytes]) -> tuple[list[bytes], wire.Header, Any] | None:
        """Split and decode a request. Malformed input is counted and, when the route is
        readable, answered with an error reply that repeats the request's id whenever the id
        can be read (:func:`~zmqfabric.core.wire.request_id`), 0 otherwise; returns None
        then."""
        try:
            route, payload = wire.split_route(frames)
        except RemoteProtocolError as exc:
            self._refused("request", exc)
            return None
        try:
            header, body = wire.parse_request(payload, self.name)
        except RemoteProtocolError as exc:
            self._refused("request", exc)
            # The request's id whenever it can be read (another version, an oversized header
            # too), so its caller can match the refusal; 0 only when it cannot be.
            msg_id = (wire.request_id(payload[0]) if payload else None) or 0
            self.reply_error(route, msg_id, exc, refused=True)
            return None
        return route, header, body

    def reply(self, route: list[bytes], msg_id: int, result: Any) -> None:
        """Send ``result`` as the reply to ``msg_id``; a result msgpack cannot encode is logged
        and answered as an error. Never raises for an unreachable caller (counted)."""
        if type(result) not in _PACKED and isinstance(result, BINARY) and (
                len(result) >= ZERO_COPY_THRESHOLD):
            header = wire.pack_header(wire.Kind.REPLY, msg_id, time.time(), wire.RAW_HEADERS)
            self._send(route + [header, result], False)
            return
        pack = self._pack  # a local: calling the attribute would look it up as a method
        try:
            data = pack(result)
        except wire.PACK_ERRORS as exc:
            error = wire.unencodable(exc)
            _rlog.warning(f"{self.noun} {self.name}", "%s %s: the handler's result cannot be "
                          "sent: %s", self.noun, self.name, error)
            self.reply_error(route, msg_id, error)
            return
        try:  # _send, for one frame after the route (the hot path)
            send_routed(self._reply_sock, route, pack_canonical(_REPLY, msg_id, FLOAT64, _now())
                        + data, NOBLOCK)
        except zmq.ZMQError:  # client vanished (ROUTER_MANDATORY) or its queue is full
            self._rt.counters.add(self.counter_undeliverable)
            return
        self._rt.counters.add(self.counter_sent)

    def reply_error(
        self, route: list[bytes], msg_id: int, exc: BaseException, refused: bool = False
    ) -> None:
        self._rt.counters.add("refused_request_replies" if refused else self.counter_failed)
        self._send(route + [wire.pack_message(wire.Kind.ERROR, msg_id, time.time(),
                                              wire.pack_body(wire.error_body(exc)))])

    def _send(self, frames: list[Any], copy: bool = True) -> None:
        try:
            send_frames(self._reply_sock, frames, NOBLOCK, copy)
            self._rt.counters.add(self.counter_sent)
        except zmq.ZMQError:  # client vanished (ROUTER_MANDATORY) or its queue is full
            self._rt.counters.add(self.counter_undeliverable)

