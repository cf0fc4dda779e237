"""Unit tests of the pure wire core (:mod:`zmqfabric.core.wire` and its task frames,
:mod:`zmqfabric.core.task_frames`), property-based.

Two halves: round trips (whatever we write, we read back exactly; and whatever the written spec
allows another implementation to write, we read) and rejection (every decoder, given any bytes or
frames at all, returns a valid value or raises RemoteProtocolError; never another exception).
No sockets, no clock: these run in milliseconds.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Callable

import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from zmqfabric.constants import MAX_HEADER_SIZE, MAX_TASK_ID, MAX_TOPIC_SIZE, PROTOCOL_VERSION
from zmqfabric.core import task_frames, wire
from zmqfabric.core.wire import Header, Kind, Message
from zmqfabric.errors import FabricError, LocalProtocolError, RemoteProtocolError

ROUND_TRIP = settings(max_examples=50, deadline=None)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U64 = 2**64 - 1

# --- strategies ------------------------------------------------------------------------------

kinds = st.sampled_from(list(Kind))
msg_ids = st.integers(0, U64)
timestamps = st.floats(allow_nan=False)  # inf and -0.0 included; NaN has its own test
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.floats(allow_nan=False)
    | st.text(max_size=16)
    | st.binary(max_size=16)
)
#: Values msgpack round-trips exactly (lists, not tuples; str keys).
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
header_maps = st.dictionaries(st.text(max_size=12), values, max_size=4)


def canonical(kind: int, msg_id: int, ts: float, version: int = 2, flags: int = 0x10) -> bytes:
    """The 21-byte header frame exactly as the spec draws it (``94 02 KK|10 CF ...``); with
    ``flags=0`` and an array of 5 instead, a one-frame message's first 21 bytes."""
    return (
        bytes((0x94 if flags == 0x10 else 0x95, version, kind | flags, 0xCF))
        + msg_id.to_bytes(8, "big")
        + b"\xcb"
        + struct.pack(">d", ts)
    )


def valid_frames_pool() -> st.SearchStrategy[bytes]:
    """Frames that are often valid pieces, so that fuzzed messages reach the deep checks."""
    headers = st.builds(
        lambda k, i, t, raw: wire.pack_header(k, i, t, wire.RAW_HEADERS if raw else None),
        kinds,
        msg_ids,
        timestamps,
        st.booleans(),
    )
    bodies = values.map(msgpack.packb)
    messages = st.builds(
        lambda k, i, t, v, topic: (b"t\x00" if topic else b"")
        + wire.pack_message(k, i, t, msgpack.packb(v)),
        kinds, msg_ids, timestamps, values, st.booleans(),
    )
    error_bodies = st.builds(
        lambda t, m: msgpack.packb({"type": t, "message": m}), st.text(), st.text()
    )
    return st.one_of(
        st.just(b""),
        st.binary(max_size=40),
        headers,
        bodies,
        messages,
        error_bodies,
        st.sampled_from([b"\xc1", b"\xff\xfe", "topic".encode(), b"\x94\x02\x01\x00\x00"]),
    )


frame_lists = st.lists(valid_frames_pool(), max_size=5)


# --- header: round trips ---------------------------------------------------------------------


@ROUND_TRIP
@given(kinds, msg_ids, timestamps)
@example(Kind.REQUEST, 0, 0.0)
@example(Kind.MESSAGE, U64, -0.0)
@example(Kind.EVENT, 2**63, math.inf)
def test_canonical_header_is_the_documented_21_bytes(kind: Kind, msg_id: int, ts: float) -> None:
    data = wire.pack_header(kind, msg_id, ts)
    assert data == canonical(int(kind), msg_id, ts)
    assert len(data) == wire.HEADER_SIZE == 21
    assert data[:4] == wire.HEADER_PREFIX[kind]
    assert data[wire.FLOAT64_AT] == wire.FLOAT64
    assert wire.unpack_canonical(data) == (wire.HEADER_PREFIX[kind], msg_id, wire.FLOAT64, ts)
    # It is ordinary msgpack: any msgpack reader sees the documented array.
    assert msgpack.unpackb(data) == [PROTOCOL_VERSION, int(kind) | wire.FOLLOWS, msg_id, ts]
    assert wire.unpack_header(data) == Header(kind, msg_id, ts, None, True)


def test_nan_timestamp_round_trips() -> None:
    header = wire.unpack_header(wire.pack_header(Kind.EVENT, 7, math.nan))
    assert header.kind is Kind.EVENT and header.msg_id == 7 and math.isnan(header.timestamp)


@ROUND_TRIP
@given(kinds, msg_ids, timestamps, header_maps)
def test_header_with_map_round_trips(
    kind: Kind, msg_id: int, ts: float, headers: dict[str, Any]
) -> None:
    data = wire.pack_header(kind, msg_id, ts, headers)
    assume(len(data) <= MAX_HEADER_SIZE)
    header = wire.unpack_header(data)
    assert (header.kind, header.msg_id, header.timestamp) == (kind, msg_id, ts)
    assert header.headers == (headers or None)
    assert header.raw == (headers.get("enc") == "raw")


