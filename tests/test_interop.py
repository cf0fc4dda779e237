"""The written spec is enough: programs that do NOT import zmqfabric talk to a zmqfabric node.

Each raw program runs in its own interpreter with only pyzmq, msgpack and python-zeroconf
(``sys.modules["zmqfabric"] = None`` makes any import of the fabric fail there). It finds the node
the way the records spec (``zmqfabric/core/records.py``) says, by browsing ``_zmqfabric._tcp`` on
127.0.0.1 and reading the TXT record, and frames messages the way the wire spec
(``docs/PROTOCOL.md``, version 2) says. The raw programs print the frames they receive as hex in
JSON lines; this test decodes and checks them. The last test turns it around: a raw program
advertises a pipeline by hand-written record, and a zmqfabric pusher finds it and feeds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import secrets
import textwrap
import time
from typing import Any, Iterator

import msgpack
import pytest

import zmqfabric as zf
from tests.conftest import unique
from tests.procs import Child, ProcessGroup
from zmqfabric.constants import ZERO_COPY_THRESHOLD
from zmqfabric.core.wire import Kind

pytestmark = pytest.mark.slow

#: Bound for anything involving a new interpreter and mDNS.
SLOW = 20.0

#: Shared by every raw program. Uses nothing of zmqfabric: only the specs.
RAW_PRELUDE = r'''
import sys
sys.modules["zmqfabric"] = None  # any import of the fabric fails: the specs must be enough
import hashlib, json, os, signal, socket, struct, threading, time
import msgpack
import zmq
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

SERVICE_TYPE = "_zmqfabric._tcp.local."

def out(**fields):
    print(json.dumps(fields), flush=True)

def hexes(frames):
    """Frames for the report: hex, or a digest for big ones."""
    return [f.hex() if len(f) <= 4096 else f"sha256:{hashlib.sha256(f).hexdigest()}:{len(f)}"
            for f in frames]

def message(kind, msg_id, body, headers=None):
    """A one-frame message as any msgpack library writes it (compact ints: not zmqfabric's
    21-byte fixed fields)."""
    fields = [2, kind, msg_id, time.time(), body]
    if headers:
        fields.append(headers)
    return msgpack.packb(fields)

def header(kind, msg_id, headers=None):
    """A header frame (the body is the next frame): the kind with the FOLLOWS bit, 16."""
    fields = [2, kind | 16, msg_id, time.time()]
    if headers:
        fields.append(headers)
    return msgpack.packb(fields)

def canonical(kind, msg_id):
    """The 21-byte fixed fields drawn in the spec; the packed body follows them."""
    return struct.pack(">BBBBQBd", 0x95, 2, kind, 0xCF, msg_id, 0xCB, time.time())

def zeroconf():
    return Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)

def find(node, kind, name, timeout=15.0):
    """Browse for node NODE; return (url of its KIND endpoint NAME, its TXT as text).

    A record changes (``seq`` goes up) when the node adds an endpoint, and mDNS caches can hold
    the previous version for a moment: resolve again until the endpoint is listed."""
    deadline = time.monotonic() + timeout
    zc = zeroconf()
    try:
        seen = []
        found = threading.Event()
        def on_change(zeroconf, service_type, name, state_change):
            label = name[: -len("." + SERVICE_TYPE)]
            if label.partition("@")[0] == node:  # instance "<node>@<node id>"
                seen.append(name)
                found.set()
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        try:
            if not found.wait(timeout):
                raise SystemExit(f"node {node} not found by browsing")
            while True:
                info = zc.get_service_info(SERVICE_TYPE, seen[-1], timeout=2000)
                if info is not None:
                    txt = {k.decode("ascii"): v.decode("utf-8") for k, v in info.properties.items()}
                    endpoints = parse_endpoints(txt)
                    if (kind, name) in endpoints:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"node {node} never listed {kind}:{name}: {info and txt}")
                time.sleep(0.05)
        finally:
            browser.cancel()
        assert txt["v"] == "1", txt
        assert seen[-1] == f"{node}@{txt['id']}.{SERVICE_TYPE}", (seen, txt)
        assert endpoints[("ctl", "control")] == info.port, "SRV port is the control endpoint"
        address = info.parsed_addresses(IPVersion.V4Only)[0]
        return f"tcp://{address}:{endpoints[(kind, name)]}", txt
    finally:
        zc.close()

def parse_endpoints(txt):
    """{(kind, name): port} from the TXT keys e0, e1, ... ("kind:name:port" joined by ";")."""
    items, i = [], 0
    while f"e{i}" in txt:
        items.extend(txt[f"e{i}"].split(";"))
        i += 1
    endpoints = {}
    for item in items:
        k, n, port = item.split(":")
        endpoints[(k, n)] = int(port)
    return endpoints

ctx = zmq.Context()

def raw_socket(kind):
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.setsockopt(zmq.SNDTIMEO, 10000)
    return sock

def wait_for_sigterm(limit=60.0):
    """Park until the test stops us (bounded), then exit cleanly."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigtimedwait({signal.SIGTERM}, limit)
