"""docs/PROTOCOL.md is enough to serve: a node written from it alone, in plain pyzmq, msgpack and
python-zeroconf (``tests/interop_node.py``, a child process that cannot import zmqfabric), is a
full member of a zmqfabric fabric. A zmqfabric node lists it and keeps it listed past the
liveness deadline, asks its control endpoint (ping, info, stats, record), calls its service,
submits reliable tasks to it (credit, an unasked credit, a failed first attempt retried), subscribes
to its stream (it counts the subscriber by its marker and publishes only then) and feeds its
pipeline. tests/test_interop.py holds the other direction: plain clients of zmqfabric services.

The last part checks the refusal rule of PROTOCOL.md section 5.6 from a plain client's side: a
request refused for its version, an oversized header or a full queue device is answered with an
error reply that repeats the request's id, so that a client matching replies by id sees it.

Everything stays on 127.0.0.1; the plain node is one child process for the module (started
once, stopped with SIGTERM: its goodbye is checked last).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

import zmqfabric as zf
from tests.helpers import unique, wait_until
from tests.procs import Child
from zmqfabric import constants
from zmqfabric.calls import control_call
from zmqfabric.core import wire
from zmqfabric.core.records import EndpointKind, decode_txt
from zmqfabric.devices import Queue
from zmqfabric.discovery.directory import Change, DirectoryEvent
from zmqfabric.security import keys

pytestmark = pytest.mark.slow

PROGRAM = Path(__file__).with_name("interop_node.py")
#: Bound for anything involving a new interpreter or mDNS.
SLOW = 15.0
#: The plain worker's first window, and the window it then grants unasked.
CREDIT, RAISED = 2, 8


@dataclass
class Plain:
    child: Child
    name: str
    node_id: str
    txt: dict[str, str]
    service: str
    tasks: str
    stream: str
    pipeline: str

    def stats(self, node: zf.Node) -> dict[str, Any]:
        answer: dict[str, Any] = node.stats(self.name, timeout=SLOW)["plain"]
        return answer


def start_plain(*extra: str) -> Plain:
    """Start the plain node (``extra``: more arguments) and wait for its READY line."""
    names = {k: unique(k) for k in ("plain", "echo", "jobs", "ticks", "frames")}
    child = Child([
        sys.executable, str(PROGRAM), "--name", names["plain"], "--service", names["echo"],
        "--tasks", names["jobs"], "--stream", names["ticks"], "--pipeline", names["frames"],
        "--credit", str(CREDIT), "--raise-credit", str(RAISED), "--lifetime", "120", *extra,
    ])
    try:
        ready = json.loads(child.expect("READY", SLOW))
    except BaseException:
        child.stop()
        raise
    assert ready["zmqfabric"] is False, "the plain node must not import zmqfabric"
    return Plain(child, names["plain"], ready["id"], ready["txt"], names["echo"],
                 names["jobs"], names["ticks"], names["frames"])


@pytest.fixture(scope="module")
def plain() -> Iterator[Plain]:
    """The plain node, for every test of the module; stopped (SIGTERM: goodbye) at the end."""
    started = start_plain()
    try:
        yield started
    finally:
        started.child.stop()


@pytest.fixture
def node(plain: Plain, make_node: Callable[..., zf.Node]) -> zf.Node:
    """A started zmqfabric node that has found the plain node."""
    observer = make_node("peer")
    observer.wait_for_node(plain.name, SLOW)
    return observer


# --- discovery and control ------------------------------------------------------------------


def test_a_node_lists_and_asks_the_plain_node(plain: Plain, node: zf.Node) -> None:
    """As advertised; then control ops ping, info, stats, record and an unknown one."""
    record = node.wait_for_node(plain.name, SLOW)

    assert record.node_id == plain.node_id and record.pid == plain.child.proc.pid
    assert record.address == "127.0.0.1" and record.seq == 1 and record.fabric == "default"
    assert {(ep.kind, ep.name) for ep in record.endpoints} == {
        (EndpointKind.CONTROL, "control"), (EndpointKind.REPLY, plain.service),
        (EndpointKind.TASK, plain.tasks), (EndpointKind.STREAM, plain.stream),
        (EndpointKind.PIPELINE, plain.pipeline),
    }
    # The control op "record" answers the node's own TXT map: the record a hint is checked with.
    answer = control_call(node.runtime, plain.name, "record", SLOW)
    assert answer == {"name": plain.name, "txt": plain.txt}
    props = {k.encode(): v.encode() for k, v in answer["txt"].items()}
    assert decode_txt(answer["name"], [record.address], props) == record

    ping = node.ping(plain.name, timeout=SLOW)
    info = node.info(plain.name, timeout=SLOW)
    stats = node.stats(plain.name, timeout=SLOW)

    assert ping["node"] == plain.name and ping["id"] == plain.node_id
    assert ping["pid"] == plain.child.proc.pid and ping["uptime_s"] > 0
    ports = {(e["kind"], e["name"]): e["port"] for e in info["endpoints"]}
    assert ports == {(ep.kind.value, ep.name): ep.port for ep in record.endpoints}
    assert info["address"] == "127.0.0.1"
    assert isinstance(stats["counters"], dict) and stats["plain"]["ops"]["stats"] >= 1
    # Our node introduced itself with a one-way hello: the plain node lists it.
    wait_until(lambda: node.name in node.info(plain.name, timeout=SLOW)["peers"], SLOW,
               "the plain node to hear our hello")
    with pytest.raises(zf.RemoteError, match="unknown control op"):
        control_call(node.runtime, plain.name, "no-such-op", SLOW)


def test_the_plain_node_stays_listed(plain: Plain, node: zf.Node) -> None:
    """Past the liveness deadline (a node whose control endpoint does not answer is dropped
    after LIVENESS_CONNECT_TIMEOUT_S): no "left" event for it, and it still answers."""
    left = threading.Event()

    def on_event(event: DirectoryEvent) -> None:
        if event.change is Change.LEFT and event.record.name == plain.name:
            left.set()

    unlisten = node.directory.listen(on_event)
    try:
        assert not left.wait(constants.LIVENESS_CONNECT_TIMEOUT_S + 1.5), "the plain node left"
    finally:
        unlisten()
    assert node.directory.get(plain.name) is not None
    assert node.runtime.counters.snapshot().get("peers_lost", 0) == 0
    assert node.ping(plain.name, timeout=SLOW)["id"] == plain.node_id
    if hasattr(constants, "PROBE_INTERVAL_S"):  # liveness by probes (SWIM): they were answered
        assert plain.stats(node)["ops"].get("probe", 0) >= 1


# --- the patterns ---------------------------------------------------------------------------


def test_a_node_calls_the_plain_service(plain: Plain, node: zf.Node) -> None:
    assert node.request(plain.service, {"a": [1, "two"]}, timeout=SLOW) == {
        "echo": {"a": [1, "two"]}, "by": plain.name}
    with pytest.raises(zf.RemoteError, match="failure on request"):
        node.request(plain.service, "fail", timeout=SLOW)
    big = os.urandom(constants.ZERO_COPY_THRESHOLD + 100)  # raw frames, both ways
    assert node.request(plain.service, big, timeout=SLOW) == big[::-1]


def test_a_node_submits_tasks_to_the_plain_worker(plain: Plain, node: zf.Node) -> None:
    count = 30
    handles = node.submit_many(plain.tasks, [{"n": i, "fail_first": i == 3} for i in range(count)])

    results = [handle.result(timeout=SLOW) for handle in handles]

    assert results == [{"n": i, "attempt": 2 if i == 3 else 1, "by": plain.name}
                       for i in range(count)]
    tasks = plain.stats(node)["tasks"]
    assert tasks["credit_requests"] >= 1 and tasks["unasked_credits"] >= 1
    assert tasks["beyond_window"] == 0, "the producer sent more than the window"
    # The unasked credit was honoured: more than the first window was held at once.
    assert CREDIT < tasks["held_max"] <= RAISED
    assert tasks["ran"] == count + 1 and tasks["failed"] == 1


def test_a_node_subscribes_to_the_plain_stream(plain: Plain, node: zf.Node) -> None:
    subscription = node.subscribe(plain.stream, topics=["t."])
    ticks: list[int] = []
    raws: list[bytes] = []
    deadline = time.monotonic() + SLOW
    while len(ticks) < 5 or not raws:
        assert time.monotonic() < deadline, f"got {ticks} and {raws}"
        topic, body = subscription.recv(timeout=SLOW)
        assert topic in ("t.tick", "t.raw"), f"the filter let {topic!r} through"
        if topic == "t.tick":
            ticks.append(body["n"])
        else:
            raws.append(body)

    assert ticks == sorted(ticks) and all(len(set(raw)) == 1 for raw in raws)
    assert plain.stats(node)["subscribers"] == 1  # our marker, counted
    subscription.close()
    wait_until(lambda: plain.stats(node)["subscribers"] == 0, SLOW,
               "the plain publisher to see the marker go")


def test_a_node_feeds_the_plain_puller(plain: Plain, node: zf.Node) -> None:
    bodies = [{"frame": i, "data": bytes([i]) * i} for i in range(5)]
    with node.pusher(plain.pipeline) as pusher:
        for body in bodies:
            pusher.send(body, timeout=SLOW)
        wait_until(lambda: all(b in plain.stats(node)["pulled"] for b in bodies), SLOW,
                   "the plain puller to get every message")
    pulled = [b for b in plain.stats(node)["pulled"] if b in bodies]
    assert pulled == bodies  # one pusher: in order


def test_the_plain_node_says_goodbye(plain: Plain, node: zf.Node) -> None:
    """Last: SIGTERM makes the plain node unregister; the goodbye removes it at once."""
    assert node.directory.get(plain.name) is not None
    plain.child.signal(15)
    assert node.directory.wait_for(lambda: node.directory.get(plain.name) is None, SLOW)
    assert plain.child.wait(SLOW) == 0, plain.child.err_tail()


def test_a_secured_plain_node_serves_a_secured_fabric(
    make_node: Callable[..., zf.Node], tmp_path: Path
) -> None:
    """PROTOCOL.md section 3.2: CURVE on every endpoint with the record's key (ck), ZAP with an
    allow-list. A node with keys verifies, lists and calls it; a node without keys refuses it."""
    node_keys = tmp_path / "keys"
    public = keys.generate(node_keys)
    secured = start_plain("--secure", f"--allow={public}")  # a Z85 key may begin with "-"
    try:
        keys.allow(node_keys, secured.txt["ck"], "plain")
        node = make_node("secured", keys=str(node_keys))
        record = node.wait_for_node(secured.name, SLOW)
        assert record.curve_key == secured.txt["ck"]
        assert node.ping(secured.name, timeout=SLOW)["id"] == secured.node_id
        assert node.request(secured.service, "hi", timeout=SLOW) == {
            "echo": "hi", "by": secured.name}
        open_node = make_node("open")  # no keys: a secured record is refused, never listed
        wait_until(lambda: any(r.name == secured.name for r, _ in open_node.refused_peers()),
                   SLOW, "the unsecured node to refuse the secured one")
        assert open_node.directory.get(secured.name) is None
    finally:
        secured.child.stop()


# --- refusals a plain client can match (PROTOCOL.md section 5.6) ----------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (msgpack.packb([2, 1, 4242, 1.5]), 4242),
        (msgpack.packb([1, 1, 2**64 - 1, 1.5, {"pad": "x" * 5000}]), 2**64 - 1),
        (msgpack.packb([2, 1, 7, 1.5]) + msgpack.packb({"body": 1}), 7),
        (wire.pack_header(wire.Kind.REQUEST, 99, 1.5), 99),
        (b"", None),
        (b"\xc1" * 30, None),
        (msgpack.packb([1, 1]), None),
        (msgpack.packb([1, 1, -1, 1.5]), None),
        (msgpack.packb([1, 1, "5", 1.5]), None),
        (msgpack.packb(["x" * 100, 1, 5, 1.5]), None),  # the id is past the 64 bytes read
        (msgpack.packb({"id": 5}), None),
    ],
)
def test_request_id_reads_the_id_of_headers_that_do_not_parse(
    data: bytes, expected: int | None
) -> None:
    assert wire.request_id(data) == expected


REFUSED_REQUESTS = {
    "version 1": ([msgpack.packb([1, 1, 4242, time.time()]), msgpack.packb("x")], 4242,
                  "unsupported protocol version 1"),
    "header over 4096 bytes": (
        [msgpack.packb([2, 17, 4243, time.time(), {"pad": "x" * 5000}]), msgpack.packb("x")],
        4243, "exceeds 4096"),
    "one frame of a later version": (
        [msgpack.packb([3, 1, 4244, time.time(), "x"])], 4244, "unsupported protocol version 3"),
    "a reply sent as a request": ([msgpack.packb([2, 2, 4245, time.time(), "x"])],
                                  4245, "expected request"),
    "an unreadable header": ([b"\xc1\xc1\xc1", msgpack.packb("x")], 0, "not valid msgpack"),
}


@pytest.fixture
def serving() -> Iterator[zf.Node]:
    node = zf.Node(unique("refuser"))
    node.reply(unique("echo"))(lambda body: body)
    try:
        node.start()
        node.serve_in_background()
        yield node
    finally:
        node.close()


def _url(node: zf.Node, kind: EndpointKind) -> str:
    record = node.record
    return record.url(next(ep for ep in record.endpoints if ep.kind is kind))


def _refusal(dealer: zmq.Socket, frames: list[bytes]) -> tuple[list[Any], dict[str, str]]:
    """(version, kind, id) and body of the error reply: one frame ``[2, 3, id, ts, body]``, or
    a header frame (kind | 16) and a body frame."""
    dealer.send_multipart([b"", *frames])
    assert dealer.poll(int(SLOW * 1000)), "no answer: the refusal never came"
    delimiter, *message = dealer.recv_multipart()
    fields = msgpack.unpackb(message[0])
    if len(message) == 2:
        assert fields[1] & 16
        return [fields[0], fields[1] ^ 16, fields[2]], msgpack.unpackb(message[1])
    return fields[:3], fields[4]


@pytest.mark.parametrize("case", sorted(REFUSED_REQUESTS))
@pytest.mark.parametrize("kind", [EndpointKind.REPLY, EndpointKind.CONTROL])
def test_a_refusal_repeats_the_request_id(
    serving: zf.Node, raw: Any, case: str, kind: EndpointKind
) -> None:
    frames, msg_id, why = REFUSED_REQUESTS[case]
    dealer = raw(zmq.DEALER, connect=_url(serving, kind))

    head, body = _refusal(dealer, frames)

    assert head[:3] == [2, wire.Kind.ERROR, msg_id]
    assert body["type"] == "RemoteProtocolError" and why in body["message"]


def test_a_full_queue_device_refuses_with_the_request_id(
    make_node: Callable[..., zf.Node], raw: Any
) -> None:
    """No worker: requests wait in the device until it holds its most, then are refused."""
    hub = make_node("hub")
    with Queue(hub, unique("nobody")):
        dealer = raw(zmq.DEALER, connect=_url(hub, EndpointKind.QUEUE))
        dealer.setsockopt(zmq.SNDHWM, 0)
        body = msgpack.packb("x")
        for msg_id in range(1, 10_001):  # the device holds 10,000 requests
            dealer.send_multipart([b"", wire.pack_header(wire.Kind.REQUEST, msg_id, 0.0), body])
        head, answer = _refusal(dealer, [wire.pack_header(wire.Kind.REQUEST, 77777, 0.0), body])
    assert head[:3] == [2, wire.Kind.ERROR, 77777]
    assert answer["type"] == "Overloaded"


@given(st.binary(max_size=200))
def test_request_id_never_raises(data: bytes) -> None:
    msg_id = wire.request_id(data)
    assert msg_id is None or 0 <= msg_id < 2**64


@given(st.sampled_from(list(wire.Kind)), st.integers(0, 2**64 - 1), st.floats(allow_nan=False),
       st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.text(max_size=8),
                                            max_size=3)))
def test_request_id_reads_every_header_the_fabric_writes(
    kind: wire.Kind, msg_id: int, stamp: float, headers: dict[str, str] | None
) -> None:
    assert wire.request_id(wire.pack_header(kind, msg_id, stamp, headers)) == msg_id