def test_raw_header_flag() -> None:
    assert wire.unpack_header(wire.pack_header(Kind.MESSAGE, 1, 0.0, wire.RAW_HEADERS)).raw
    assert not wire.unpack_header(wire.pack_header(Kind.MESSAGE, 1, 0.0)).raw
    assert not wire.unpack_header(wire.pack_header(Kind.MESSAGE, 1, 0.0, {"enc": "msgpack"})).raw


# Another implementation may encode the same array in any valid msgpack way: a version as uint8,
# an id as fixint, a float32 timestamp, an integer timestamp, array16... all must be accepted.


def _int_encodings(value: int) -> list[bytes]:
    out = []
    if 0 <= value <= 0x7F:
        out.append(bytes((value,)))
    if -32 <= value < 0:
        out.append(struct.pack(">b", value))
    for low, high, tag, fmt in (
        (0, 2**8 - 1, 0xCC, ">B"),
        (0, 2**16 - 1, 0xCD, ">H"),
        (0, 2**32 - 1, 0xCE, ">I"),
        (0, U64, 0xCF, ">Q"),
        (-(2**7), 2**7 - 1, 0xD0, ">b"),
        (-(2**15), 2**15 - 1, 0xD1, ">h"),
        (-(2**31), 2**31 - 1, 0xD2, ">i"),
        (-(2**63), 2**63 - 1, 0xD3, ">q"),
    ):
        if low <= value <= high:
            out.append(bytes((tag,)) + struct.pack(fmt, value))
    return out


def _float_encodings(value: float) -> list[bytes]:
    out = [b"\xcb" + struct.pack(">d", value)]
    try:
        single = struct.pack(">f", value)
    except OverflowError:
        return out
    if struct.unpack(">f", single)[0] == value:
        out.append(b"\xca" + single)
    return out


def _array_prefixes(n: int) -> list[bytes]:
    return [bytes((0x90 | n,)), b"\xdc" + struct.pack(">H", n), b"\xdd" + struct.pack(">I", n)]


def _map_encodings(headers: dict[str, Any]) -> list[bytes]:
    items = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in headers.items())
    return [msgpack.packb(headers), b"\xde" + struct.pack(">H", len(headers)) + items]


@ROUND_TRIP
@given(
    st.data(),
    kinds,
    msg_ids,
    st.one_of(st.floats(allow_nan=False), st.integers(-(2**63), U64)),
    st.none() | header_maps.filter(bool),
)
def test_any_msgpack_encoding_of_a_header_is_accepted(
    data: st.DataObject, kind: Kind, msg_id: int, ts: float | int, headers: dict[str, Any] | None
) -> None:
    def pick(options: list[bytes]) -> bytes:
        return data.draw(st.sampled_from(options))

    fields = [
        pick(_int_encodings(PROTOCOL_VERSION)),
        pick(_int_encodings(int(kind) | wire.FOLLOWS)),
        pick(_int_encodings(msg_id)),
        pick(_int_encodings(ts) if isinstance(ts, int) else _float_encodings(ts)),
    ]
    if headers is not None:
        fields.append(pick(_map_encodings(headers)))
    encoded = pick(_array_prefixes(len(fields))) + b"".join(fields)
    assume(len(encoded) <= MAX_HEADER_SIZE)
    assert msgpack.unpackb(encoded, strict_map_key=False)[2] == msg_id  # the test's own encoder
    header = wire.unpack_header(encoded)
    assert (header.kind, header.msg_id, header.timestamp) == (kind, msg_id, float(ts))
    assert type(header.timestamp) is float
    assert header.headers == headers


@pytest.mark.parametrize("msg_id", [-1, 2**64, 2**70])
def test_pack_header_refuses_ids_outside_u64(msg_id: int) -> None:
    with pytest.raises(LocalProtocolError, match="64-bit"):
        wire.pack_header(Kind.REQUEST, msg_id, 0.0)


# --- header: rejection ----------------------------------------------------------------------

_GOOD = [2, 1 | 0x10, 5, 0.5]


def _with(index: int, value: Any) -> bytes:
    fields = list(_GOOD)
    fields[index] = value
    return msgpack.packb(fields)


