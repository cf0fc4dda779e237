"""The inlined fast decoders agree with the reference parsers of :mod:`zmqfabric.core.wire`.

The hot paths of patterns/ recognise zmqfabric's own canonical one-frame messages (and batches)
by their first bytes and decode them inline with one ``msgpack.unpackb`` (see
``wire_layout``, "canonical encodings"); everything else goes to ``wire.parse_*``. For random
frames (canonical messages of every kind, batches, other valid msgpack encodings, header maps,
header frames with raw or msgpack body frames, version 1 frames, near misses, malformed frames),
each fast decoder must return exactly what the reference returns and refuse (count) exactly
what it refuses:

- ``ServiceEndpoint`` request parsing, driven through a real DEALER to a node's serve loop;
- ``Requester._match`` (reply matching), ``PullerBase._decode`` and ``SubscriptionBase._decode``,
  called with frames;
- ``Puller.recv`` and ``Subscription.recv``, which read their socket inline: driven through real
  sockets on 127.0.0.1 with crafted frames. A frame the fast path takes is a message of its own:
  frames after it are read as further messages (the wire spec allows a receiver to).

Each crafted message is followed by a sentinel that is surely accepted, so that a refusal shows
as "the sentinel came first" and nothing waits on a timeout. Values are compared by their msgpack
encoding, which also compares NaN bit for bit.
"""

from __future__ import annotations

import itertools
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import msgpack
import pytest
import zmq
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

import zmqfabric as zf
from tests.conftest import unique
from zmqfabric.core import wire
from zmqfabric.core.records import EndpointKind
from zmqfabric.core.wire import Kind, Message
from zmqfabric.errors import RemoteError, RemoteProtocolError
from zmqfabric.patterns.pipeline import Puller
from zmqfabric.patterns.pubsub import Publisher, Subscription
from zmqfabric.patterns.reqrep import Requester
from zmqfabric.transport.frames import sticky_rcvtimeo

# The node's own threads (zeroconf's among them) draw from the global random module while
# hypothesis generates an example; hypothesis would blame our strategies for it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
)

#: Bound for any one receive (it only waits when a test is wrong).
WAIT = 10.0
DIRECT = settings(max_examples=500)
SOCKETS = settings(max_examples=300)

U64 = 2**64 - 1


# --- frames from the spec --------------------------------------------------------------------


def spec_canonical(kind: int, msg_id: int, ts: float, version: int = 2, array: int = 0x95,
                   bit: int = 0) -> bytes:
    """The first 21 bytes as the spec draws them: ``95 02 KK CF <id: 8 bytes> CB <timestamp>``
    (a one-frame message's; ``array=0x94, bit=0x10``: a header frame; ``bit=0x20``: a batch)."""
    return (
        bytes((array, version, kind | bit, 0xCF))
        + msg_id.to_bytes(8, "big")
        + b"\xcb"
        + struct.pack(">d", ts)
    )


def fast_first(data: bytes, kind: Kind) -> bool:
    """Does a hot path take this frame as a whole message (or batch) of ``kind``?"""
    if len(data) > 16 * 1024 or len(data) <= 12 or data[12] != 0xCB:
        return False
    if not (data.startswith(wire.MESSAGE_PREFIX[kind]) or data.startswith(wire.BATCH_PREFIX[kind])):
        return False
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return False
    return data[2] == kind or (type(fields[4]) is list and bool(fields[4]))


msg_ids = st.integers(0, U64) | st.sampled_from([0, 1, 127, 128, 2**32 - 1, 2**32, 2**63, U64])
float_ts = st.floats()  # NaN, infinities and -0.0 included
int_ts = st.integers(-(2**63), U64)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    | st.dictionaries(st.integers(-5, 5), inner, max_size=2),
    max_leaves=6,
)
header_maps = st.one_of(
    st.sampled_from([{"enc": "raw"}, {}, {"enc": "msgpack"}, {"enc": "raw", "x": 1}]),
    st.dictionaries(st.text(max_size=8), values, max_size=3),
    st.sampled_from([{1: 2}, {b"enc": b"raw"}, [1], "enc", None]),  # not a string-keyed map
)
BAD_BODIES = [
    b"",
    b"\xc1",
    b"\x01\x02",
    b"\xa5ab",
    b"\xa2\xff\xfe",
    b"\xdd\xff\xff\xff\xff",
    b"\x91" * 5000 + b"\xc0",
    b"\x81\x90\x01",
    b"\xc7\x01\xff\x00",
]


