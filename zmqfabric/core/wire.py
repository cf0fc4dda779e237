"""The zmqfabric wire format, version 1: frames <-> typed messages. Pure: no IO, no clock.

The specification is ``docs/PROTOCOL.md`` (section 5, messages; section 7, the frames of each
pattern); this module implements it, and ``tests/test_interop.py`` and
``tests/test_interop_serving.py`` check it against plain pyzmq programs. In short:

- A header frame is the msgpack array ``[version, kind, msg_id, timestamp]`` or
  ``[version, kind, msg_id, timestamp, headers]``: version 1; kinds 1 request, 2 reply, 3 error
  reply, 4 event, 5 message, 6 tasks, 7 results, 8 credit; ``msg_id`` < 2**64 (a reply repeats
  its request's); headers a map with string keys (``"enc": "raw"``: the body is raw bytes). At
  most 4096 bytes. Without a map zmqfabric writes it as 21 bytes
  (``94 01 KK CF <id> CB <timestamp>``: see the canonical header below); readers accept any
  msgpack encoding.
- A body frame is one msgpack value, or raw bytes.
- Per pattern: request/reply ``["", header, body]`` on a ROUTER (a REQ sends ``[header,
  body]``); publish/subscribe ``[topic, header, body]`` from an XPUB, with subscriber markers
  (``\xffzf/sub/`` + 16 hex digits, subscribed after the topics); push/pull ``[header, body]``;
  reliable tasks in :mod:`zmqfabric.core.task_frames`.
- Requests name their service in the header map (``"svc": name``); an endpoint serving another
  service refuses them. A message is at most the receiver's maximum message size (frames added
  up), and a msgpack body over 16 KiB may not decode to more than 24 times its size.
- A refused request is answered with an error reply that repeats its id whenever the id can be
  read (:func:`request_id`).

Malformed input raises :class:`~zmqfabric.errors.RemoteProtocolError` here, at the one ingress
point; callers count it and carry on.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Mapping

import msgpack

from ..constants import (
    DECODE_ALLOWANCE,
    DECODE_CHECK_SIZE,
    DECODE_EXPANSION,
    MAX_HEADER_SIZE,
    MAX_TOPIC_SIZE,
    PROTOCOL_VERSION,
)
from ..errors import LocalProtocolError, RemoteProtocolError
from .budget import expansion_cost


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3
    EVENT = 4
    MESSAGE = 5
    TASK = 6
    RESULT = 7
    CREDIT = 8


_KINDS: Final = frozenset(int(k) for k in Kind)
_MAX_ID: Final = 2**64 - 1
RAW_HEADERS: Final = {"enc": "raw"}

# --- the canonical header: the byte layout every fast path uses ------------------------------
# Senders write the 21-byte header of the spec with one struct call and a pre-packed 4-byte
# prefix per kind. Receivers recognise it with three tests, written inline on the hot paths of
# patterns/ (a call per message would cost more than the tests), always in this form, with the
# names below imported (or bound) once per module:
#
#     len(h) == HEADER_SIZE and h.startswith(prefix) and h[FLOAT64_AT] == FLOAT64
#
# (``prefix = HEADER_PREFIX[kind]``), and read the id and timestamp back with one
# ``unpack_canonical(h)``. Those tests accept exactly the msgpack arrays ``[1, kind, uint64,
# float64]`` in this one encoding, all of them valid; any other header (another encoding, a
# header map, a bad version or kind, a malformed frame) goes to the parsers below, so every
# message meets the same checks and the same RemoteProtocolError. ``tests/test_fastpath.py``
# checks each inlined decoder against the parsers.

#: ``CANONICAL.pack(HEADER_PREFIX[kind], msg_id, FLOAT64, timestamp)`` is a canonical header;
#: ``CANONICAL.unpack(data)`` gives ``(prefix, msg_id, FLOAT64, timestamp)`` back. struct refuses
#: ids outside uint64 (struct.error).
CANONICAL: Final = struct.Struct(">4sQBd")
#: ``CANONICAL``'s bound methods, for hot paths (no attribute lookup per message).
pack_canonical: Final = CANONICAL.pack
unpack_canonical: Final = CANONICAL.unpack
#: The length of a canonical header: prefix (4), uint64 id (8), float64 tag (1), timestamp (8).
HEADER_SIZE: Final = CANONICAL.size
#: Where the msgpack float64 tag sits in a canonical header (after the prefix and the id).
FLOAT64_AT: Final = 12
#: The msgpack float64 tag.
FLOAT64: Final = 0xCB
#: The first 4 bytes of every canonical header of each kind: fixarray(4), the version as a
#: positive fixint, the kind as a positive fixint, the uint64 tag of the id.
HEADER_PREFIX: Final[Mapping[Kind, bytes]] = MappingProxyType(
    {kind: bytes((0x94, PROTOCOL_VERSION, kind, 0xCF)) for kind in Kind}
)
_PREFIX_KIND: Final = {prefix: kind for kind, prefix in HEADER_PREFIX.items()}


@dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    msg_id: int
    timestamp: float
    headers: dict[str, Any] | None = None

    @property
    def raw(self) -> bool:
        return bool(self.headers) and self.headers.get("enc") == "raw"  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: what a receiver sees of one wire message."""

    kind: Kind
    msg_id: int
    timestamp: float
    body: Any
    topic: str | None = None
    headers: dict[str, Any] | None = None


