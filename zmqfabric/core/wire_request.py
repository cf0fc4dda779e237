"""Requests and replies of the zmqfabric wire format: routes, the service a request names, the
id a refusal repeats. Pure: no IO, no clock. :mod:`zmqfabric.core.wire` is the public face of
this module; the specification is ``docs/PROTOCOL.md`` (sections 5 and 7.1).

A request is ``[route..., "", message...]`` on a service's ROUTER; zmqfabric's requests carry
the header map ``{"svc": name}``, one frame: ``[2, 1, id, ts, body, {"svc": name}]``. An
endpoint serving another service refuses them. A refused request is answered with an error
reply that repeats its id whenever the id can be read (:func:`request_id`)."""

from __future__ import annotations

from typing import Any, Final

import msgpack

from ..constants import DECODE_CHECK_SIZE
from ..errors import RemoteProtocolError
from .wire_codec import parse_frames
from .wire_layout import (
    FLOAT64_AT,
    HEADER_SIZE,
    MAPPED_PREFIX,
    MAX_ID,
    MESSAGE_PREFIX,
    Header,
    Kind,
)


def split_route(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split a ROUTER message into (routing frames up to and including the delimiter, rest).

    Raises RemoteProtocolError when there is no empty delimiter frame.
    """
    for i, frame in enumerate(frames):
        if not frame:
            if i == 0:
                break
            return frames[: i + 1], frames[i + 1 :]
    raise RemoteProtocolError(
        "request has no routing envelope: expected [identity..., b'', message...]"
    )


def parse_request(payload: list[bytes], service: str | None = None) -> tuple[Header, Any]:
    """Decode a request's frames (after the route). Raises RemoteProtocolError, also for a
    request that names another service than ``service`` (when given)."""
    header, body = parse_frames(payload, Kind.REQUEST)
    if service is not None:
        check_service(header, service)
    return header, body


def parse_reply(frames: list[bytes]) -> tuple[Header, Any]:
    """Decode ``["", message...]`` as a DEALER (or a requester's ROUTER, after the route)
    receives a reply. Raises RemoteProtocolError."""
    if len(frames) < 2 or frames[0]:
        raise RemoteProtocolError(f"reply must be ['', message...], got {len(frames)} frames")
    header, body = parse_frames(frames[1:])
    if header.kind is not Kind.REPLY and header.kind is not Kind.ERROR:
        raise RemoteProtocolError(f"expected a reply, got kind {header.kind.name.lower()}")
    if header.kind is Kind.ERROR and not (
        isinstance(body, dict)
        and isinstance(body.get("type"), str)
        and isinstance(body.get("message"), str)
    ):
        raise RemoteProtocolError("error reply body must be {'type': str, 'message': str}")
    return header, body


# --- the id a refusal repeats -----------------------------------------------------------------

#: How much of a first frame :func:`request_id` reads: an array header and three integers take
#: at most 32 bytes in any msgpack encoding.
_PEEK_SIZE: Final = 64


def request_id(data: bytes) -> int | None:
    """The message id of a first frame that may not parse (another version, a header over 4096
    bytes, a bad timestamp or map): the third item of the msgpack array it starts with, read
    from its first 64 bytes only, or None when those do not hold an unsigned 64-bit integer
    there. Every version keeps ``[version, kind, msg_id, ...]`` as the array's first items, so
    that a refusal can always repeat the id of a request whose id can be read
    (docs/PROTOCOL.md, "Refusals"). Never raises."""
    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=_PEEK_SIZE)
    unpacker.feed(data[:_PEEK_SIZE])
    try:
        if unpacker.read_array_header() < 3:
            return None
        unpacker.skip()
        unpacker.skip()
        msg_id = unpacker.unpack()
    except Exception:  # OutOfData, FormatError, StackError, ValueError...: nothing readable
        return None
    if type(msg_id) is not int or not 0 <= msg_id <= MAX_ID:
        return None
    return msg_id


# --- the service a request names (defence in depth: a request on the wrong port is refused) ---

#: The header map key naming a request's service.
SERVICE_KEY: Final = "svc"
_REQUEST_PLAIN: Final = MESSAGE_PREFIX[Kind.REQUEST]
_REQUEST_MAPPED: Final = MAPPED_PREFIX[Kind.REQUEST]
_UNPACKB: Final = msgpack.unpackb


def service_tail(service: str) -> bytes:
    """The packed header map ``{"svc": service}`` that ends a request naming ``service``
    (computed once per requester or endpoint)."""
    return msgpack.packb({SERVICE_KEY: service})


def name_service(header: bytes, tail: bytes) -> bytes:
    """A header frame (:func:`~zmqfabric.core.wire.pack_header`, two-frame form) naming the
    service of ``tail`` (:func:`service_tail`). A canonical header gets the map appended (a
    5-item array); one with a map of its own (raw bodies) is packed again with the key added."""
    if len(header) == HEADER_SIZE and header[0] == 0x94:
        return b"\x95" + header[1:] + tail
    fields = msgpack.unpackb(header, raw=False)
    headers = dict(fields[4]) if len(fields) == 5 and fields[4] else {}
    headers.update(msgpack.unpackb(tail, raw=False))
    return msgpack.packb([*fields[:4], headers])


def canonical_request(data: bytes, service: dict[str, str]) -> tuple[int, Any] | None:
    """``(msg_id, body)`` of a one-frame canonical request that names no service or the one of
    ``service`` (``{"svc": name}``); None for any other frame, one that does not decode or one
    over DECODE_CHECK_SIZE (parse those with :func:`parse_request`, which checks everything
    and says why it refuses). Never raises. The service endpoint's fast path."""
    if not HEADER_SIZE < len(data) <= DECODE_CHECK_SIZE or data[FLOAT64_AT] != 0xCB:
        return None
    if data.startswith(_REQUEST_MAPPED):
        try:
            fields = _UNPACKB(data, raw=False, strict_map_key=False)
        except Exception:
            return None
        return (fields[2], fields[4]) if fields[5] == service else None
    if data.startswith(_REQUEST_PLAIN):
        try:
            fields = _UNPACKB(data, raw=False, strict_map_key=False)
        except Exception:
            return None
        return fields[2], fields[4]
    return None


def check_service(header: Header, service: str) -> None:
    """Raise RemoteProtocolError when the request names a service other than ``service``."""
    named = header.headers.get(SERVICE_KEY) if header.headers else None
    if named is not None and named != service:
        shown = named[:64] if isinstance(named, str) else type(named).__name__
        raise RemoteProtocolError(
            f"request for service {shown!r} reached {service!r}: refused (wrong port)"
        )