@st.composite
def first_frames(draw: st.DrawFn, kind: Kind, msg_id: int | None = None,
                 tail: bytes = b"") -> bytes:
    """A message's first frame: often canonical of ``kind`` (the fast path: one frame, or a
    batch); often one that the fast path must not take although it nearly looks the same;
    header frames (a body frame should follow); else anything. ``tail``: a packed header map
    (requests naming their service)."""
    if msg_id is None:
        msg_id = draw(msg_ids)
    ts = draw(float_ts)
    body = msgpack.packb(draw(values))
    path = draw(st.integers(0, 21))
    if path < 6:
        if tail and draw(st.booleans()):
            return spec_canonical(kind, msg_id, ts, array=0x96) + body + tail
        return spec_canonical(kind, msg_id, ts) + body
    if path < 8:  # a batch (of pipelines and streams), maybe empty, maybe not a list
        items = draw(st.lists(values, max_size=3) | values)
        return spec_canonical(kind, msg_id, ts, bit=0x20) + msgpack.packb(items)
    if path < 10:  # valid, of this kind, in another encoding: to the reference parser
        extra: list[Any] = draw(st.sampled_from([[{"enc": "raw"}], [{"k": "v"}], [{}], [None], []]))
        return msgpack.packb([2, kind, draw(st.integers(0, 2**32) | msg_ids), ts,
                              draw(values), *extra])
    if path < 13:  # the canonical form of another kind, or of another version
        if draw(st.integers(0, 2)):
            other = draw(st.sampled_from([x for x in Kind if x is not kind]))
            return spec_canonical(other, msg_id, ts) + body
        if draw(st.booleans()):
            return spec_canonical(draw(st.sampled_from([0, 9, 127, 0x30])), msg_id, ts) + body
        version = draw(st.sampled_from([0, 1, 3, 0x7F]))
        return spec_canonical(kind, msg_id, ts, version=version) + body
    if path < 16:  # near misses: a byte the fast path tests changed, a byte more or less
        data = spec_canonical(kind, msg_id, ts) + body
        choice = draw(st.integers(0, 3))
        if choice == 0:
            edited = bytearray(data)
            position = draw(st.sampled_from([0, 1, 2, 3, 12, 12]))
            edited[position] = draw(st.sampled_from([0xCA, 0xCF, 0xD3, 0x94, 0x96, 0x00, 0xFF]))
            return bytes(edited)
        if choice == 1:
            return spec_canonical(kind, msg_id, ts) + draw(st.sampled_from(BAD_BODIES))
        return draw(st.sampled_from([data[:-1], data + b"\x00", data[:13], data[:21]]))
    if path < 18:  # a header frame: the body is the next frame
        if draw(st.booleans()):
            return spec_canonical(kind, msg_id, ts, array=0x94, bit=0x10)
        return msgpack.packb([2, kind | 0x10, msg_id, ts, draw(header_maps)])
    if path < 19:  # version 1: a header frame [1, kind, ...]
        return bytes((0x94, 1, kind, 0xCF)) + spec_canonical(kind, msg_id, ts)[4:]
    k = draw(st.sampled_from([int(kind)] * 4 + [int(x) for x in Kind] + [0, 9, 127]))
    style = draw(st.integers(0, 3))
    if style == 0:  # a header map: raw, others, empty, or not a valid map at all
        return msgpack.packb([2, k, msg_id, ts, draw(values), draw(header_maps)])
    if style == 1:  # other valid encodings: fixint ids, integer or float32 timestamps
        if draw(st.booleans()):
            ts32 = msgpack.packb(draw(st.floats(width=32)), use_single_float=True)
            return (b"\x95\x02" + msgpack.packb(k) + msgpack.packb(msg_id) + ts32
                    + msgpack.packb(draw(values)))
        return msgpack.packb([2, k, msg_id, draw(int_ts | float_ts), draw(values)])
    if style == 2:  # not an array of 4 to 6
        return msgpack.packb(draw(st.lists(st.integers(0, 9), max_size=7)))
    return draw(st.binary(max_size=24))