BAD_HEADERS = {
    "empty": (b"", "msgpack"),
    "not msgpack": (b"\xc1", "msgpack"),
    "truncated canonical": (canonical(1, 5, 0.5)[:-1], "msgpack"),
    "trailing data": (canonical(1, 5, 0.5) + b"\x00", "msgpack"),
    "not an array": (msgpack.packb({"v": 1}), "array"),
    "an integer": (msgpack.packb(1), "array"),
    "3 items": (msgpack.packb([2, 17, 5]), "array"),
    "6 items": (msgpack.packb([2, 17, 5, 0.5, {}, 1]), "array"),
    "version 1 canonical": (bytes((0x94, 1, 1, 0xCF)) + canonical(1, 5, 0.5)[4:], "version 1"),
    "version 1": (_with(0, 1), "version 1"),
    "version 3": (_with(0, 3), "version 3"),
    "version 0": (_with(0, 0), "version"),
    "version true": (_with(0, True), "version"),
    "version 2.0": (_with(0, 2.0), "version"),
    "version '1'": (_with(0, "1"), "version"),
    "kind 0": (_with(1, 0), "kind"),
    "kind 16 (follows, no kind)": (_with(1, 16), "kind"),
    "follows and batch": (_with(1, 0x31), "kind"),
    "a whole message": (msgpack.packb([2, 1, 5, 0.5, "body"]), "header frame"),
    "kind after the last": (_with(1, max(Kind) + 1), "kind"),
    "kind after the last, canonical": (canonical(max(Kind) + 1, 5, 0.5), "kind"),
    "kind 127 canonical": (canonical(127, 5, 0.5), "kind"),
    "kind 255": (_with(1, 255), "kind"),
    "kind true": (_with(1, True), "kind"),
    "kind 1.0": (_with(1, 1.0), "kind"),
    "negative id": (_with(2, -1), "id"),
    "float id": (_with(2, 1.5), "id"),
    "nil id": (_with(2, None), "id"),
    "bool id": (_with(2, True), "id"),
    "text timestamp": (_with(3, "now"), "timestamp"),
    "nil timestamp": (_with(3, None), "timestamp"),
    "bool timestamp": (_with(3, False), "timestamp"),
    "array headers": (msgpack.packb([2, 17, 5, 0.5, [1, 2]]), "map"),
    "text headers": (msgpack.packb([2, 17, 5, 0.5, "enc"]), "map"),
    "int-keyed headers": (msgpack.packb([2, 17, 5, 0.5, {1: 2}]), "msgpack"),
    "huge header": (msgpack.packb([2, 17, 5, 0.5, {"pad": "x" * MAX_HEADER_SIZE}]), "exceeds"),
}


@pytest.mark.parametrize("data, says", BAD_HEADERS.values(), ids=list(BAD_HEADERS))
def test_bad_headers_are_refused_with_a_reason(data: bytes, says: str) -> None:
    with pytest.raises(RemoteProtocolError, match=says):
        wire.unpack_header(data)


def test_header_map_with_binary_keys_is_refused() -> None:
    """Spec: the headers map has string keys (msgpack's strict_map_key still allows bin keys)."""
    with pytest.raises(RemoteProtocolError, match="string keys"):
        wire.unpack_header(msgpack.packb([2, 17, 5, 0.5, {b"enc": b"raw"}]))


def _check_header(header: Header, data: bytes) -> None:
    """A header that was accepted is what the bytes say, by an independent msgpack read."""
    assert isinstance(header, Header)
    assert isinstance(header.kind, Kind)
    assert 0 <= header.msg_id <= U64
    assert type(header.timestamp) is float
    assert header.headers is None or (isinstance(header.headers, dict) and header.headers)
    fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
    assert isinstance(fields, list) and len(fields) in (4, 5)
    assert fields[0] == PROTOCOL_VERSION and type(fields[0]) is int
    assert fields[1] == header.kind | wire.FOLLOWS and fields[2] == header.msg_id
    assert len(data) <= MAX_HEADER_SIZE


@FUZZ
@given(st.binary(max_size=64))
@example(canonical(1, 1, 0.0))
def test_unpack_header_fuzz_bytes(data: bytes) -> None:
    try:
        header = wire.unpack_header(data)
    except RemoteProtocolError:
        return
    _check_header(header, data)