def pack_header(
    kind: Kind, msg_id: int, timestamp: float, headers: dict[str, Any] | None = None
) -> bytes:
    """Encode a header frame. Raises LocalProtocolError for an id out of range."""
    if not 0 <= msg_id <= _MAX_ID:
        raise LocalProtocolError(f"message id {msg_id} is not an unsigned 64-bit integer")
    if headers:
        return msgpack.packb([PROTOCOL_VERSION, int(kind), msg_id, float(timestamp), headers])
    return pack_canonical(HEADER_PREFIX[kind], msg_id, FLOAT64, timestamp)


def unpack_header(data: bytes) -> Header:
    """Decode and validate a header frame. Raises RemoteProtocolError."""
    if len(data) == HEADER_SIZE and data[FLOAT64_AT] == FLOAT64:
        prefix, msg_id, _, ts = unpack_canonical(data)
        kind = _PREFIX_KIND.get(prefix)
        if kind is not None:
            return Header(kind, msg_id, ts)
    return _unpack_header_slow(data)


def _unpack_header_slow(data: bytes) -> Header:
    if len(data) > MAX_HEADER_SIZE:
        raise RemoteProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_SIZE}")
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(fields, list) or len(fields) not in (4, 5):
        raise RemoteProtocolError("header must be a msgpack array of 4 or 5 items")
    version, kind, msg_id, ts = fields[:4]
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise RemoteProtocolError(
            f"unsupported protocol version {version!r} (this node speaks {PROTOCOL_VERSION})"
        )
    if type(kind) is not int or kind not in _KINDS:
        raise RemoteProtocolError(f"unknown message kind {kind!r}")
    if type(msg_id) is not int or not 0 <= msg_id <= _MAX_ID:
        raise RemoteProtocolError(f"message id {msg_id!r} is not an unsigned 64-bit integer")
    if type(ts) not in (int, float):
        raise RemoteProtocolError(f"timestamp {ts!r} is not a number")
    headers = fields[4] if len(fields) == 5 else None
    if headers is not None and (
        not isinstance(headers, dict) or not all(isinstance(k, str) for k in headers)
    ):
        raise RemoteProtocolError("header map must be a msgpack map with string keys")
    return Header(Kind(kind), msg_id, float(ts), headers or None)


#: How much of a header frame :func:`request_id` reads: an array header and three integers take
#: at most 32 bytes in any msgpack encoding.
_PEEK_SIZE: Final = 64


def request_id(data: bytes) -> int | None:
    """The message id of a header frame that may not parse (another version, over 4096 bytes, a
    bad timestamp or map, a body glued on): the third item of the msgpack array it starts with,
    read from its first 64 bytes only, or None when those do not hold an unsigned 64-bit
    integer there. Every version keeps ``[version, kind, msg_id, ...]`` as the array's first
    items, so that a refusal can always repeat the id of a request whose id can be read
    (docs/PROTOCOL.md, "Refusals"). Never raises."""
    head = _peek(data)
    if head is None or type(head[2]) is not int or not 0 <= head[2] <= _MAX_ID:
        return None
    return head[2]


def _peek(data: bytes) -> tuple[Any, Any, Any] | None:
    """The first three items of the msgpack array ``data`` starts with (version, kind, id), read
    from its first 64 bytes; None if they are not there. Never raises."""
    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=_PEEK_SIZE)
    unpacker.feed(data[:_PEEK_SIZE])
    try:
        if unpacker.read_array_header() < 3:
            return None
        return unpacker.unpack(), unpacker.unpack(), unpacker.unpack()
    except Exception:  # OutOfData, FormatError, StackError, ValueError...: nothing readable
        return None


def pack_body(body: Any) -> bytes:
    """Encode a body as msgpack. Raises LocalProtocolError for values msgpack cannot encode."""
    try:
        return msgpack.packb(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"body cannot be encoded as msgpack: {exc}") from exc