@st.composite
def body_frames(draw: st.DrawFn) -> bytes:
    style = draw(st.integers(0, 7))
    if style <= 3:
        return msgpack.packb(draw(values))
    if style == 4:  # raw bytes: a raw body, or a malformed msgpack one
        return draw(st.binary(max_size=40))
    if style == 5:  # an error reply's body, or nearly
        error = {"type": draw(st.text(max_size=8)), "message": draw(st.text(max_size=8))}
        nearly = [error, {"type": "T"}, {"type": 1, "message": ""}]
        return msgpack.packb(draw(st.sampled_from(nearly)))
    return draw(st.sampled_from(BAD_BODIES))


topics = st.one_of(
    st.text(max_size=20).map(str.encode),
    st.text(max_size=20).map(str.encode),
    st.binary(max_size=8),
    st.sampled_from([b"", b"t" * 1024, b"t" * 1025, b"\xffzf/sub/0123456789abcdef"]),
)


@st.composite
def message_frames(draw: st.DrawFn, kind: Kind = Kind.MESSAGE, msg_id: int | None = None,
                   tail: bytes = b"") -> list[bytes]:
    """What a PUSH may send to a puller: a first frame, often a body frame after a header
    frame, sometimes trailing frames."""
    first = draw(first_frames(kind, msg_id, tail))
    shape = draw(st.integers(0, 9))
    if shape <= 6:
        if len(first) > 2 and first[2] & 0x10 and shape <= 4:
            return [first, draw(body_frames())]
        return [first]
    if shape == 7:
        return [first, draw(body_frames())]
    extra = st.lists(first_frames(kind) | body_frames(), min_size=1, max_size=3)
    return [first] + draw(extra)


@st.composite
def event_frames(draw: st.DrawFn) -> list[bytes]:
    """What a PUB may send to a subscriber: ``topic NUL message``, or nearly."""
    frames = draw(message_frames(Kind.EVENT))
    topic = draw(topics)
    shape = draw(st.integers(0, 9))
    if shape <= 7:
        return [topic + b"\x00" + frames[0], *frames[1:]]
    if shape == 8:
        return [topic, *frames]  # the topic as a frame of its own (version 1 style)
    return frames  # no topic end


@st.composite
def request_frames(draw: st.DrawFn, tail: bytes) -> list[bytes]:
    """What a DEALER may send to a service (its ROUTER puts the peer's identity first)."""
    frames = draw(message_frames(Kind.REQUEST, None, tail))
    shape = draw(st.integers(0, 11))
    if shape <= 7:
        return [b"", *frames]
    if shape == 8:
        return frames  # no delimiter
    if shape == 9:
        return [b"hop", b"", *frames]  # a second routing frame (as from a device)
    if shape == 10:
        return [b"", b"", *frames]
    return [b""]


@st.composite
def reply_frames(draw: st.DrawFn, msg_id: int) -> list[bytes]:
    """What a requester may get back after the provider's routing id."""
    kind = draw(st.sampled_from([Kind.REPLY, Kind.REPLY, Kind.ERROR]))
    frames = draw(message_frames(kind, msg_id))
    shape = draw(st.integers(0, 9))
    if shape <= 7:
        return [b"", *frames]
    if shape == 8:
        return frames
    return [b"x", *frames]


