"""Hostile and broken peers: a running node refuses what it cannot read, counts it, and carries on.

Raw pyzmq sockets (built by hand from the wire spec, not with the fabric's encoders) send
malformed multipart messages to every kind of endpoint a node reads from: a reply service
(ROUTER), the control endpoint, a pipeline puller (PULL), a stream subscription (SUB, pointed at
a raw PUB through the node's directory) and a publisher (XPUB, which reads what subscribers send
upstream). After each batch a correct message on the same
connection proves that the node still serves and that every bad message has been handled; the
refusal counters then have grown by exactly the number of bad messages. Forged discovery records
are advertised with python-zeroconf pinned to 127.0.0.1 (192.0.2.1 appears only as an advertised
value inside a record; nothing is ever sent to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import msgpack
import pytest
import zmq
from zeroconf import ServiceInfo, Zeroconf

import zmqfabric as zf
from tests.helpers import (
    SERVICE_TYPE,
    advertise_raw,
    forged_service_info,
    loopback_zeroconf,
    port_of,
    unique,
    wait_for_event,
    wait_until,
)
from zmqfabric.constants import MESSAGE_ENVELOPE
from zmqfabric.core.records import EndpointKind

#: Bound for waits that involve discovery or another thread.
WAIT = 10.0

# --- frames by hand, from the spec -----------------------------------------------------------


def hdr(
    kind: int = 1, msg_id: int = 7, *, version: int = 2, headers: dict[str, Any] | None = None
) -> bytes:
    """A header frame (the two-frame form: the body is the next frame): the kind with the
    FOLLOWS bit, 16. Version 1 headers have no such bit."""
    fields: list[Any] = [version, kind | 16 if version == 2 else kind, msg_id, 0.0]
    if headers is not None:
        fields.append(headers)
    return msgpack.packb(fields)


def one(kind: int, msg_id: int, body: Any) -> bytes:
    """A one-frame message."""
    return msgpack.packb([2, kind, msg_id, 0.0, body])


BODY = msgpack.packb({"x": 1})
#: A message kind no version of the spec uses.
UNKNOWN_KIND = 127
HUGE_HEADER = msgpack.packb([2, 17, 7, 0.0, {"pad": "x" * 5000}])

#: What a DEALER sends to a service or control endpoint (the ROUTER adds the identity).
#: ``True``: the request had a routing envelope, so the node can still send an error reply.
BAD_REQUESTS: dict[str, tuple[list[bytes], bool]] = {
    "garbage header": ([b"", b"garbage", BODY], True),
    "version 1": ([b"", hdr(version=1), BODY], True),
    "unknown version 3": ([b"", one(1, 7, "x").replace(b"\x95\x02", b"\x95\x03", 1)], True),
    "one frame, then more": ([b"", one(1, 7, "x"), BODY], True),
    "one frame of four items": ([b"", msgpack.packb([2, 1, 7, 0.0])], True),
    "unknown kind": ([b"", hdr(kind=UNKNOWN_KIND), BODY], True),
    "reply kind": ([b"", hdr(kind=2), BODY], True),
    "event kind": ([b"", hdr(kind=4), BODY], True),
    "bad msgpack body": ([b"", hdr(), b"\xc1"], True),
    "invalid utf-8 in body": ([b"", hdr(), b"\xa2\xff\xfe"], True),
    "huge header": ([b"", HUGE_HEADER, BODY], True),
    "header only": ([b"", hdr()], True),
    "extra frame": ([b"", hdr(), BODY, BODY], True),
    "delimiter only": ([b""], True),
    "no delimiter": ([hdr(), BODY], False),
    "one garbage frame, no delimiter": ([b"junk"], False),
}

#: What a PUSH sends to a puller.
BAD_MESSAGES: dict[str, list[bytes]] = {
    "empty message": [b""],
    "header only": [hdr(5)],
    "three frames": [hdr(5), BODY, BODY],
    "garbage header": [b"garbage", BODY],
    "version 1": [hdr(5, version=1), BODY],
    "version 1, one frame": [msgpack.packb([1, 5, 7, 0.0, "x"])],
    "batch not a list": [msgpack.packb([2, 5 | 32, 7, 0.0, "x"])],
    "unknown kind": [hdr(UNKNOWN_KIND), BODY],
    "event kind": [hdr(4), BODY],
    "bad msgpack body": [hdr(5), b"\xc1"],
    "huge header": [msgpack.packb([2, 21, 7, 0.0, {"pad": "x" * 5000}]), BODY],
    "header map not a map": [msgpack.packb([2, 21, 7, 0.0, [1]]), BODY],
}

#: What a PUB sends to a subscriber.
BAD_EVENTS: dict[str, list[bytes]] = {
    "empty message": [b""],
    "topic only": [b"t"],
    "topic and its end only": [b"t\x00"],
    "header frame, no body": [b"t\x00" + hdr(4)],
    "two bodies": [b"t\x00" + hdr(4), BODY, BODY],
    "garbage": [b"t\x00garbage", BODY],
    "version 1 frames": [b"t", hdr(4, version=1), BODY],
    "version 1 after the topic": [b"t\x00" + hdr(4, version=1), BODY],
    "unknown kind": [b"t\x00" + hdr(UNKNOWN_KIND), BODY],
    "message kind": [b"t\x00" + one(5, 7, "x")],
    "bad msgpack body": [b"t\x00" + hdr(4), b"\xc1"],
    "huge header": [b"t\x00" + msgpack.packb([2, 20, 7, 0.0, {"pad": "x" * 5000}]), BODY],
    "invalid utf-8 topic": [b"\xff\xfe\x00" + one(4, 7, "x")],
    "oversized topic": [b"t" * 2000 + b"\x00" + one(4, 7, "x")],
}


# --- fixtures --------------------------------------------------------------------------------

#: The ``raw`` fixture (``tests.helpers.RawSockets``): ``raw(kind, connect=url | bind=True)``.
RawFactory = Callable[..., zmq.Socket]


@dataclass
class Target:
    node: zf.Node
    service: str
    calls: list[Any] = field(default_factory=list)

    def url(self, kind: EndpointKind, name: str) -> str:
        record = self.node.record
        endpoint = record.find(kind, name)
        assert endpoint is not None, f"{kind.noun} {name!r} not advertised: {record}"
        return record.url(endpoint)


def _serving_node(config: zf.NodeConfig | None = None) -> Iterator[Target]:
    node = zf.Node(unique("victim"), **({"config": config} if config else {}))
    target = Target(node, unique("echo"))

    @node.reply(target.service)
    def handle(body: Any) -> Any:
        target.calls.append(body)
        if body == "unencodable error":
            raise ValueError("not UTF-8: \udcff")
        return {"echo": body}

    try:
        node.start()
        node.serve_in_background()
        yield target
    finally:
        node.close()


serving_node = contextlib.contextmanager(_serving_node)


@pytest.fixture
def target() -> Iterator[Target]:
    """A started node serving ``target.service`` (an echo) from its background serve loop."""
    with serving_node() as started:
        yield started


def counters(node: zf.Node) -> dict[str, int]:
    return node.counters.snapshot()


def grew(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def recv(sock: zmq.Socket, timeout: float = WAIT) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), f"no answer within {timeout} s"
    return sock.recv_multipart()


def assert_error_reply(frames: list[bytes], msg_id: int | None = None) -> dict[str, Any]:
    fields = msgpack.unpackb(frames[-1])  # one frame
    assert fields[:2] == [2, 3], f"expected an error reply (kind 3), got {fields}"
    if msg_id is not None:
        assert fields[2] == msg_id
    error = fields[4]
    assert set(error) == {"type", "message"}
    assert error["type"] == "RemoteProtocolError" and error["message"]
    return error


def echo_request(sock: zmq.Socket, target: Target, msg_id: int, body: Any) -> None:
    """A correct request through a DEALER, answered correctly."""
    sock.send_multipart([b"", hdr(1, msg_id), msgpack.packb(body)])
    delimiter, frame = recv(sock)
    fields = msgpack.unpackb(frame)
    assert delimiter == b"" and fields[:3] == [2, 2, msg_id]
    assert fields[4] == {"echo": body}


# --- reply services --------------------------------------------------------------------------


def test_service_refuses_malformed_requests_and_keeps_serving(
    target: Target, raw: RawFactory
) -> None:
    dealer = raw(zmq.DEALER, connect=target.url(EndpointKind.REPLY, target.service))
    echo_request(dealer, target, 1, "warm-up")
    before = counters(target.node)

    for frames, _ in BAD_REQUESTS.values():
        dealer.send_multipart(frames)
    answerable = sum(1 for _, envelope in BAD_REQUESTS.values() if envelope)
    errors = [assert_error_reply(recv(dealer)) for _ in range(answerable)]
    echo_request(dealer, target, 2, {"after": "the bad ones"})

    after = counters(target.node)
    assert grew(before, after, "refused_request") == len(BAD_REQUESTS)
    assert grew(before, after, "refused_request_replies") == answerable
    assert target.calls == ["warm-up", {"after": "the bad ones"}]  # no handler saw a bad one
    assert any("version" in e["message"] for e in errors)
    assert any("kind" in e["message"] for e in errors)
    assert dealer.poll(0) == 0  # no stray replies


#: What a REQ socket sends (it adds the empty delimiter itself).
BAD_REQ_PAYLOADS: dict[str, list[bytes]] = {
    "garbage": [b"garbage"],
    "reply kind": [hdr(kind=2), BODY],
    "version 1": [hdr(version=1), BODY],
    "unknown kind": [hdr(kind=UNKNOWN_KIND), BODY],
    "bad body": [hdr(), b"\xc1"],
    "header only": [hdr()],
    "extra frame": [hdr(), BODY, BODY],
    "huge header": [HUGE_HEADER, BODY],
}


def test_raw_req_gets_an_error_reply_instead_of_hanging(target: Target, raw: RawFactory) -> None:
    url = target.url(EndpointKind.REPLY, target.service)
    for case, frames in BAD_REQ_PAYLOADS.items():
        req = raw(zmq.REQ, connect=url)
        req.send_multipart(frames)
        assert_error_reply(recv(req))
        req.send(one(1, 3, case))  # the same REQ carries on
        (frame,) = recv(req)
        assert msgpack.unpackb(frame)[:3] == [2, 2, 3]
        assert msgpack.unpackb(frame)[4] == {"echo": case}
    assert target.calls == list(BAD_REQ_PAYLOADS)


def test_error_reply_repeats_the_request_id_when_the_header_was_readable(
    target: Target, raw: RawFactory
) -> None:
    dealer = raw(zmq.DEALER, connect=target.url(EndpointKind.REPLY, target.service))
    dealer.send_multipart([b"", hdr(1, 4242), b"\xc1"])
    assert_error_reply(recv(dealer), msg_id=4242)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_handler_error_that_cannot_be_encoded_does_not_stop_the_service(
    target: Target, raw: RawFactory
) -> None:
    dealer = raw(zmq.DEALER, connect=target.url(EndpointKind.REPLY, target.service))
    dealer.send_multipart([b"", hdr(1, 5), msgpack.packb("unencodable error")])
    frames = recv(dealer, 1.0)
    assert msgpack.unpackb(frames[1])[:3] == [2, 3, 5]
    echo_request(dealer, target, 6, "still serving")


# --- the control endpoint --------------------------------------------------------------------


def control_request(sock: zmq.Socket, msg_id: int, body: Any) -> tuple[list[Any], Any]:
    sock.send_multipart([b"", one(1, msg_id, body)])
    delimiter, frame = recv(sock)
    assert delimiter == b""
    fields = msgpack.unpackb(frame)
    return fields[:4], fields[4]


def test_control_endpoint_refuses_malformed_requests(target: Target, raw: RawFactory) -> None:
    node = target.node
    dealer = raw(zmq.DEALER, connect=target.url(EndpointKind.CONTROL, "control"))
    assert control_request(dealer, 1, {"op": "ping"})[1]["node"] == node.name
    before = counters(node)

    for frames, _ in BAD_REQUESTS.values():
        dealer.send_multipart(frames)
    answerable = sum(1 for _, envelope in BAD_REQUESTS.values() if envelope)
    for _ in range(answerable):
        assert_error_reply(recv(dealer))
    # Well-formed requests for things the control endpoint does not do: an error reply each.
    for msg_id, body in [
        (11, {"op": "shutdown"}),
        (12, "ping"),
        (13, None),
        (14, {"op": ["ping"]}),
    ]:
        head, error = control_request(dealer, msg_id, body)
        assert head[:3] == [2, 3, msg_id] and "unknown control op" in error["message"]
    head, answer = control_request(dealer, 20, {"op": "stats"})

    after = counters(node)
    assert head[:3] == [2, 2, 20] and answer["node"] == node.name
    assert grew(before, after, "refused_request") == len(BAD_REQUESTS)
    assert grew(before, after, "refused_request_replies") == answerable
    assert node.ping(node.name, timeout=WAIT)["id"] == node.node_id


def _txt(node_id: str, e0: str | None = None, **override: str) -> dict[str, str]:
    txt = {"v": "1", "id": node_id, "host": "forger", "pid": "1", "seq": "1"}
    if e0 is not None:
        txt["e0"] = e0
    txt.update(override)
    return txt


def test_forged_hellos_are_refused(target: Target, raw: RawFactory) -> None:
    node = target.node
    dealer = raw(zmq.DEALER, connect=target.url(EndpointKind.CONTROL, "control"))
    good_id = secrets.token_hex(8)
    names = {
        case: unique("hello")
        for case in ["good", "version", "id", "port0", "many", "txt", "keys", "name"]
    }
    many = ";".join(f"rep:s{i}:{1000 + i}" for i in range(129))
    hellos: dict[str, dict[str, Any]] = {
        "version": {"name": names["version"], "txt": _txt(good_id, v="2")},
        "id": {"name": names["id"], "txt": _txt("NOT-A-NODE-ID")},
        "port0": {"name": names["port0"], "txt": _txt(good_id, e0="rep:svc:0")},
        "many": {"name": names["many"], "txt": _txt(good_id, e0=many)},
        "txt": {"name": names["txt"], "txt": "v=1"},
        "keys": {"name": names["keys"], "txt": {1: "v"}},
        "name": {"name": "Bad Name!", "txt": _txt(good_id)},
    }
    assert control_request(dealer, 1, {"op": "ping"})[1]["node"] == node.name
    before = counters(node)

    for hello in hellos.values():
        dealer.send_multipart([b"", hdr(1, 0), msgpack.packb({"op": "hello", **hello})])
    good = {"name": names["good"], "txt": _txt(good_id, e0=f"pull:{unique('p')}:4321")}
    dealer.send_multipart([b"", hdr(1, 0), msgpack.packb({"op": "hello", **good})])
    head, answer = control_request(dealer, 2, {"op": "ping"})  # hellos get no answer

    after = counters(node)
    assert head[:3] == [2, 2, 2] and answer["node"] == node.name
    assert grew(before, after, "refused_hellos") == len(hellos)
    # The one well-formed introduction is a hint: it names no control endpoint to confirm it,
    # so it is refused at verification and never listed.
    reason = wait_until(
        lambda: {r.name: why for r, why in node.refused_peers()}.get(names["good"]), WAIT,
        "the well-formed hello to reach verification")
    assert "unverified" in reason, reason
    known = {record.name for record in node.nodes()}
    assert not known & {*names.values()}


def test_a_hello_with_a_unicode_digit_is_refused_like_any_bad_hello(
    target: Target, raw: RawFactory
) -> None:
    node = target.node
    dealer = raw(zmq.DEALER, connect=target.url(EndpointKind.CONTROL, "control"))
    hello = {"op": "hello", "name": unique("evil"), "txt": _txt(secrets.token_hex(8), pid="²")}
    dealer.send_multipart([b"", hdr(1, 0), msgpack.packb(hello)])  # "²".isdigit() is True
    head, answer = control_request(dealer, 2, {"op": "ping"})
    assert answer["node"] == node.name  # the control thread is alive
    assert node.counters.get("refused_hellos") == 1
    assert node.counters.get("control_errors") == 0


# --- pipelines -------------------------------------------------------------------------------


def test_puller_refuses_malformed_messages(target: Target, raw: RawFactory) -> None:
    node = target.node
    pipeline = unique("jobs")
    puller = node.puller(pipeline)
    push = raw(zmq.PUSH, connect=target.url(EndpointKind.PIPELINE, pipeline))
    push.send_multipart([hdr(5, 1), msgpack.packb("first")])
    assert puller.recv(timeout=WAIT) == "first"
    before = counters(node)

    for frames in BAD_MESSAGES.values():
        push.send_multipart(frames)
    push.send_multipart([hdr(5, 99), msgpack.packb("last")])
    message = puller.recv_message(timeout=WAIT)

    after = counters(node)
    assert message is not None and message.body == "last" and message.msg_id == 99
    assert grew(before, after, "refused_message") == len(BAD_MESSAGES)
    assert puller.recv_message(timeout=0.05) is None  # nothing else got through
    puller.close()


def test_puller_fast_path_never_mixes_frames_of_two_messages(
    target: Target, raw: RawFactory
) -> None:
    """``Puller.recv`` takes a canonical one-frame message without checking for more frames (the
    check costs more than the rest of the receive): trailing frames are read next as if the same
    sender had sent them as messages of their own (the wire spec allows it), and never joined
    to a frame of any other message."""
    from zmqfabric.core import wire

    node = target.node
    pipeline = unique("jobs")
    puller = node.puller(pipeline)
    push = raw(zmq.PUSH, connect=target.url(EndpointKind.PIPELINE, pipeline))

    def canonical(body: Any) -> bytes:
        return wire.pack_message(wire.Kind.MESSAGE, 5, 0.0, msgpack.packb(body))

    header = wire.pack_header(wire.Kind.MESSAGE, 5, 0.0)
    push.send(canonical("first"))
    assert puller.recv(timeout=WAIT) == "first"
    before = counters(node)

    push.send(header)  # header frame only: refused, the next message stays whole
    push.send(canonical("second"))
    push.send(canonical("x")[:-1] + b"\xc1")  # not msgpack
    push.send_multipart([canonical("third"), canonical({"x": 1}), BODY])  # trailing frames
    push.send(canonical("last"))
    got = [puller.recv(timeout=WAIT) for _ in range(4)]

    assert got == ["second", "third", {"x": 1}, "last"]
    assert grew(before, counters(node), "refused_message") == 3  # header, \xc1, BODY
    with pytest.raises(zf.FabricTimeoutError):
        puller.recv(timeout=0.05)
    puller.close()


# --- streams ---------------------------------------------------------------------------------


def test_subscriber_refuses_malformed_events(target: Target, raw: RawFactory) -> None:
    """A raw PUB enters the node's directory as the publisher of a stream; the node's own
    subscription connects to it like to any publisher."""
    node = target.node
    stream = unique("ticks")
    pub = raw(zmq.PUB, bind=True)
    record = advertise_raw(node, EndpointKind.STREAM, stream, pub, "rawpub")
    sub = node.subscribe(stream)
    try:
        assert sub.wait_ready(WAIT)
        deadline = time.monotonic() + WAIT
        while sub.recv_message(timeout=0.05) is None:  # until the subscription is through
            assert time.monotonic() < deadline, "the subscriber never received the raw PUB"
            pub.send(b"probe\x00" + one(4, 1, "probe"))
        before = counters(node)

        for frames in BAD_EVENTS.values():
            pub.send_multipart(frames)
        pub.send_multipart([b"end\x00" + hdr(4, 99), msgpack.packb("end")])
        while True:
            message = sub.recv_message(timeout=WAIT)
            assert message is not None, "the good event after the bad ones never came"
            if message.topic == "end":
                break
            assert message.topic == "probe"

        after = counters(node)
        assert message.body == "end" and message.msg_id == 99
        assert grew(before, after, "refused_event") == len(BAD_EVENTS)
    finally:
        sub.close()
        node.directory.remove(record.name)


#: What a raw XSUB sends upstream to a publisher besides valid subscriptions: each is refused and
#: counted once (a multipart message as one). Built from the marker rule of the wire spec.
MARKER = b"\xffzf/sub/"
BAD_SUBSCRIPTIONS: dict[str, list[bytes]] = {
    "empty message": [b""],
    "not a subscription": [b"garbage"],
    "unknown command byte": [b"\x02topic"],
    "two frames": [b"junk", b"more junk"],
    "marker too short": [b"\x01" + MARKER + b"abc"],
    "marker too long": [b"\x01" + MARKER + b"0" * 17],
    "marker not hex": [b"\x01" + MARKER + b"g" * 16],
    "marker in upper case": [b"\x01" + MARKER + b"ABCDEF0123456789"],
}


def test_publisher_refuses_malformed_subscription_frames(target: Target, raw: RawFactory) -> None:
    """A publisher's XPUB reads whatever a connected peer sends. A raw XSUB sends junk and bad
    markers, then a valid marker: once that is counted every frame before it has been handled
    (one connection keeps its order), and the refusal counter has grown by one per bad message.
    Topic subscriptions are not refused, and the publisher still publishes to the XSUB."""
    node = target.node
    publisher = node.publisher(unique("ticks"))
    try:
        xsub = raw(zmq.XSUB, connect=target.url(EndpointKind.STREAM, publisher.name))
        before = counters(node)
        xsub.send(b"\x01EUR")
        for frames in BAD_SUBSCRIPTIONS.values():
            xsub.send_multipart(frames)
        good = MARKER + b"0123456789abcdef"
        xsub.send(b"\x01" + good)
        assert publisher.wait_subscribers(1, WAIT) == 1, "the valid marker was not counted"
        after = counters(node)
        assert grew(before, after, "refused_subscription") == len(BAD_SUBSCRIPTIONS)

        publisher.send("EURUSD", "still publishing")  # the marker was counted: EUR is applied
        (frame,) = recv(xsub)
        topic, _, message = frame.partition(b"\x00")
        fields = msgpack.unpackb(message)
        assert (topic, fields[4]) == (b"EURUSD", "still publishing")
        assert fields[:2] == [2, 4]

        xsub.send(b"\x00" + good)  # unsubscribing the marker: the subscriber left
        deadline = time.monotonic() + WAIT
        while publisher.subscribers:
            assert time.monotonic() < deadline, "the unsubscribed marker still counts"
            publisher._sock.poll(20)
        assert grew(before, counters(node), "refused_subscription") == len(BAD_SUBSCRIPTIONS)
    finally:
        publisher.close()


# --- replies (a zmqfabric requester talking to a raw, broken service) -------------------------


def test_requester_refuses_malformed_replies(target: Target, raw: RawFactory) -> None:
    """A raw ROUTER answers each request with junk first, then a reply to another id, then the
    right reply: the requester skips the first two and returns the third."""
    node = target.node
    service = unique("shaky")
    router = raw(zmq.ROUTER, bind=True)
    record = advertise_raw(node, EndpointKind.REPLY, service, router, "rawsvc")
    before = counters(node)
    bad = 0

    def answer_badly() -> None:
        nonlocal bad
        route_id, _, frame = recv(router)  # one frame
        msg_id = msgpack.unpackb(frame)[2]
        bad_replies = [
            [b"", b"garbage", BODY],
            [b"", hdr(1, msg_id), BODY],  # a request, not a reply
            [hdr(2, msg_id), BODY],  # no delimiter
            [b"", hdr(3, msg_id), msgpack.packb("an error body must be a map")],
            [b"", hdr(2, msg_id, version=1), BODY],
            [b"", one(2, msg_id, "x"), BODY],  # a whole message, then more
            [b"", hdr(2, msg_id), b"\xc1"],
        ]
        for frames in bad_replies:
            router.send_multipart([route_id, *frames])
        bad = len(bad_replies)
        router.send_multipart([route_id, b"", one(2, msg_id + 1, "stale")])
        router.send_multipart([route_id, b"", hdr(2, msg_id), msgpack.packb({"ok": True})])

    worker = threading.Thread(target=answer_badly, name="test-raw-router")
    try:
        worker.start()
        try:
            reply = node.request(service, {"q": 1}, timeout=WAIT)
        finally:
            worker.join(WAIT)
        assert not worker.is_alive()
        after = counters(node)
        assert reply == {"ok": True}
        assert bad and grew(before, after, "refused_reply") == bad
        assert grew(before, after, "stale_replies") == 1
    finally:
        node.directory.remove(record.name)


# --- size limits -----------------------------------------------------------------------------


@pytest.fixture
def small_target() -> Iterator[Target]:
    """A node whose sockets refuse frames over 1024 bytes (ZeroMQ MAXMSGSIZE)."""
    with serving_node(zf.NodeConfig(max_message_size=1024)) as started:
        yield started


def connect_and_get_dropped(sock: zmq.Socket, url: str, frames: list[bytes]) -> None:
    """Connect ``sock``, send ``frames`` and wait until ZeroMQ reports that the peer dropped the
    connection (what a socket does on a message over its MAXMSGSIZE)."""
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(url)
        wait_for_event(monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED}, WAIT, f"a connection to {url}")
        sock.send_multipart(frames)
        wait_for_event(monitor, {zmq.EVENT_DISCONNECTED}, WAIT,
                       "the peer to drop the oversized message")
    finally:
        sock.disable_monitor()
        monitor.close(0)


def test_oversized_messages_are_dropped_and_the_node_keeps_serving(
    small_target: Target, raw: RawFactory
) -> None:
    target = small_target
    node = target.node
    pipeline = unique("frames")
    puller = node.puller(pipeline)
    service_url = target.url(EndpointKind.REPLY, target.service)
    big = msgpack.packb(b"x" * (1024 + MESSAGE_ENVELOPE + 1))  # the body limit and the envelope

    dealer = raw(zmq.DEALER)
    connect_and_get_dropped(dealer, service_url, [b"", hdr(1, 1), big])
    push = raw(zmq.PUSH)
    connect_and_get_dropped(push, target.url(EndpointKind.PIPELINE, pipeline), [hdr(5, 1), big])

    echo_request(raw(zmq.DEALER, connect=service_url), target, 2, "small")
    raw(zmq.PUSH, connect=target.url(EndpointKind.PIPELINE, pipeline)).send_multipart(
        [hdr(5, 2), msgpack.packb("small")]
    )
    message = puller.recv_message(timeout=WAIT)
    assert message is not None and message.body == "small" and message.msg_id == 2
    assert target.calls == ["small"]  # the big request never reached the handler
    assert dealer.poll(0) == 0
    puller.close()


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Bad Name!", "", "UPPER", "-x", "a.b", "x" * 64, "naïve"])
def test_bad_node_names_are_refused_with_a_clear_message(name: str) -> None:
    with pytest.raises(zf.InvalidNameError) as info:
        zf.Node(name)
    text = str(info.value)
    assert text.startswith(f"invalid node name {name!r}: ")
    assert "lowercase letters, digits, '-' or '_'" in text
    assert isinstance(info.value, ValueError) and info.value.name == name


def test_bad_endpoint_names_are_refused_with_a_clear_message(make_node: Any) -> None:
    node = make_node("names")
    with pytest.raises(zf.InvalidNameError, match=r"^invalid service name 'bad name': use 1-64"):
        zf.Node(unique("unstarted")).reply("bad name")
    for what, make in [
        ("stream", node.publisher),
        ("stream", node.subscribe),
        ("pipeline", node.pusher),
        ("pipeline", node.puller),
        ("service", node.requester),
    ]:
        with pytest.raises(zf.InvalidNameError) as info:
            make("no spaces!")
        assert info.value.what == what
        assert str(info.value).startswith(f"invalid {what} name 'no spaces!': ")


def test_request_with_a_bad_service_name_fails_at_once(make_node: Any) -> None:
    node = make_node("names")
    start = time.monotonic()
    with pytest.raises(zf.InvalidNameError, match=r"^invalid service name 'Bad Name!': "):
        node.request("Bad Name!", {}, timeout=5.0)
    assert time.monotonic() - start < 1.0  # at once, not after the timeout


def test_the_longest_valid_node_name_can_start() -> None:
    name = unique("long").ljust(46, "x")
    node = zf.Node(name)
    try:
        node.start()
        assert node.record.name == name
    finally:
        node.close()
    with pytest.raises(zf.InvalidNameError, match="1-46"):
        zf.Node(name + "x")  # one more cannot be advertised: refused at construction


# --- forged discovery records ----------------------------------------------------------------


def _register(zc: Zeroconf, info: ServiceInfo) -> None:
    """Register without probing (like the fabric): the record is out within milliseconds."""
    assert zc.loop is not None
    coro = zc.async_register_service(info, cooperating_responders=True)
    asyncio.run_coroutine_threadsafe(coro, zc.loop).result(WAIT)


def _forged(
    name: str,
    control_port: int,
    *,
    instance_id: str | None = None,
    address: str = "127.0.0.1",
    srv_port: int | None = None,
    bare_instance: bool = False,
    **override: str,
) -> ServiceInfo:
    """A record as the spec says, with one thing (``override`` & co) wrong, or none."""
    node_id = instance_id or secrets.token_hex(8)
    txt = _txt(node_id, e0=f"ctl:control:{control_port};rep:{unique('svc')}:{control_port}")
    txt.update(override)
    instance = f"{name}.{SERVICE_TYPE}" if bare_instance else f"{name}@{node_id}.{SERVICE_TYPE}"
    port = control_port if srv_port is None else srv_port
    return forged_service_info(instance, node_id, txt, port, address)


def test_forged_discovery_records_are_refused(raw: RawFactory) -> None:
    refusals = _LogCapture()  # attached before the node starts: it sees every refusal it logs
    discovery_log = logging.getLogger("zmqfabric.discovery")
    discovery_log.addHandler(refusals)
    try:
        with serving_node() as target:
            _forge_and_check(target, raw, refusals)
    finally:
        discovery_log.removeHandler(refusals)


def _forge_and_check(target: Target, raw: RawFactory, refusals: _LogCapture) -> None:
    node = target.node
    control = raw(zmq.ROUTER, bind=True)  # the good record's control endpoint: real, never read
    port = port_of(control)
    many = [f"rep:s{i}:{1000 + i}" for i in range(129)]
    bad = {
        "version": dict(v="2"),
        "id": dict(id="NOT-A-NODE-ID"),
        "ids differ": dict(id=secrets.token_hex(8)),
        "too many endpoints": {f"e{i}": ";".join(many[i * 10 : i * 10 + 10]) for i in range(13)},
        "port 0": dict(e0=f"ctl:control:{port};rep:svc:0"),
        "outside scope": dict(address="192.0.2.1"),
        "srv port": dict(srv_port=port + 1 if port < 65535 else port - 1),
        "instance without id": dict(bare_instance=True),
    }
    names = {case: unique("forged") for case in [*bad, "good"]}
    before = counters(node)

    def all_refused() -> bool:
        logged = refusals.text()
        if "suppressed" not in logged:  # else foreign records on this host used up the log budget
            assert "discovery_errors" not in counters(node), logged
            if not all(f"'{names[case]}" in logged for case in bad):
                return False
        return grew(before, counters(node), "refused_records") >= len(bad)

    zc = loopback_zeroconf()
    try:
        for case, defect in bad.items():
            _register(zc, _forged(names[case], port, **defect))  # type: ignore[arg-type]
        _register(zc, _forged(names["good"], port))

        # The good record, made the same way, passes validation and reaches verification: its
        # control port is a socket that takes the connection and never answers, like a node busy
        # starting, so it is asked again (VERIFY_BUSY_ATTEMPTS, about a minute) and never listed;
        # the bad ones are all counted.
        wait_until(lambda: grew(before, counters(node), "hints_retried") >= 1, 2 * WAIT,
                   "the well-formed forged record to reach verification (else the test forges "
                   "wrongly)")
        assert names["good"] not in {record.name for record in node.nodes()}
        assert names["good"] not in {r.name for r, _ in node.refused_peers()}  # still asked
        deadline = time.monotonic() + WAIT
        while not all_refused():
            assert (
                time.monotonic() < deadline
            ), f"not every forged record was refused: {counters(node)}\n{refusals.text()}"
            node.directory.wait_for(lambda: False, 0.05)
        known = {record.name for record in node.nodes()}
        assert not known & {names[case] for case in bad}, known
        assert node.ping(node.name, timeout=WAIT)["id"] == node.node_id
        with node.requester(target.service) as requester:
            assert requester.request("still serving", timeout=WAIT) == {"echo": "still serving"}
        assert "discovery_errors" not in counters(node)
    finally:
        zc.close()  # goodbyes for everything registered


class _LogCapture(logging.Handler):
    """Collects the discovery log's warnings (from zeroconf's thread)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._lines: list[str] = []
        self._lock_lines = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_lines:
            self._lines.append(record.getMessage())

    def text(self) -> str:
        with self._lock_lines:
            return "\n".join(self._lines)