def unpack_body(data: bytes | memoryview, raw: bool = False) -> Any:
    """Decode a body frame. Raises RemoteProtocolError, also for a body larger than
    DECODE_CHECK_SIZE that would expand beyond DECODE_EXPANSION times its size (see Limits)."""
    if raw:
        return bytes(data)
    if len(data) > DECODE_CHECK_SIZE:
        check_expansion(data)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # ExtraData, FormatError, StackError, UnicodeDecodeError, TypeError...
        raise undecodable(exc) from exc


def check_expansion(data: bytes | memoryview) -> None:
    """Raise RemoteProtocolError if decoding ``data`` would make more than DECODE_EXPANSION times
    its size in Python objects (plus DECODE_ALLOWANCE). Stops at the first byte past the budget,
    so a crafted body costs microseconds; an ordinary one about a tenth of a microsecond per
    item. For hot paths that decode bodies larger than DECODE_CHECK_SIZE themselves."""
    if expansion_cost(data, DECODE_EXPANSION, DECODE_ALLOWANCE) < 0:
        raise RemoteProtocolError(
            f"body of {len(data)} bytes would decode to more than {DECODE_EXPANSION} times its "
            "size (nested empty containers or the like): refused"
        )


def undecodable(exc: Exception) -> RemoteProtocolError:
    """The error for a body msgpack cannot decode: what :func:`unpack_body` raises, for hot paths
    that call ``msgpack.unpackb(data, raw=False, strict_map_key=False)`` themselves and catch
    ``Exception`` as it does."""
    return RemoteProtocolError(f"body is not valid msgpack: {exc}")


def decode_topic(data: bytes) -> str:
    if len(data) > MAX_TOPIC_SIZE:
        raise RemoteProtocolError(f"topic of {len(data)} bytes exceeds {MAX_TOPIC_SIZE}")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("topic is not valid UTF-8") from exc


def encode_topic(topic: str | bytes) -> bytes:
    """A topic as UTF-8 bytes. Raises LocalProtocolError for non-text or oversized topics."""
    if isinstance(topic, str):
        try:
            data = topic.encode()
        except UnicodeEncodeError as exc:
            raise LocalProtocolError(f"topic {topic!r} cannot be encoded as UTF-8") from exc
    elif isinstance(topic, (bytes, bytearray, memoryview)):
        data = bytes(topic)
    else:
        raise LocalProtocolError(f"a topic is a str or bytes, not {type(topic).__name__}")
    if len(data) > MAX_TOPIC_SIZE:
        raise LocalProtocolError(f"topic of {len(data)} bytes exceeds {MAX_TOPIC_SIZE}")
    return data


# --- per-pattern framing ---------------------------------------------------------------------


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
        "request has no routing envelope: expected [identity..., b'', header, body]"
    )


def parse_request(payload: list[bytes], service: str | None = None) -> tuple[Header, Any]:
    """Decode ``[header, body]`` of a request (after the route). Raises RemoteProtocolError, also
    for a request that names another service than ``service`` (when given)."""
    if len(payload) != 2:
        head = _peek(payload[0]) if payload else None
        if head is not None and head[0] != PROTOCOL_VERSION:  # one frame: a later version?
            raise RemoteProtocolError(
                f"unsupported protocol version {head[0]!r} (this node speaks {PROTOCOL_VERSION})"
            )
        raise RemoteProtocolError(f"request must be [header, body], got {len(payload)} frames")
    header = unpack_header(payload[0])
    if header.kind is not Kind.REQUEST:
        raise RemoteProtocolError(f"expected a request, got kind {header.kind.name.lower()}")
    if service is not None:
        check_service(header, service)
    return header, unpack_body(payload[1], header.raw)


# --- the service a request names (defence in depth: a request on the wrong port is refused) ---

#: The header map key naming a request's service.
SERVICE_KEY: Final = "svc"
#: The first 4 bytes of a canonical request header that carries a header map (5-item array).
_REQUEST_WITH_MAP: Final = bytes((0x95, PROTOCOL_VERSION, Kind.REQUEST, 0xCF))
_REQUEST_PLAIN: Final = HEADER_PREFIX[Kind.REQUEST]
_unpack_canonical_from: Final = CANONICAL.unpack_from


def service_tail(service: str) -> bytes:
    """The packed header map ``{"svc": service}`` that follows a canonical request's timestamp
    (computed once per requester or endpoint)."""
    return msgpack.packb({SERVICE_KEY: service})