@FUZZ
@given(
    kinds,
    msg_ids,
    timestamps,
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_unpack_header_fuzz_mutated_canonical(
    kind: Kind, msg_id: int, ts: float, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(wire.pack_header(kind, msg_id, ts))
    for position, value in edits:
        data[position] = value
    try:
        header = wire.unpack_header(bytes(data))
    except RemoteProtocolError:
        return
    _check_header(header, bytes(data))


def test_oversized_input_is_refused_whatever_it_holds() -> None:
    data = msgpack.packb([2, 17, 5, 0.5, {"k": b"x" * (MAX_HEADER_SIZE + 10)}])
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        wire.unpack_header(data)
    with pytest.raises(RemoteProtocolError):
        wire.unpack_header(b"\x00" * (MAX_HEADER_SIZE + 1))


# --- body ------------------------------------------------------------------------------------


@ROUND_TRIP
@given(values)
@example({1: "int key", b"k": "bin key"})
@example(b"\x00" * 70_000)
def test_body_round_trips(value: Any) -> None:
    data = wire.pack_body(value)
    assert data == msgpack.packb(value)  # a body is plain msgpack
    assert wire.unpack_body(data) == value


@FUZZ
@given(st.floats())
def test_float_bodies_round_trip_bit_exactly(value: float) -> None:
    data = wire.pack_body(value)
    assert wire.pack_body(wire.unpack_body(data)) == data


@ROUND_TRIP
@given(st.binary(max_size=256))
def test_raw_bodies_are_the_bytes_themselves(data: bytes) -> None:
    assert wire.unpack_body(data, raw=True) == data
    assert type(wire.unpack_body(data, raw=True)) is bytes
    view = memoryview(data)  # a large received frame, kept (pipelines): not copied
    assert wire.unpack_body(view, raw=True) is view


@pytest.mark.parametrize(
    "value",
    [object(), 2**64, -(2**63) - 1, {"a": {1, 2}}, [object()], "\ud800"],
    ids=["object", "u64+1", "i64-1", "set", "nested object", "lone surrogate"],
)
def test_pack_body_refuses_what_msgpack_cannot_encode(value: Any) -> None:
    with pytest.raises(LocalProtocolError, match="msgpack"):
        wire.pack_body(value)


BAD_BODIES = {
    "empty": b"",
    "never-used byte": b"\xc1",
    "trailing data": b"\x01\x02",
    "truncated str": b"\xa5ab",
    "invalid utf-8 str": b"\xa2\xff\xfe",
    "declared huge array": b"\xdd\xff\xff\xff\xff",
    "declared huge map": b"\xdf\xff\xff\xff\xff",
    "deep nesting": b"\x91" * 5000 + b"\xc0",
    "unhashable map key": b"\x81\x90\x01",
    "bad timestamp ext": b"\xc7\x01\xff\x00",
}


@pytest.mark.parametrize("data", BAD_BODIES.values(), ids=list(BAD_BODIES))
def test_bad_bodies_are_refused(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="msgpack"):
        wire.unpack_body(data)


@FUZZ
@given(st.binary(max_size=128))
def test_unpack_body_fuzz(data: bytes) -> None:
    try:
        value = wire.unpack_body(data)
    except RemoteProtocolError:
        return
    assert msgpack.unpackb(data, raw=False, strict_map_key=False) == value or value != value


# --- topics ----------------------------------------------------------------------------------


@ROUND_TRIP
@given(st.text(max_size=300))
@example("")
@example("é" * (MAX_TOPIC_SIZE // 2))
def test_topics_round_trip(topic: str) -> None:
    data = topic.encode()
    if "\x00" in topic and len(data) <= MAX_TOPIC_SIZE:
        with pytest.raises(LocalProtocolError, match="NUL"):
            wire.encode_topic(topic)  # NUL ends a topic in a stream frame
        return
    if len(data) > MAX_TOPIC_SIZE:
        with pytest.raises(LocalProtocolError):
            wire.encode_topic(topic)
        with pytest.raises(RemoteProtocolError):
            wire.decode_topic(data)
        return
    assert wire.encode_topic(topic) == data
    assert wire.decode_topic(data) == topic


def test_topic_size_limit_is_in_bytes() -> None:
    assert wire.decode_topic(b"t" * MAX_TOPIC_SIZE) == "t" * MAX_TOPIC_SIZE
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        wire.decode_topic(b"t" * (MAX_TOPIC_SIZE + 1))
    with pytest.raises(LocalProtocolError, match="exceeds"):
        wire.encode_topic("é" * (MAX_TOPIC_SIZE // 2 + 1))


@pytest.mark.parametrize("data", [b"\xff", b"ok\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_invalid_utf8_topics_are_refused(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        wire.decode_topic(data)


@FUZZ
@given(st.binary(max_size=MAX_TOPIC_SIZE + 8))
def test_decode_topic_fuzz(data: bytes) -> None:
    try:
        topic = wire.decode_topic(data)
    except RemoteProtocolError:
        return
    assert topic.encode() == data


def test_unencodable_topic_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError, match="UTF-8"):
        wire.encode_topic("\ud800")


@pytest.mark.parametrize("topic", [5, 10**10, None, 1.5, ["t"]], ids=repr)
def test_non_text_topic_is_refused(topic: Any) -> None:
    """Not bytes(5) == five NUL bytes, and no 10 GB allocation for bytes(10**10)."""
    with pytest.raises(LocalProtocolError, match="str or bytes"):
        wire.encode_topic(topic)


def test_bytes_topics_pass_through() -> None:
    assert wire.encode_topic(b"\x01raw") == b"\x01raw"
    with pytest.raises(LocalProtocolError, match="NUL"):
        wire.encode_topic(b"\x00raw")
    assert wire.encode_topic(bytearray(b"ab")) == b"ab"  # type: ignore[arg-type]


# --- per-pattern framing: round trips --------------------------------------------------------


def one(kind: Kind, msg_id: int, ts: float, body: Any, headers: bytes = b"") -> bytes:
    return wire.pack_message(kind, msg_id, ts, wire.pack_body(body), headers)


@ROUND_TRIP
@given(kinds, msg_ids, timestamps, values)
def test_one_frame_message_is_the_documented_array(
    kind: Kind, msg_id: int, ts: float, body: Any
) -> None:
    """``[2, kind, id, ts, body]``, its first 21 bytes the canonical fields; any msgpack reader
    sees the array."""
    data = one(kind, msg_id, ts, body)
    assert data[:21] == canonical(int(kind), msg_id, ts, flags=0)
    assert data.startswith(wire.MESSAGE_PREFIX[kind]) and data[wire.FLOAT64_AT] == wire.FLOAT64
    assert msgpack.unpackb(data, strict_map_key=False) == [2, int(kind), msg_id, ts, body]
    assert wire.parse_frames([data]) == (Header(kind, msg_id, ts), body)


@ROUND_TRIP
@given(msg_ids, timestamps, values, st.text(max_size=20))
def test_request_round_trip(msg_id: int, ts: float, body: Any, service: str) -> None:
    for frames in (
        [one(Kind.REQUEST, msg_id, ts, body)],
        [wire.pack_header(Kind.REQUEST, msg_id, ts), wire.pack_body(body)],
    ):
        header, got = wire.parse_request(frames)
        assert (header.kind, header.msg_id, header.timestamp, got) == (
            Kind.REQUEST, msg_id, ts, body)
    named = one(Kind.REQUEST, msg_id, ts, body, wire.service_tail(service))
    header, got = wire.parse_request([named], service)
    assert header.headers == {"svc": service} and got == body
    assert wire.canonical_request(named, {"svc": service}) in (None, (msg_id, body))
    if len(named) <= 16 * 1024:
        assert wire.canonical_request(named, {"svc": service}) == (msg_id, body)
        assert wire.canonical_request(named, {"svc": service + "x"}) is None
    with pytest.raises(RemoteProtocolError, match="wrong port"):
        wire.parse_request([named], service + "x")


@ROUND_TRIP
@given(msg_ids, timestamps, values)
def test_reply_round_trip(msg_id: int, ts: float, body: Any) -> None:
    assert wire.parse_reply([b"", one(Kind.REPLY, msg_id, ts, body)]) == (
        Header(Kind.REPLY, msg_id, ts), body)


def test_error_reply_round_trip() -> None:
    body = wire.error_body(ValueError("boom"))
    assert body == {"type": "ValueError", "message": "boom"}
    assert wire.parse_reply([b"", one(Kind.ERROR, 9, 1.0, body)]) == (
        Header(Kind.ERROR, 9, 1.0), body)
    two = [b"", wire.pack_header(Kind.ERROR, 9, 1.0), wire.pack_body(body)]
    assert wire.parse_reply(two)[1] == body


@ROUND_TRIP
@given(st.text(max_size=40).filter(lambda t: "\x00" not in t), msg_ids, timestamps, values)
def test_event_round_trip(topic: str, msg_id: int, ts: float, body: Any) -> None:
    frame = wire.encode_topic(topic) + wire.TOPIC_END + one(Kind.EVENT, msg_id, ts, body)
    assert wire.parse_event([frame]) == [Message(Kind.EVENT, msg_id, ts, body, topic, None)]


@ROUND_TRIP
@given(msg_ids, timestamps, values)
def test_message_round_trip(msg_id: int, ts: float, body: Any) -> None:
    assert wire.parse_message([one(Kind.MESSAGE, msg_id, ts, body)]) == [
        Message(Kind.MESSAGE, msg_id, ts, body, None, None)]


@ROUND_TRIP
@given(msg_ids, timestamps, st.lists(values, max_size=8))
def test_batch_round_trip(msg_id: int, ts: float, bodies: list[Any]) -> None:
    """A batch is the messages first_id, first_id + 1, ... (ids wrap at 2**64)."""
    data = (wire.pack_canonical(wire.BATCH_PREFIX[Kind.MESSAGE], msg_id, wire.FLOAT64, ts)
            + msgpack.packb(bodies))
    assert msgpack.unpackb(data, strict_map_key=False) == [2, 0x25, msg_id, ts, bodies]
    got = wire.parse_message([data])
    assert [m.body for m in got] == bodies
    assert [m.msg_id for m in got] == [(msg_id + i) % 2**64 for i in range(len(bodies))]
    with pytest.raises(RemoteProtocolError, match="batch"):
        wire.parse_message([msgpack.packb([2, 0x25, 1, 0.0, "not a list"])])


@ROUND_TRIP
@given(st.binary(max_size=300))
def test_raw_bodies_in_every_pattern(payload: bytes) -> None:
    def header(kind: Kind) -> bytes:
        return wire.pack_header(kind, 3, 0.0, wire.RAW_HEADERS)

    assert wire.parse_request([header(Kind.REQUEST), payload])[1] == payload
    assert wire.parse_reply([b"", header(Kind.REPLY), payload])[1] == payload
    assert wire.parse_event([b"t\x00" + header(Kind.EVENT), payload])[0].body == payload
    (message,) = wire.parse_message([header(Kind.MESSAGE), payload])
    assert message.body == payload and message.headers == wire.RAW_HEADERS


def test_version_1_is_refused_with_its_id_readable() -> None:
    """A v1 message (header frame [1, ...] and a body frame) is refused, saying why; a refusal
    can still repeat its id."""
    v1 = bytes((0x94, 1, 1, 0xCF)) + (77).to_bytes(8, "big") + b"\xcb" + struct.pack(">d", 0.0)
    for parse in (wire.parse_request, wire.parse_message):
        with pytest.raises(RemoteProtocolError, match="version 1"):
            parse([v1, BODY])
    assert wire.request_id(v1) == 77


# --- per-pattern framing: rejection ----------------------------------------------------------

H = {kind: wire.pack_header(kind, 1, 0.0) for kind in Kind}
M = {kind: wire.pack_message(kind, 1, 0.0, wire.pack_body({"x": 1})) for kind in Kind}
BODY = wire.pack_body({"x": 1})

BAD_REQUESTS = {
    "no frames": [],
    "header only": [H[Kind.REQUEST]],
    "three frames": [H[Kind.REQUEST], BODY, BODY],
    "one frame and more": [M[Kind.REQUEST], BODY],
    "reply kind": [M[Kind.REPLY]],
    "event kind": [H[Kind.EVENT], BODY],
    "garbage header": [b"garbage", BODY],
    "bad body": [H[Kind.REQUEST], b"\xc1"],
    "truncated": [M[Kind.REQUEST][:-1]],
}
BAD_REPLIES = {
    "no delimiter": [M[Kind.REPLY]],
    "non-empty delimiter": [b"x", M[Kind.REPLY]],
    "four frames": [b"", H[Kind.REPLY], BODY, BODY],
    "request kind": [b"", M[Kind.REQUEST]],
    "bad body": [b"", H[Kind.REPLY], b"\xc1"],
    "error body not a map": [b"", wire.pack_message(Kind.ERROR, 1, 0.0, wire.pack_body("boom"))],
    "error body without message": [b"", H[Kind.ERROR], wire.pack_body({"type": "X"})],
    "error body with non-str type": [
        b"",
        H[Kind.ERROR],
        wire.pack_body({"type": 1, "message": "m"}),
    ],
}
BAD_EVENTS = {
    "topic only": [b"t"],
    "no topic end": [b"t" + M[Kind.EVENT]],
    "header without body": [b"t\x00" + H[Kind.EVENT]],
    "two bodies": [b"t\x00" + H[Kind.EVENT], BODY, BODY],
    "message kind": [b"t\x00" + M[Kind.MESSAGE]],
    "invalid utf-8 topic": [b"\xff\xfe\x00" + M[Kind.EVENT]],
    "huge topic": [b"t" * (MAX_TOPIC_SIZE + 1) + b"\x00" + M[Kind.EVENT]],
    "bad body": [b"t\x00" + H[Kind.EVENT], b"\xc1"],
    "version 3": [b"t\x00" + canonical(4, 1, 0.0, version=3), BODY],
    "unknown kind": [b"t\x00" + canonical(max(Kind) + 1, 1, 0.0), BODY],
}
BAD_MESSAGES = {
    "empty frame only": [b""],
    "three frames": [H[Kind.MESSAGE], BODY, BODY],
    "event kind": [M[Kind.EVENT]],
    "request kind": [H[Kind.REQUEST], BODY],
    "bad body": [H[Kind.MESSAGE], b"\xc1"],
    "garbage header": [b"\x00" * 21, BODY],
    "four items, no follows": [msgpack.packb([2, 5, 1, 0.0])],
}


@pytest.mark.parametrize(
    "parse, frames",
    [(wire.parse_request, f) for f in BAD_REQUESTS.values()]
    + [(wire.parse_reply, f) for f in BAD_REPLIES.values()]
    + [(wire.parse_event, f) for f in BAD_EVENTS.values()]
    + [(wire.parse_message, f) for f in BAD_MESSAGES.values()],
    ids=[f"request-{k}" for k in BAD_REQUESTS]
    + [f"reply-{k}" for k in BAD_REPLIES]
    + [f"event-{k}" for k in BAD_EVENTS]
    + [f"message-{k}" for k in BAD_MESSAGES],
)
def test_bad_messages_are_refused(parse: Callable[[list[bytes]], Any], frames: list[bytes]) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(frames)


def _valid_body(body: Any) -> bool:
    try:
        msgpack.packb(body)
    except Exception:  # ExtType and Timestamp pack too; anything else would be a decoder bug
        return False
    return True


def _check_request(frames: list[bytes]) -> None:
    header, body = wire.parse_request(frames)
    assert len(frames) == (2 if header.follows else 1) and header.kind is Kind.REQUEST
    assert _valid_body(body)


def _check_reply(frames: list[bytes]) -> None:
    header, body = wire.parse_reply(frames)
    assert len(frames) == (3 if header.follows else 2) and frames[0] == b""
    assert header.kind in (Kind.REPLY, Kind.ERROR) and _valid_body(body)
    if header.kind is Kind.ERROR:
        assert isinstance(body["type"], str) and isinstance(body["message"], str)


def _check_event(frames: list[bytes]) -> None:
    for message in wire.parse_event(frames):
        assert message.kind is Kind.EVENT and _valid_body(message.body)
        assert isinstance(message.topic, str)
        assert frames[0].startswith(message.topic.encode() + b"\x00")


def _check_message(frames: list[bytes]) -> None:
    for message in wire.parse_message(frames):
        assert message.kind is Kind.MESSAGE and message.topic is None
        assert _valid_body(message.body)


@FUZZ
@given(frame_lists)
@example([H[Kind.REQUEST], BODY])
@example([M[Kind.REQUEST]])
@example([b"", H[Kind.ERROR], wire.pack_body({"type": "T", "message": "m"})])
@example([b"t\x00" + M[Kind.EVENT]])
@example([M[Kind.MESSAGE]])
def test_pattern_parsers_fuzz(frames: list[bytes]) -> None:
    """Each parser, given any list of frames, returns a valid message or raises
    RemoteProtocolError."""
    for check in (_check_request, _check_reply, _check_event, _check_message):
        try:
            check(list(frames))
        except RemoteProtocolError:
            pass


# --- ROUTER envelopes ------------------------------------------------------------------------

route_frames = st.lists(st.just(b"") | st.binary(min_size=1, max_size=6), max_size=6)


@FUZZ
@given(route_frames)
@example([b"id", b"", b"h", b"b"])
@example([b"", b"h", b"b"])
@example([b"id1", b"id2", b"", b"h", b"b"])
def test_split_route(frames: list[bytes]) -> None:
    first_empty = next((i for i, f in enumerate(frames) if not f), None)
    if first_empty is None or first_empty == 0:
        with pytest.raises(RemoteProtocolError, match="routing envelope"):
            wire.split_route(frames)
        return
    route, rest = wire.split_route(frames)
    assert route + rest == frames
    assert route[-1] == b"" and all(route[:-1]) and len(route) == first_empty + 1


# --- the error tree --------------------------------------------------------------------------


def test_protocol_errors_say_whose_fault_and_stay_value_errors() -> None:
    assert issubclass(RemoteProtocolError, FabricError) and issubclass(
        RemoteProtocolError, ValueError
    )
    assert issubclass(LocalProtocolError, FabricError) and issubclass(
        LocalProtocolError, ValueError
    )
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


# --- reliable tasks (kinds 6, 7, 8: core/task_frames.py) -------------------------------------

task_ids = st.text(min_size=1, max_size=MAX_TASK_ID)
attempts = st.integers(1, 2**32 - 1)
task_items = st.lists(
    st.tuples(task_ids, attempts, values.map(wire.pack_body), st.none() | st.text(max_size=256)),
    min_size=1,
    max_size=20,
)
result_items = st.lists(
    st.one_of(
        st.tuples(task_ids, attempts, st.just(True), values),
        st.tuples(
            task_ids,
            attempts,
            st.just(False),
            st.builds(lambda t, m: {"type": t, "message": m}, st.text(), st.text()),
        ),
    ).map(list),
    min_size=1,
    max_size=20,
)


@ROUND_TRIP
@given(task_items, msg_ids)
def test_task_messages_round_trip(
    tasks: list[tuple[str, int, bytes, str | None]], msg_id: int
) -> None:
    body = task_frames.pack_tasks(tasks)
    kind, items = task_frames.parse_to_worker([wire.pack_header(Kind.TASK, msg_id, 0.0), body])
    assert kind is Kind.TASK
    assert items == [[t, a, msgpack.unpackb(p, strict_map_key=False), k] for t, a, p, k in tasks]
    assert msgpack.unpackb(body, strict_map_key=False) == items  # plain msgpack, as documented


@ROUND_TRIP
@given(result_items)
def test_result_messages_round_trip(results: list[list[Any]]) -> None:
    body = task_frames.pack_results(results)
    kind, items = task_frames.parse_from_worker([b"", wire.pack_header(Kind.RESULT, 1, 0.0), body])
    assert kind is Kind.RESULT and items == results


@pytest.mark.parametrize("credit", [1, 10, 65535])
def test_credit_round_trip(credit: int) -> None:
    frames = [b"", wire.pack_header(Kind.CREDIT, 1, 0.0), task_frames.pack_credit(credit)]
    assert task_frames.parse_from_worker(frames) == (Kind.CREDIT, (credit, 1))  # no slots: 1
    request = task_frames.parse_to_worker(
        [wire.pack_header(Kind.CREDIT, 1, 0.0), msgpack.packb({"from": "n"})]
    )
    assert request == (Kind.CREDIT, {"from": "n"})


@pytest.mark.parametrize("credit", [0, 65536, -1, 1.0, True, "1"])
def test_pack_credit_refuses_out_of_range(credit: Any) -> None:
    with pytest.raises(LocalProtocolError):
        task_frames.pack_credit(credit)


def test_an_unencodable_result_becomes_a_failure() -> None:
    body = task_frames.pack_results([["t1", 1, True, object()], ["t2", 1, True, 5]])
    kind, items = task_frames.parse_from_worker([b"", H[Kind.RESULT], body])
    assert items[1] == ["t2", 1, True, 5]
    assert items[0][:3] == ["t1", 1, False] and items[0][3]["type"] == "LocalProtocolError"


def _task(task_id: Any = "t", attempt: Any = 1, payload: Any = None, key: Any = None) -> list[Any]:
    return [task_id, attempt, payload, key]


BAD_TO_WORKER = {
    "one frame": [H[Kind.TASK]],
    "three frames": [H[Kind.TASK], BODY, BODY],
    "reply kind": [H[Kind.REPLY], msgpack.packb([_task()])],
    "not an array": [H[Kind.TASK], msgpack.packb({"t": 1})],
    "empty array": [H[Kind.TASK], msgpack.packb([])],
    "item of 3": [H[Kind.TASK], msgpack.packb([["t", 1, None]])],
    "item not an array": [H[Kind.TASK], msgpack.packb(["t"])],
    "empty task id": [H[Kind.TASK], msgpack.packb([_task("")])],
    "long task id": [H[Kind.TASK], msgpack.packb([_task("t" * 129)])],
    "binary task id": [H[Kind.TASK], msgpack.packb([_task(b"t")])],
    "attempt 0": [H[Kind.TASK], msgpack.packb([_task(attempt=0)])],
    "attempt bool": [H[Kind.TASK], msgpack.packb([_task(attempt=True)])],
    "attempt 2**32": [H[Kind.TASK], msgpack.packb([_task(attempt=2**32)])],
    "long key": [H[Kind.TASK], msgpack.packb([_task(key="k" * 257)])],
    "int key": [H[Kind.TASK], msgpack.packb([_task(key=5)])],
    "credit not a map": [H[Kind.CREDIT], msgpack.packb([1])],
    "raw body": [wire.pack_header(Kind.TASK, 1, 0.0, wire.RAW_HEADERS), msgpack.packb([_task()])],
    "bad body": [H[Kind.TASK], b"\xc1"],
}
BAD_FROM_WORKER = {
    "no delimiter": [H[Kind.RESULT], msgpack.packb([["t", 1, True, 1]])],
    "non-empty delimiter": [b"x", H[Kind.RESULT], msgpack.packb([["t", 1, True, 1]])],
    "task kind": [b"", H[Kind.TASK], msgpack.packb([_task()])],
    "ok not a bool": [b"", H[Kind.RESULT], msgpack.packb([["t", 1, 1, 1]])],
    "failure without type": [
        b"",
        H[Kind.RESULT],
        msgpack.packb([["t", 1, False, {"message": "m"}]]),
    ],
    "failure not a map": [b"", H[Kind.RESULT], msgpack.packb([["t", 1, False, "boom"]])],
    "credit 0": [b"", H[Kind.CREDIT], msgpack.packb({"credit": 0})],
    "credit 65536": [b"", H[Kind.CREDIT], msgpack.packb({"credit": 65536})],
    "credit bool": [b"", H[Kind.CREDIT], msgpack.packb({"credit": True})],
    "credit missing": [b"", H[Kind.CREDIT], msgpack.packb({})],
    "credit not a map": [b"", H[Kind.CREDIT], msgpack.packb(5)],
    "empty results": [b"", H[Kind.RESULT], msgpack.packb([])],
}


@pytest.mark.parametrize(
    "parse, frames",
    [(task_frames.parse_to_worker, f) for f in BAD_TO_WORKER.values()]
    + [(task_frames.parse_from_worker, f) for f in BAD_FROM_WORKER.values()],
    ids=[f"to-worker-{k}" for k in BAD_TO_WORKER] + [f"from-worker-{k}" for k in BAD_FROM_WORKER],
)
def test_bad_task_messages_are_refused(
    parse: Callable[[list[bytes]], Any], frames: list[bytes]
) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(frames)


def task_frames_pool() -> st.SearchStrategy[bytes]:
    items = st.lists(
        st.lists(
            st.one_of(task_ids, attempts, st.booleans(), st.none(), values), min_size=3, max_size=5
        ),
        max_size=3,
    )
    return st.one_of(
        valid_frames_pool(),
        items.map(msgpack.packb),
        st.builds(lambda c: msgpack.packb({"credit": c}), st.integers(-2, 70000) | st.booleans()),
        st.sampled_from([H[Kind.TASK], H[Kind.RESULT], H[Kind.CREDIT]]),
    )


@FUZZ
@given(st.lists(task_frames_pool(), max_size=4))
@example([H[Kind.TASK], msgpack.packb([["t", 1, None, None]])])
@example([b"", H[Kind.RESULT], msgpack.packb([["t", 1, True, None]])])
def test_task_parsers_fuzz(frames: list[bytes]) -> None:
    """Whatever arrives, the worker and producer decoders return well-formed items or raise
    RemoteProtocolError."""
    try:
        kind, body = task_frames.parse_to_worker(list(frames))
    except RemoteProtocolError:
        pass
    else:
        assert kind in (Kind.TASK, Kind.CREDIT) and len(frames) == 2
        if kind is Kind.TASK:
            for task_id, attempt, _, key in body:
                assert type(task_id) is str and 1 <= len(task_id) <= 128
                assert type(attempt) is int and attempt >= 1
                assert key is None or type(key) is str
        else:
            assert isinstance(body, dict)
    try:
        kind, body = task_frames.parse_from_worker(list(frames))
    except RemoteProtocolError:
        pass
    else:
        assert kind in (Kind.RESULT, Kind.CREDIT) and len(frames) == 3 and frames[0] == b""
        if kind is Kind.RESULT:
            for task_id, attempt, ok, value in body:
                assert type(task_id) is str and type(attempt) is int and type(ok) is bool
                assert ok or (isinstance(value["type"], str) and isinstance(value["message"], str))
        else:
            credit, slots = body
            assert type(credit) is int and 1 <= credit <= 65535
            assert type(slots) is int and 1 <= slots <= 65535