# --- comparing -------------------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal values, NaN and -0.0 included: the same type and the same msgpack encoding. A
    memoryview (a large raw body a puller kept, not copied) is its bytes."""
    a, b = (bytes(v) if type(v) is memoryview else v for v in (a, b))
    return type(a) is type(b) and msgpack.packb(a) == msgpack.packb(b)


def same_message(a: Message | None, b: Message | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.kind is b.kind
        and a.msg_id == b.msg_id
        and same(a.timestamp, b.timestamp)
        and same(a.body, b.body)
        and a.topic == b.topic
        and same(a.headers, b.headers)
    )


class Refused:
    """What a reference parser said about a malformed message (the fast path counts it)."""

    def __repr__(self) -> str:
        return "REFUSED"


REFUSED = Refused()


def reference(parse: Any, frames: list[bytes]) -> Any:
    try:
        return parse(frames)
    except RemoteProtocolError:
        return REFUSED


def note_path(frames: list[bytes], at: int, kind: Kind, verdict: object) -> None:
    """Label the example for ``--hypothesis-show-statistics``: did it take the fast path?"""
    first = frames[at] if len(frames) > at else b""
    if kind is Kind.EVENT:
        first = first.partition(b"\x00")[2]
    fast = fast_first(first, kind)
    fate = "refused" if verdict is REFUSED else "accepted"
    event(f"{'canonical' if fast else 'other'} header, {fate}")


# --- the rig: one node with every kind of endpoint, raw sockets pointed at them --------------


@dataclass
class Rig:
    node: zf.Node
    puller: Puller
    publisher: Publisher
    subscription: Subscription
    requester: Requester
    push: zmq.Socket
    dealer: zmq.Socket
    sentinels: Iterator[int]
    service: str
    service_tail: bytes

    def counters(self) -> dict[str, int]:
        return self.node.counters.snapshot()


def grew(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """A node serving an echo service from its serve loop, with a puller, a publisher and a
    subscription to it, a requester; a raw PUSH to the puller and a raw DEALER to the service
    (tcp on 127.0.0.1). Module-scoped: hypothesis runs many examples against one rig."""
    node = zf.Node(unique("fastpath"))
    service = unique("echo")

    @node.reply(service)
    def echo(body: Any) -> Any:
        return body

    ctx = zmq.Context()
    sockets: list[zmq.Socket] = []

    def raw(kind: int, url: str) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sockets.append(sock)
        sock.connect(url)
        return sock

    try:
        node.serve_in_background()
        record = node.record
        endpoint = record.find(EndpointKind.REPLY, service)
        assert endpoint is not None
        stream = unique("ticks")
        puller = node.puller(unique("jobs"))
        publisher = node.publisher(stream)
        subscription = node.subscribe(stream)
        assert publisher.wait_subscribers(1, WAIT) == 1
        yield Rig(
            node,
            puller,
            publisher,
            subscription,
            node.requester(service),
            raw(zmq.PUSH, f"tcp://127.0.0.1:{puller.port}"),
            raw(zmq.DEALER, record.url(endpoint)),
            itertools.count(1),
            service,
            wire.service_tail(service),
        )
    finally:
        for sock in sockets:
            sock.close(0)
        ctx.term()
        node.close()


# --- request parsing (ServiceEndpoint, through the node's serve loop) --------------------------


def expected_answer(sent: list[bytes], service: str) -> tuple[list[bytes], Kind, int, Any] | None:
    """The reply the reference parsers call for, as the DEALER gets it: (routing frames, kind,
    msg_id, body); None when the request has no route to answer on."""
    try:
        route, payload = wire.split_route([b"identity", *sent])
    except RemoteProtocolError:
        return None
    try:
        header, body = wire.parse_request(payload, service)
    except RemoteProtocolError as exc:
        msg_id = (wire.request_id(payload[0]) if payload else None) or 0  # matchable refusals
        return route[1:], Kind.ERROR, msg_id, wire.error_body(exc)
    return route[1:], Kind.REPLY, header.msg_id, body  # the handler echoes


@SOCKETS
@given(st.data())
def test_service_request_parsing_matches_parse_request(rig: Rig, data: st.DataObject) -> None:
    tail = data.draw(st.sampled_from([rig.service_tail, wire.service_tail("another")]))
    sent = data.draw(request_frames(tail))
    token = secrets.token_bytes(8)
    sentinel_id = next(rig.sentinels)
    before = rig.counters()
    rig.dealer.send_multipart(sent)
    rig.dealer.send_multipart([b"", spec_canonical(1, sentinel_id, 0.0) + msgpack.packb(token)])
    answers = []
    while True:
        assert rig.dealer.poll(int(WAIT * 1000)), "no answer from the service"
        frames = rig.dealer.recv_multipart()
        header, body = wire.parse_reply([b"", frames[-1]])  # replies are one frame
        if body == token and header.msg_id == sentinel_id:
            break
        answers.append((frames, header, body))

    expected = expected_answer(sent, rig.service)
    note_path(sent, 1, Kind.REQUEST, REFUSED if not expected or expected[1] is Kind.ERROR else 0)
    refused = grew(before, rig.counters(), "refused_request")
    if expected is None:
        assert answers == [] and refused == 1
        return
    assert len(answers) == 1, answers
    route, kind, msg_id, body = expected
    frames, header, got = answers[0]
    assert (frames[:-1], header.kind, header.msg_id) == (route, kind, msg_id)
    assert same(got, body)
    assert refused == (1 if kind is Kind.ERROR else 0)


# --- reply matching (Requester._match) -------------------------------------------------------


def expected_match(frames: list[bytes], msg_id: int) -> tuple[Any, ...]:
    try:
        header, body = wire.parse_reply(frames)
    except RemoteProtocolError:
        return ("refused",)
    if header.msg_id != msg_id:
        return ("stale",)
    if header.kind is Kind.ERROR:
        return ("error", body["type"], body["message"])
    return ("ok", body)


@DIRECT
@given(st.data(), msg_ids, st.booleans())
def test_reply_matching_matches_parse_reply(
    rig: Rig, data: st.DataObject, msg_id: int, ours: bool
) -> None:
    frames = data.draw(reply_frames(msg_id))
    waiting_for = msg_id if ours else data.draw(msg_ids.filter(lambda i: i != msg_id))
    before = rig.counters()
    try:
        ok, body = rig.requester._match(frames, waiting_for)
    except RemoteError as exc:
        got: tuple[Any, ...] = ("error", exc.type, exc.text)
    else:
        got = ("ok", body) if ok else ("dropped",)
    after = rig.counters()
    stale, refused = grew(before, after, "stale_replies"), grew(before, after, "refused_reply")

    want = expected_match(frames, waiting_for)
    note_path(frames, 1, Kind.REPLY, REFUSED if want[0] == "refused" else want[0])
    if want[0] in ("refused", "stale"):
        assert got == ("dropped",)
        assert (stale, refused) == ((1, 0) if want[0] == "stale" else (0, 1)), want
    else:
        assert got[0] == want[0] and all(map(same, got[1:], want[1:]))
        assert (stale, refused) == (0, 0)


# --- events (Subscription._decode and Subscription.recv) -------------------------------------


def drained(handle: Any, first: Message | None) -> list[Message]:
    """``first`` and the rest of its batch, taken from the handle's pending bodies."""
    out = [] if first is None else [first]
    while handle._pending:
        out.append(handle._pending.next())
    return out


