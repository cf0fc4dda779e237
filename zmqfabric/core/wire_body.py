"""Bodies and topics of the zmqfabric wire format: encoding, decoding with the expansion
bound, the errors the hot paths raise. Pure: no IO, no clock. :mod:`zmqfabric.core.wire` is the
public face of this module; the specification is ``docs/PROTOCOL.md``."""

from __future__ import annotations

from typing import Any, Final

import msgpack

from ..constants import DECODE_ALLOWANCE, DECODE_CHECK_SIZE, DECODE_EXPANSION, MAX_TOPIC_SIZE
from ..errors import LocalProtocolError, RemoteProtocolError
from .budget import expansion_cost

#: What separates a stream frame's topic from its message (a topic never holds it).
TOPIC_END: Final = b"\x00"


def pack_body(body: Any) -> bytes:
    """Encode a body as msgpack. Raises LocalProtocolError for values msgpack cannot encode."""
    try:
        return msgpack.packb(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"body cannot be encoded as msgpack: {exc}") from exc


def unpack_body(data: bytes | memoryview, raw: bool = False) -> Any:
    """Decode a body frame; a raw one is ``data`` itself (bytes, or a memoryview over a large
    received frame, not copied). Raises RemoteProtocolError, also for a body larger than
    DECODE_CHECK_SIZE that would expand beyond DECODE_EXPANSION times its size (see Limits)."""
    if raw:
        return data if type(data) is memoryview else bytes(data)
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
    """A topic's UTF-8 text. Raises RemoteProtocolError for oversized or invalid text."""
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
    if TOPIC_END in data:
        raise LocalProtocolError(f"topic {data[:64]!r} holds a NUL byte (the topic's end)")
    return data


def split_topic(data: bytes) -> tuple[bytes, bytes]:
    """(topic, message) of a stream frame ``topic NUL message``. Raises RemoteProtocolError when
    no NUL ends a topic within MAX_TOPIC_SIZE bytes."""
    end = data.find(0, 0, MAX_TOPIC_SIZE + 1)
    if end < 0:
        raise RemoteProtocolError("stream frame has no topic end (NUL) in its first "
                                  f"{MAX_TOPIC_SIZE + 1} bytes")
    return data[:end], data[end + 1:]


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
