"""The zmqfabric wire format, version 2: frames <-> typed messages. Pure: no IO, no clock.

The specification is ``docs/PROTOCOL.md`` (section 5, messages; section 7, the frames of each
pattern); this module implements it, with the byte layout in :mod:`.wire_layout`, bodies and
topics in :mod:`.wire_body` and requests in :mod:`.wire_request` (all re-exported here), and
``tests/test_interop.py`` and ``tests/test_interop_serving.py`` check it against plain pyzmq
programs. In short:

- A message is one frame, the msgpack array ``[2, kind, msg_id, timestamp, body]`` (or with a
  header map after the body); kinds 1 request, 2 reply, 3 error reply, 4 event, 5 message,
  6 tasks, 7 results, 8 credit; ``msg_id`` < 2**64 (a reply repeats its request's). zmqfabric
  writes the first four items as 21 bytes (``95 02 KK CF <id> CB <timestamp>``); readers accept
  any msgpack encoding.
- Or two frames: a header ``[2, kind | 16, msg_id, timestamp(, headers)]`` (at most 4096 bytes)
  and a body frame, msgpack or raw bytes under ``"enc": "raw"``: large raw bodies travel so,
  without a copy. A batch ``[2, kind | 32, first_id, timestamp, [body, ...]]`` carries several
  messages of a pipeline or stream in one frame.
- Per pattern: request/reply ``["", message...]`` on a ROUTER; publish/subscribe one frame
  ``topic NUL message`` (ZeroMQ's prefix filter sees the topic first), subscriber markers
  ``\\xffzf/sub/`` + 16 hex digits; push/pull the message's frames; tasks in
  :mod:`zmqfabric.core.task_frames` (two-frame messages).
- Version 1 (``[1, ...]`` header frames) is refused, counted, and answered (requests) with an
  error reply that repeats the request's id.

Malformed input raises :class:`~zmqfabric.errors.RemoteProtocolError` here, at the one ingress
point; callers count it and carry on.
"""

from __future__ import annotations

from ..errors import RemoteProtocolError
from .wire_body import (
    PACK_ERRORS,
    TOPIC_END,
    check_expansion,
    decode_topic,
    encode_topic,
    error_body,
    pack_body,
    split_topic,
    undecodable,
    unencodable,
    unpack_body,
)
from .wire_codec import (
    expand,
    pack_header,
    pack_message,
    parse_frames,
    unpack_frame,
    unpack_header,
)
from .wire_layout import (
    BATCH,
    BATCH_PREFIX,
    CANONICAL,
    FLOAT64,
    FLOAT64_AT,
    FOLLOWS,
    HEADER_PREFIX,
    HEADER_SIZE,
    KINDS,
    MAPPED_PREFIX,
    MAX_ID,
    MESSAGE_PREFIX,
    RAW_HEADER_SIZE,
    RAW_HEADERS,
    RAW_MAP,
    RAW_PREFIX,
    Header,
    Kind,
    Message,
    pack_canonical,
    unpack_canonical,
    unpack_canonical_from,
)
from .wire_request import (
    SERVICE_KEY,
    canonical_request,
    check_service,
    name_service,
    parse_reply,
    parse_request,
    request_id,
    service_tail,
    split_route,
)

__all__ = [
    "BATCH", "BATCH_PREFIX", "CANONICAL", "FLOAT64", "FLOAT64_AT", "FOLLOWS", "HEADER_PREFIX",
    "HEADER_SIZE", "KINDS", "MAPPED_PREFIX", "MAX_ID", "MESSAGE_PREFIX", "PACK_ERRORS",
    "RAW_HEADER_SIZE", "RAW_HEADERS", "RAW_MAP", "RAW_PREFIX", "SERVICE_KEY", "TOPIC_END",
    "Header", "Kind", "Message", "canonical_request",
    "check_expansion", "check_service", "decode_topic", "encode_topic", "error_body",
    "expand", "name_service", "pack_body", "pack_canonical", "pack_header", "pack_message",
    "parse_event", "parse_frames", "parse_message", "parse_reply", "parse_request",
    "request_id", "service_tail", "split_route", "split_topic", "undecodable", "unencodable",
    "unpack_body", "unpack_canonical", "unpack_canonical_from", "unpack_frame", "unpack_header",
]

def parse_event(frames: list[bytes]) -> list[Message]:
    """Decode a stream message: ``topic NUL message`` (or that and a body frame). Returns its
    events (a batch has several). Raises RemoteProtocolError."""
    if not frames:
        raise RemoteProtocolError("empty event")
    topic, first = split_topic(frames[0])
    header, body = parse_frames([first, *frames[1:]], Kind.EVENT)
    return expand(header, body, decode_topic(topic))


def parse_message(frames: list[bytes]) -> list[Message]:
    """Decode a pipeline message. Returns its messages (a batch has several). Raises
    RemoteProtocolError."""
    header, body = parse_frames(frames, Kind.MESSAGE)
    return expand(header, body)