@DIRECT
@given(event_frames())
@example([b"t\x00" + spec_canonical(4, 1, 0.5) + msgpack.packb("x")])
@example([b"\xff\x00" + spec_canonical(4, 1, 0.5) + msgpack.packb("x")])
@example([b"t\x00" + spec_canonical(4, 1, 0.5) + b"\xc1"])
@example([b"t\x00" + spec_canonical(4, 1, 0.5, bit=0x20) + msgpack.packb([1, 2])])
def test_event_decode_matches_parse_event(rig: Rig, frames: list[bytes]) -> None:
    before = rig.counters()
    got = drained(rig.subscription, rig.subscription._decode(frames))
    want = reference(wire.parse_event, frames)
    note_path(frames, 0, Kind.EVENT, want)
    refused = grew(before, rig.counters(), "refused_event")
    if want is REFUSED:
        assert got == [] and refused == 1
    else:
        assert len(got) == len(want) and all(map(same_message, got, want)) and refused == 0


def expected_events(frames: list[bytes], names: dict[bytes, str]) -> list[Any]:
    """What ``Subscription.recv`` makes of one multipart message: ``wire.parse_event``'s
    verdict, except that a frame the fast path takes (a canonical event of a topic seen before)
    is a message of its own, and frames after it are read as further messages."""
    if not frames:
        return []
    topic, _, rest = frames[0].partition(b"\x00")
    if (b"\x00" in frames[0][:1026] and topic in names and fast_first(rest, Kind.EVENT)
            and len(frames) > 1):
        return expected_events(frames[:1], names) + expected_events(frames[1:], names)
    want = reference(wire.parse_event, frames)
    if want is REFUSED:
        return [want]
    for message in want:
        names[message.topic.encode()] = message.topic
    return [(m.topic, m.body) for m in want]