def name_service(header: bytes, tail: bytes) -> bytes:
    """``header`` (a request header from :func:`pack_header`) naming the service of ``tail``
    (:func:`service_tail`). A canonical header gets the map appended; a header with a map of
    its own (raw bodies) is packed again with the key added."""
    if len(header) == HEADER_SIZE and header[0] == 0x94:
        return b"\x95" + header[1:] + tail
    fields = msgpack.unpackb(header, raw=False)
    headers = dict(fields[4]) if len(fields) == 5 and fields[4] else {}
    headers.update(msgpack.unpackb(tail, raw=False))
    return msgpack.packb([*fields[:4], headers])


def canonical_request_id(head: bytes, tail: bytes) -> int | None:
    """The message id of a canonical request header, with no service or the service of ``tail``;
    None for any other header (parse it with :func:`parse_request`, which checks everything).
    The service endpoint's fast path."""
    size = len(head)
    if size == HEADER_SIZE:
        if head.startswith(_REQUEST_PLAIN) and head[FLOAT64_AT] == FLOAT64:
            return _unpack_canonical_from(head)[1]  # type: ignore[no-any-return]
    elif (size == HEADER_SIZE + len(tail) and head.startswith(_REQUEST_WITH_MAP)
          and head[FLOAT64_AT] == FLOAT64 and head.endswith(tail)):
        return _unpack_canonical_from(head)[1]  # type: ignore[no-any-return]
    return None


def check_service(header: Header, service: str) -> None:
    """Raise RemoteProtocolError when the request names a service other than ``service``."""
    named = header.headers.get(SERVICE_KEY) if header.headers else None
    if named is not None and named != service:
        shown = named[:64] if isinstance(named, str) else type(named).__name__
        raise RemoteProtocolError(
            f"request for service {shown!r} reached {service!r}: refused (wrong port)"
        )


def parse_reply(frames: list[bytes]) -> tuple[Header, Any]:
    """Decode ``["", header, body]`` as a DEALER receives a reply. Raises RemoteProtocolError."""
    if len(frames) != 3 or frames[0]:
        raise RemoteProtocolError(f"reply must be ['', header, body], got {len(frames)} frames")
    header = unpack_header(frames[1])
    if header.kind is not Kind.REPLY and header.kind is not Kind.ERROR:
        raise RemoteProtocolError(f"expected a reply, got kind {header.kind.name.lower()}")
    body = unpack_body(frames[2], header.raw)
    if header.kind is Kind.ERROR and not (
        isinstance(body, dict)
        and isinstance(body.get("type"), str)
        and isinstance(body.get("message"), str)
    ):
        raise RemoteProtocolError("error reply body must be {'type': str, 'message': str}")
    return header, body


def parse_event(frames: list[bytes]) -> Message:
    """Decode ``[topic, header, body]``. Raises RemoteProtocolError."""
    if len(frames) != 3:
        raise RemoteProtocolError(f"event must be [topic, header, body], got {len(frames)} frames")
    header = unpack_header(frames[1])
    if header.kind is not Kind.EVENT:
        raise RemoteProtocolError(f"expected an event, got kind {header.kind.name.lower()}")
    return Message(
        header.kind,
        header.msg_id,
        header.timestamp,
        unpack_body(frames[2], header.raw),
        decode_topic(frames[0]),
        header.headers,
    )


def parse_message(frames: list[bytes]) -> Message:
    """Decode ``[header, body]`` of a pipeline. Raises RemoteProtocolError."""
    if len(frames) != 2:
        raise RemoteProtocolError(f"message must be [header, body], got {len(frames)} frames")
    header = unpack_header(frames[0])
    if header.kind is not Kind.MESSAGE:
        raise RemoteProtocolError(f"expected a message, got kind {header.kind.name.lower()}")
    return Message(
        header.kind,
        header.msg_id,
        header.timestamp,
        unpack_body(frames[1], header.raw),
        None,
        header.headers,
    )


def error_body(exc: BaseException) -> dict[str, str]:
    """The body of an error reply describing ``exc``; always encodable (odd text is escaped)."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not take the serve loop down with it
        text = f"<unprintable {type(exc).__name__}>"
    return {
        "type": type(exc).__name__,
        "message": text.encode("utf-8", "backslashreplace").decode("utf-8"),
    }


# --- encoding errors of the hot paths ---------------------------------------------------------


def unencodable(exc: Exception) -> LocalProtocolError:
    """The error for a body msgpack cannot encode (for hot paths that pack with their own
    ``msgpack.Packer``, which raises TypeError, ValueError or OverflowError)."""
    return LocalProtocolError(f"body cannot be encoded as msgpack: {exc}")


#: What an msgpack Packer raises for a body it cannot encode.
PACK_ERRORS: Final = (TypeError, ValueError, OverflowError)
