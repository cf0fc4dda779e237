"""Encoding and decoding whole messages of the zmqfabric wire format (both forms, batches).
Pure: no IO, no clock. :mod:`zmqfabric.core.wire` is the public face of this module; the layout
is in :mod:`.wire_layout`, the specification ``docs/PROTOCOL.md`` (section 5)."""

from __future__ import annotations

from typing import Any, Final

import msgpack

from ..constants import DECODE_CHECK_SIZE, MAX_HEADER_SIZE, PROTOCOL_VERSION
from ..errors import LocalProtocolError, RemoteProtocolError
from .wire_body import check_expansion, unpack_body
from .wire_layout import (
    BATCH,
    FLOAT64,
    FLOAT64_AT,
    FOLLOWS,
    HEADER_PREFIX,
    HEADER_SIZE,
    KINDS,
    MAPPED_PREFIX,
    MAX_ID,
    MESSAGE_PREFIX,
    Header,
    Kind,
    Message,
    pack_canonical,
    unpack_canonical,
)

_PREFIX_KIND: Final = {prefix: kind for kind, prefix in HEADER_PREFIX.items()}


def pack_header(
    kind: Kind, msg_id: int, timestamp: float, headers: dict[str, Any] | None = None
) -> bytes:
    """A header frame (the body is the next frame). Raises LocalProtocolError for an id out of
    range."""
    if not 0 <= msg_id <= MAX_ID:
        raise LocalProtocolError(f"message id {msg_id} is not an unsigned 64-bit integer")
    if headers:
        return msgpack.packb([PROTOCOL_VERSION, int(kind) | FOLLOWS, msg_id, float(timestamp),
                              headers])
    return pack_canonical(HEADER_PREFIX[kind], msg_id, FLOAT64, timestamp)


def pack_message(
    kind: Kind, msg_id: int, timestamp: float, body: bytes, headers: bytes = b""
) -> bytes:
    """A one-frame message: ``body`` already packed (:func:`pack_body`), ``headers`` a packed
    header map or empty. Raises LocalProtocolError for an id out of range."""
    if not 0 <= msg_id <= MAX_ID:
        raise LocalProtocolError(f"message id {msg_id} is not an unsigned 64-bit integer")
    prefix = MAPPED_PREFIX[kind] if headers else MESSAGE_PREFIX[kind]
    return pack_canonical(prefix, msg_id, FLOAT64, timestamp) + body + headers


def unpack_header(data: bytes) -> Header:
    """Decode and validate a header frame (a two-frame message's first). Raises
    RemoteProtocolError, also for a whole message where a header frame is expected."""
    if len(data) == HEADER_SIZE and data[FLOAT64_AT] == FLOAT64:
        prefix, msg_id, _, ts = unpack_canonical(data)
        kind = _PREFIX_KIND.get(prefix)
        if kind is not None:
            return Header(kind, msg_id, ts, None, True)
    if len(data) > MAX_HEADER_SIZE:
        raise RemoteProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_SIZE}")
    header, _ = unpack_frame(data)
    if not header.follows:
        raise RemoteProtocolError("expected a header frame (kind | 16), got a whole message")
    return header


def unpack_frame(data: bytes | memoryview) -> tuple[Header, Any]:
    """Decode a message's first frame: ``(header, body)``; for a header frame
    (``header.follows``) the body is None: it is the next frame. Raises RemoteProtocolError."""
    if len(data) > DECODE_CHECK_SIZE:
        check_expansion(data)
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(f"message is not valid msgpack: {exc}") from exc
    if type(fields) is not list or not 4 <= len(fields) <= 6:
        raise RemoteProtocolError("a message is a msgpack array of 4 to 6 items")
    version, kind = fields[0], fields[1]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"unsupported protocol version {version!r} (this node speaks {PROTOCOL_VERSION})"
        )
    flags = kind & (FOLLOWS | BATCH) if type(kind) is int else 0
    base = kind ^ flags if type(kind) is int else None
    if base not in KINDS or flags == FOLLOWS | BATCH:
        raise RemoteProtocolError(f"unknown message kind {kind!r}")
    msg_id, ts = fields[2], fields[3]
    if type(msg_id) is not int or not 0 <= msg_id <= MAX_ID:
        raise RemoteProtocolError(f"message id {msg_id!r} is not an unsigned 64-bit integer")
    if type(ts) is not int and type(ts) is not float:
        raise RemoteProtocolError(f"timestamp {ts!r} is not a number")
    follows = flags == FOLLOWS
    if follows:
        if len(fields) == 6:
            raise RemoteProtocolError("a header frame is an array of 4 or 5 items")
        if len(data) > MAX_HEADER_SIZE:
            raise RemoteProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_SIZE}")
        body, headers = None, fields[4] if len(fields) == 5 else None
    else:
        if len(fields) == 4:
            raise RemoteProtocolError("a message is an array of 5 or 6 items (body, headers)")
        body, headers = fields[4], fields[5] if len(fields) == 6 else None
        if flags and type(body) is not list:
            raise RemoteProtocolError("a batch's body must be an array of bodies")
    if headers is not None and (
        type(headers) is not dict or not all(type(k) is str for k in headers)
    ):
        raise RemoteProtocolError("header map must be a msgpack map with string keys")
    return Header(Kind(base), msg_id, float(ts), headers or None, follows, flags == BATCH), body


def parse_frames(frames: list[bytes], kind: Kind | None = None) -> tuple[Header, Any]:
    """Decode a whole message (one frame, or a header frame and a body frame) and check its
    kind when given. Raises RemoteProtocolError."""
    if not frames:
        raise RemoteProtocolError("empty message")
    header, body = unpack_frame(frames[0])
    if header.follows:
        if len(frames) != 2:
            raise RemoteProtocolError(
                f"a header frame must be followed by one body frame, got {len(frames) - 1}")
        body = unpack_body(frames[1], header.raw)
    elif len(frames) != 1:
        raise RemoteProtocolError(f"a one-frame message came with {len(frames) - 1} more")
    if kind is not None and header.kind is not kind:
        raise RemoteProtocolError(
            f"expected {kind.name.lower()}, got kind {header.kind.name.lower()}")
    return header, body


def expand(header: Header, body: Any, topic: str | None = None) -> list[Message]:
    """The messages of a decoded message: one, or each of a batch."""
    if not header.batch:
        return [Message(header.kind, header.msg_id, header.timestamp, body, topic,
                        header.headers)]
    first, ts = header.msg_id, header.timestamp
    return [Message(header.kind, (first + i) & MAX_ID, ts, item, topic, header.headers)
            for i, item in enumerate(body)]