@SOCKETS
@given(event_frames())
@example([b"t\x00" + spec_canonical(4, 1, 0.5) + msgpack.packb("x")])
@example([b"t\x00" + spec_canonical(4, 1, 0.5) + b"\xc1"])
@example([b"\xff\xfe\x00" + spec_canonical(4, 1, 0.5) + msgpack.packb("x")])
@example([b"t\x00" + spec_canonical(4, 1, 0.5) + msgpack.packb("x"), b"\x01"])
@example([b"t\x00" + spec_canonical(4, 1, 0.5, bit=0x20) + msgpack.packb([1, 2, 3])])
def test_subscription_recv_matches_parse_event(rig: Rig, frames: list[bytes]) -> None:
    token = secrets.token_hex(8)
    names = dict(rig.subscription._names)
    want = expected_events(frames, names)
    before = rig.counters()
    sock = rig.publisher._sock  # the publisher's XPUB: it sends exactly like a PUB
    sock.send_multipart(frames)
    sock.send(b"sentinel\x00" + spec_canonical(4, 0, 0.0) + msgpack.packb(token))
    got = []
    while (event := rig.subscription.recv(timeout=WAIT)) != ("sentinel", token):
        got.append(event)

    note_path(frames, 0, Kind.EVENT, want[0] if want else None)
    accepted = [event for event in want if event is not REFUSED]
    assert len(got) == len(accepted), (got, want)
    for (topic, body), (want_topic, want_body) in zip(got, accepted, strict=True):
        assert topic == want_topic and same(body, want_body)
    assert grew(before, rig.counters(), "refused_event") == len(want) - len(accepted)


# --- pipeline messages (Puller._decode and Puller.recv) --------------------------------------


@DIRECT
@given(message_frames())
@example([spec_canonical(5, 1, 0.5) + msgpack.packb("x")])
@example([spec_canonical(5, 1, 0.5) + b"\xc1"])
@example([msgpack.packb([2, 0x15, 1, 0.5, {"enc": "raw"}]), b"\xc1"])
@example([spec_canonical(5, 1, 0.5, bit=0x20) + msgpack.packb([])])
def test_message_decode_matches_parse_message(rig: Rig, frames: list[bytes]) -> None:
    before = rig.counters()
    got = drained(rig.puller, rig.puller._decode(frames))
    want = reference(wire.parse_message, frames)
    note_path(frames, 0, Kind.MESSAGE, want)
    refused = grew(before, rig.counters(), "refused_message")
    if want is REFUSED:
        assert got == [] and refused == 1
    else:
        assert len(got) == len(want) and all(map(same_message, got, want)) and refused == 0