'''


def raw_program(body: str, **params: Any) -> str:
    head = "".join(f"{key} = {value!r}\n" for key, value in params.items())
    return RAW_PRELUDE + head + textwrap.dedent(body) + "\nctx.destroy(0)\n"


def lines_until(child: Child, last: str, timeout: float = SLOW) -> list[dict[str, Any]]:
    """JSON lines of ``child`` up to (not including) the line ``{"event": last}``."""
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while True:
        line = json.loads(child.readline(max(0.01, deadline - time.monotonic())))
        if line.get("event") == last:
            return got
        got.append(line)


def poll_lines(child: Child, into: list[dict[str, Any]], wait: float) -> bool:
    """Append the JSON lines ``child`` has printed so far; False once it has exited."""
    try:
        while True:
            line = child.lines.get(timeout=wait)
            if line is None:
                child.lines.put(None)
                return False
            into.append(json.loads(line))
    except queue.Empty:
        return True


def unhex(frames: list[str]) -> list[bytes]:
    return [bytes.fromhex(f) for f in frames]


def digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}:{len(data)}"


def check_txt(txt: dict[str, str], node: zf.Node) -> None:
    """The TXT record the raw program read is the documented one."""
    assert txt["id"] == node.node_id
    assert txt["pid"] == str(os.getpid())
    assert txt["seq"].isdigit() and txt["host"]


def echo(body: Any) -> Any:
    if body == "fail":
        raise ValueError("failure on request")
    return {"echo": body}


@pytest.fixture
def server() -> Iterator[zf.Node]:
    """A node serving "echo-..." (handler ``echo``) from its background serve loop."""
    node = zf.Node(unique("interop"))
    node.reply(unique("echo"))(echo)
    try:
        node.start()
        node.serve_in_background()
        yield node
    finally:
        node.close()


def service_of(node: zf.Node) -> str:
    return next(ep.name for ep in node.record.endpoints if ep.kind is zf.EndpointKind.REPLY)


# --- (a) request/reply -----------------------------------------------------------------------

REQUESTER = """
url, txt = find(NODE, "rep", SVC)
out(event="txt", txt=txt)
with raw_socket(zmq.REQ) as req:
    req.connect(url)
    # A REQ socket adds the empty delimiter itself: it sends one frame, the message.
    for i, body in enumerate(BODIES):
        frame = message(1, 100 + i, body) if i % 2 else canonical(1, 100 + i) + msgpack.packb(body)
        req.send(frame)
        out(event="reply", via="req", sent=100 + i, frames=hexes(req.recv_multipart()))
    req.send_multipart([header(1, 200, {"enc": "raw"}), RAW])  # a header frame, a raw body
    out(event="reply", via="req", sent=200, frames=hexes(req.recv_multipart()))
    req.send_multipart([header(1, 201), msgpack.packb("fail")])  # a header frame, msgpack
    out(event="reply", via="req", sent=201, frames=hexes(req.recv_multipart()))
with raw_socket(zmq.DEALER) as dealer:
    dealer.connect(url)
    # A DEALER sends the delimiter itself, and may pipeline: replies carry the request's id.
    ids = [2**64 - 1, 0, 12345]
    for i, msg_id in enumerate(ids):
        dealer.send_multipart([b"", canonical(1, msg_id) + msgpack.packb({"dealer": i})])
    for _ in ids:
        out(event="reply", via="dealer", frames=hexes(dealer.recv_multipart()))
out(event="done")
"""


def test_raw_req_and_dealer_call_a_service(procs: ProcessGroup, server: zf.Node) -> None:
    service = service_of(server)
    bodies = [{"n": 1, "text": "héllo", "bin": b"\x00\xff"}, [1, 2.5, None, True], "plain", None]
    raw = bytes(range(256)) * 3
    child = procs.python(
        raw_program(REQUESTER, NODE=server.name, SVC=service, BODIES=bodies, RAW=raw), ready=False
    )

    lines = lines_until(child, "done")

    check_txt(lines[0]["txt"], server)
    replies = lines[1:]
    assert len(replies) == len(bodies) + 2 + 3
    for line, body in zip(replies, bodies, strict=False):
        (frame,) = unhex(line["frames"])  # REQ strips the delimiter; a reply is one frame
        fields = msgpack.unpackb(frame)
        assert fields[:3] == [2, 2, line["sent"]] and len(fields) == 5
        assert fields[4] == {"echo": body}
    raw_reply = replies[len(bodies)]
    (frame,) = unhex(raw_reply["frames"])
    fields = msgpack.unpackb(frame)
    assert fields[:3] == [2, 2, 200]
    assert fields[4] == {"echo": raw}  # the handler got the raw bytes
    error = replies[len(bodies) + 1]
    (frame,) = unhex(error["frames"])
    fields = msgpack.unpackb(frame)
    assert fields[:3] == [2, 3, 201]
    assert fields[4] == {"type": "ValueError", "message": "failure on request"}
    seen = {}
    for line in replies[-3:]:
        delimiter, frame = unhex(line["frames"])
        fields = msgpack.unpackb(frame)
        assert delimiter == b"" and fields[:2] == [2, 2]
        seen[fields[2]] = fields[4]
    assert seen == {
        2**64 - 1: {"echo": {"dealer": 0}},
        0: {"echo": {"dealer": 1}},
        12345: {"echo": {"dealer": 2}},
    }
    assert child.wait(SLOW) == 0, child.err_tail()


# --- (b) publish/subscribe -------------------------------------------------------------------

SUBSCRIBER = """
url, txt = find(NODE, "pub", STREAM)
out(event="txt", txt=txt)
pending = set(WANTED)
with raw_socket(zmq.SUB) as sub:
    sub.setsockopt(zmq.SUBSCRIBE, PREFIX.encode())
    sub.connect(url)
    deadline = time.monotonic() + 15
    while pending and time.monotonic() < deadline:
        if not sub.poll(200):
            continue
        frames = sub.recv_multipart()  # one frame "topic NUL message" (big raw bodies: two)
        topic = frames[0].partition(b"\\x00")[0].decode()
        if topic in pending or not topic.startswith(PREFIX):
            out(event="event", frames=hexes(frames))
            pending.discard(topic)
out(event="done", missing=sorted(pending))
"""


def test_raw_sub_receives_a_stream_with_a_topic_filter(
    procs: ProcessGroup, server: zf.Node
) -> None:
    stream = unique("prices")
    big = secrets.token_bytes(ZERO_COPY_THRESHOLD + 1000)  # goes raw, uncopied
    events = {
        "EURUSD": {"bid": 1.1, "ask": 1.2},
        "EURGBP": [1, "two", b"\x03"],
        "EUR.big": big,
        "USDJPY": {"never": "subscribed"},
        "EU": "a prefix of the filter, not matching it",
    }
    wanted = ["EURUSD", "EURGBP", "EUR.big"]
    publisher = server.publisher(stream)
    child = procs.python(
        raw_program(SUBSCRIBER, NODE=server.name, STREAM=stream, PREFIX="EUR", WANTED=wanted),
        ready=False,
    )

    # Publish until the subscriber has everything (a new subscriber misses what came before it).
    lines: list[dict[str, Any]] = []
    deadline = time.monotonic() + SLOW
    while not lines or lines[-1].get("event") != "done":
        assert time.monotonic() < deadline, f"subscriber never finished; {child.err_tail()}"
        for topic, body in events.items():
            publisher.send(topic, body)
        alive = poll_lines(child, lines, 0.02)
        assert alive or (lines and lines[-1].get("event") == "done"), child.err_tail()

    assert lines[-1]["missing"] == []
    check_txt(lines[0]["txt"], server)
    received = {}
    for line in lines[1:-1]:
        frames = line["frames"]
        first = bytes.fromhex(frames[0])
        topic, end, rest = first.partition(b"\x00")
        assert end, "the topic ends with NUL"
        assert topic.decode() in wanted, f"the filter let {topic!r} through"
        fields = msgpack.unpackb(rest)
        if len(frames) == 2:  # a header frame and the raw body
            assert fields[:2] == [2, 4 | 16] and fields[4] == {"enc": "raw"}
            assert frames[1] == digest(big)
            received[topic.decode()] = big
        else:
            assert fields[:2] == [2, 4] and 0 <= fields[2] < 2**64 and len(fields) == 5
            received[topic.decode()] = fields[4]
    assert received == {topic: events[topic] for topic in wanted}
    assert child.wait(SLOW) == 0, child.err_tail()
    publisher.close()


# --- (c) push/pull ---------------------------------------------------------------------------

PUSHER = """
url, txt = find(NODE, "pull", PIPELINE)
out(event="txt", txt=txt)
with raw_socket(zmq.PUSH) as push:
    push.connect(url)
    for i, body in enumerate(BODIES):
        one = canonical(5, 500 + i) + msgpack.packb(body)
        push.send(message(5, 500 + i, body) if i % 2 else one)
    push.send_multipart([header(5, 600, {"enc": "raw", "x-trace": "abc"}), RAW])
    out(event="sent")
    wait_for_sigterm()  # keep the socket until the test has everything
"""


def test_raw_push_feeds_a_puller(procs: ProcessGroup, server: zf.Node) -> None:
    pipeline = unique("frames")
    puller = server.puller(pipeline)
    bodies = [{"frame": 1, "data": b"\x01\x02"}, "two", 3, [4.5, None], {"nested": {"x": [1]}}]
    raw = secrets.token_bytes(5000)
    child = procs.python(
        raw_program(PUSHER, NODE=server.name, PIPELINE=pipeline, BODIES=bodies, RAW=raw),
        ready=False,
    )

    got: list[zf.Message] = []
    deadline = time.monotonic() + SLOW
    while len(got) < len(bodies) + 1:
        assert time.monotonic() < deadline, f"got {len(got)} messages; {child.err_tail()}"
        message = puller.recv_message(timeout=0.1)
        if message is not None:
            got.append(message)
        else:
            assert child.proc.poll() is None, f"pusher exited: {child.err_tail()}"
    assert [m.body for m in got[:-1]] == bodies  # one pusher: in order, exactly
    assert [m.msg_id for m in got[:-1]] == [500 + i for i in range(len(bodies))]
    assert all(m.kind is Kind.MESSAGE for m in got)
    assert got[-1].body == raw and got[-1].msg_id == 600
    assert got[-1].headers == {"enc": "raw", "x-trace": "abc"}
    assert json.loads(child.readline(SLOW))["event"] == "txt"
    assert json.loads(child.readline(SLOW))["event"] == "sent"
    puller.close()


# --- (d) the other way: a raw program advertises, a zmqfabric pusher finds it ----------------

ADVERTISER = """
node_id = os.urandom(8).hex()
with raw_socket(zmq.PULL) as pull, raw_socket(zmq.ROUTER) as control:
    pull.bind("tcp://127.0.0.1:0")
    control.bind("tcp://127.0.0.1:0")
    port = lambda s: int(s.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
    txt = {"v": "1", "id": node_id, "host": "raw-host", "pid": str(os.getpid()), "seq": "1",
           "e0": f"ctl:control:{port(control)};pull:{PIPELINE}:{port(pull)}"}
    info = ServiceInfo(SERVICE_TYPE, f"{NAME}@{node_id}.{SERVICE_TYPE}", port=port(control),
                       properties=txt, server=f"zf-{node_id}.local.",
                       addresses=[socket.inet_aton("127.0.0.1")])
    zc = zeroconf()
    try:
        zc.register_service(info, cooperating_responders=True)
        print("READY", flush=True)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        received, pinged, deadline = 0, False, time.monotonic() + 20
        while (received < COUNT or not pinged) and time.monotonic() < deadline:
            events = dict(poller.poll(200))
            if pull in events:
                out(event="message", frames=hexes(pull.recv_multipart()))
                received += 1
            if control in events:
                frames = control.recv_multipart()
                if len(frames) not in (3, 4) or frames[1]:  # only ours matter
                    continue
                route_id, delimiter, head, *body = frames
                try:  # one frame [2, 1, id, ts, body, map], or a header frame and a body frame
                    fields = msgpack.unpackb(head)
                    request = msgpack.unpackb(body[0]) if body else fields[4]
                except Exception:
                    continue
                if not isinstance(request, dict) or fields[0] != 2:
                    continue
                if request.get("op") == "ping":  # hellos are one-way: no answer
                    reply = msgpack.packb([2, 2, fields[2], time.time(),
                                           {"node": NAME, "raw": True}])
                    control.send_multipart([route_id, b"", reply])
                    pinged = True
                elif request.get("op") == "record":  # peers confirm our record with us first
                    reply = msgpack.packb([2, 2, fields[2], time.time(),
                                           {"name": NAME, "txt": txt}])
                    control.send_multipart([route_id, b"", reply])
                out(event="control", op=request.get("op"))
        zc.unregister_service(info)
    finally:
        zc.close()
out(event="done", received=received, pinged=pinged)
"""


def test_a_raw_program_advertises_a_pipeline_that_a_node_feeds(
    procs: ProcessGroup, make_node: Any
) -> None:
    name, pipeline = unique("raw"), unique("tasks")
    bodies = [{"task": i, "blob": bytes([i]) * i} for i in range(5)]
    child = procs.python(
        raw_program(ADVERTISER, NAME=name, PIPELINE=pipeline, COUNT=len(bodies)), timeout=SLOW
    )
    node = make_node("feeder")

    assert node.wait_for_endpoint(zf.EndpointKind.PIPELINE, pipeline, SLOW) == 1
    record = node.wait_for_node(name, SLOW)
    assert record.pid == child.proc.pid and record.host == "raw-host"
    assert node.ping(name, timeout=SLOW) == {"node": name, "raw": True}
    pusher = node.pusher(pipeline)
    for body in bodies:
        pusher.send(body, timeout=SLOW)

    lines = [line for line in lines_until(child, "done") if line["event"] == "message"]

    assert len(lines) == len(bodies)
    for line, body in zip(lines, bodies, strict=True):
        (frame,) = unhex(line["frames"])  # one frame
        fields = msgpack.unpackb(frame)
        assert frame[:4] == bytes((0x95, 2, 5, 0xCF)) and frame[12] == 0xCB  # canonical
        assert fields[:2] == [2, 5] and fields[4] == body
    assert child.wait(SLOW) == 0, child.err_tail()
    pusher.close()
    # The goodbye took the raw node out of the directory.
    assert node.directory.wait_for(lambda: node.directory.get(name) is None, SLOW)