def expected_pulls(frames: list[bytes]) -> list[Any]:
    """What ``Puller.recv`` makes of one multipart message: ``wire.parse_message``'s verdict,
    except that a frame the fast path takes is a message of its own, and frames after it are
    read as further messages (the wire spec allows it; the receive does not check for them)."""
    if not frames:
        return []
    if len(frames) > 1 and fast_first(frames[0], Kind.MESSAGE):
        return expected_pulls(frames[:1]) + expected_pulls(frames[1:])
    want = reference(wire.parse_message, frames)
    return [want] if want is REFUSED else [m.body for m in want]


@SOCKETS
@given(message_frames())
@example([spec_canonical(5, 1, 0.5) + msgpack.packb("x")])
@example([spec_canonical(5, 1, 0.5) + b"\xc1"])
@example([spec_canonical(5, 1, 0.5, array=0x94, bit=0x10)])
@example([spec_canonical(5, 1, 0.5) + msgpack.packb("x"), spec_canonical(5, 2, 0.5) + b"\x01"])
@example([spec_canonical(5, 1, 0.5) + msgpack.packb("x"), b"\x01"])
@example([spec_canonical(5, 1, 0.5, bit=0x20) + msgpack.packb(["a", "b"])])
@example([spec_canonical(5, 1, 0.5, bit=0x20) + msgpack.packb("ab")])
@example([spec_canonical(5, 1, 0.5, bit=0x10) + msgpack.packb({"enc": "raw"}), b"\xc1"])
@example([spec_canonical(5, 1, 0.5, bit=0x10) + msgpack.packb({"enc": "raw"})])
@example([spec_canonical(5, 1, 0.5, bit=0x10) + msgpack.packb({"enc": "raw"}), b"1", b"2"])
@example([spec_canonical(5, 1, 0.5, bit=0x10) + msgpack.packb({"enc": "raz"}), b"1"])
@example([spec_canonical(5, 1, 0.5, version=3, bit=0x10) + msgpack.packb({"enc": "raw"}), b"1"])
@example([spec_canonical(4, 1, 0.5, bit=0x10) + msgpack.packb({"enc": "raw"}), b"1"])
@example([spec_canonical(5, 1, 0.5, bit=0x10) + msgpack.packb({"enc": "raw"}),
          bytes(70_000)])
def test_puller_recv_matches_parse_message(rig: Rig, frames: list[bytes]) -> None:
    token = secrets.token_hex(8)
    before = rig.counters()
    rig.push.send_multipart(frames)
    rig.push.send(spec_canonical(5, 0, 0.0) + msgpack.packb(token))
    got = []
    while (body := rig.puller.recv(timeout=WAIT)) != token:
        got.append(body)

    want = expected_pulls(frames)
    note_path(frames, 0, Kind.MESSAGE, want[0] if want else None)
    accepted = [body for body in want if body is not REFUSED]
    assert len(got) == len(accepted) and all(map(same, got, accepted)), (got, want)
    assert grew(before, rig.counters(), "refused_message") == len(want) - len(accepted)


# --- the sticky receive timeout --------------------------------------------------------------


@pytest.mark.parametrize(
    "have, want, kept",
    [
        (-1, -1, True),
        (100, -1, False),
        (-1, 100, False),
        (0, 0, True),
        (2, 0, False),  # a wait of 0 means "do not block": never stretched
        (100, 100, True),
        (102, 100, True),  # 2 ms of slack for short waits
        (103, 100, False),
        (99, 100, False),  # never shorter than wanted
        (1015, 1000, True),  # 1/64 of long waits
        (1016, 1000, False),
        (1, 1, True),
        (3, 1, True),
        (4, 1, False),
    ],
)
def test_sticky_rcvtimeo(have: int, want: int, kept: bool) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    try:
        sock.setsockopt(zmq.RCVTIMEO, have)
        now = sticky_rcvtimeo(sock, have, want)
        assert now == (have if kept else want)
        assert sock.getsockopt(zmq.RCVTIMEO) == now
    finally:
        sock.close(0)
        ctx.term()
