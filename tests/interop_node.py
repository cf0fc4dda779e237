"""A zmqfabric node written from docs/PROTOCOL.md alone: plain pyzmq, msgpack and python-zeroconf.

It does not import zmqfabric (the first lines make any such import fail), and each part below
names the section of docs/PROTOCOL.md it follows. tests/test_interop_serving.py runs it as a
child process against real zmqfabric nodes:

    python tests/interop_node.py --name N --service S --tasks T --stream X --pipeline P \
        [--credit 2 --raise-credit 8] [--lifetime 120]

It advertises itself by mDNS on 127.0.0.1 (section 4), answers its control endpoint (section 6:
ping, info, stats, record, the liveness ops; hello and peers are one-way), serves service S
(echo), serves task queue T (credit, slots, results), publishes stream X while it counts
subscribers by their markers, and pulls pipeline P (section 7). It prints ``READY {json}`` once
advertised, then JSON lines about what it saw; SIGTERM makes it say goodbye and exit, and it
exits by itself after ``--lifetime`` seconds (bounded, whatever happens to its parent).

Its ``stats`` answer has a section ``"plain"`` with what the test checks: subscribers counted,
tasks held at most per connection, deliveries beyond the window, messages pulled, ops answered.
"""

from __future__ import annotations

import sys

sys.modules["zmqfabric"] = None  # type: ignore[assignment]  # the document must be enough

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import msgpack  # noqa: E402
import zmq  # noqa: E402
from zeroconf import IPVersion, ServiceInfo, Zeroconf  # noqa: E402

# --- section 4: discovery -------------------------------------------------------------------
SERVICE_TYPE = "_zmqfabric._tcp.local."
ADDRESS = "127.0.0.1"  # the default scope: this host
MAX_TXT_VALUE = 250

# --- section 5: messages --------------------------------------------------------------------
VERSION = 2
REQUEST, REPLY, ERROR, EVENT, MESSAGE, TASKS, RESULTS, CREDIT = range(1, 9)
FOLLOWS, BATCH = 16, 32  # kind bits: the body is the next frame; a batch of bodies
MAX_HEADER = 4096
MARKER = re.compile(rb"\xffzf/sub/[0-9a-f]{16}\Z")
RAW_THRESHOLD = 64 * 1024  # large binary replies go out raw (enc: raw)
#: Section 7.2: an XPUB accepts subscription frames of at most 1 + 1024 + 64 bytes.
MAX_SUBSCRIPTION = 1089
#: Section 6.1: control messages are small.
MAX_CONTROL = 64 * 1024


def out(**fields: Any) -> None:
    print(json.dumps(fields, default=repr), flush=True)


class Refused(Exception):
    """A malformed message: answered with an error reply when it is a request (section 5.6)."""


def header(kind: int, msg_id: int, headers: dict[str, Any] | None = None) -> bytes:
    """A header frame (section 5.2): the body is the next frame."""
    fields: list[Any] = [VERSION, kind | FOLLOWS, msg_id, time.time()]
    if headers:
        fields.append(headers)
    return msgpack.packb(fields)


def one_frame(kind: int, msg_id: int, body: Any) -> bytes:
    """A one-frame message (section 5.1)."""
    return msgpack.packb([VERSION, kind, msg_id, time.time(), body])


def peek_id(frame: bytes) -> int:
    """Section 5.6: the id of a header that does not parse, from its first items, else 0."""
    unpacker = msgpack.Unpacker(max_buffer_size=64)
    unpacker.feed(frame[:64])
    try:
        if unpacker.read_array_header() >= 3:
            unpacker.skip()
            unpacker.skip()
            msg_id = unpacker.unpack()
            if type(msg_id) is int and 0 <= msg_id < 2**64:
                return msg_id
    except Exception:
        pass
    return 0


def parse_message(frames: list[bytes]) -> tuple[int, int, dict[str, Any], Any]:
    """(kind, msg_id, headers, body) of a version 2 message (section 5): one frame
    ``[2, kind, id, ts, body(, headers)]``, or a header frame ``[2, kind | 16, id, ts(,
    headers)]`` and a body frame. A batch (kind | 32) gives its list of bodies. Raises
    Refused."""
    if not frames or len(frames) > 2:
        raise Refused(f"a message is one or two frames, got {len(frames)}")
    first = frames[0]
    if len(frames) == 2 and len(first) > MAX_HEADER:
        raise Refused(f"header of {len(first)} bytes exceeds {MAX_HEADER}")
    try:
        fields = msgpack.unpackb(first, raw=False, strict_map_key=False)
    except Exception as exc:
        raise Refused(f"not msgpack: {exc}") from None
    if not isinstance(fields, list) or not 4 <= len(fields) <= 6:
        raise Refused("a message is an array of 4 to 6 items")
    version, kind, msg_id, stamp = fields[:4]
    if type(version) is not int or version != VERSION:
        raise Refused(f"unsupported protocol version {version!r}")
    flags = kind & (FOLLOWS | BATCH) if type(kind) is int else 0
    if type(kind) is not int or not REQUEST <= kind ^ flags <= CREDIT or flags == 48:
        raise Refused(f"unknown kind {kind!r}")
    if type(msg_id) is not int or not 0 <= msg_id < 2**64:
        raise Refused("bad message id")
    if type(stamp) not in (int, float):
        raise Refused("bad timestamp")
    follows = flags == FOLLOWS
    if follows != (len(frames) == 2) or len(fields) not in ((4, 5) if follows else (5, 6)):
        raise Refused("a header frame comes with one body frame; a message is 5 or 6 items")
    at = 4 if follows else 5
    headers = fields[at] if len(fields) > at and fields[at] is not None else {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) for k in headers):
        raise Refused("header map must have string keys")
    body = parse_body(frames[1], headers) if follows else fields[4]
    if flags == BATCH and not isinstance(body, list):
        raise Refused("a batch's body is an array")
    return kind ^ FOLLOWS if follows else kind, msg_id, headers, body


def parse_body(frame: bytes, headers: dict[str, Any]) -> Any:
    if headers.get("enc") == "raw":
        return frame
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise Refused(f"body is not msgpack: {exc}") from None


def port_of(sock: zmq.Socket) -> int:
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])


def endpoint_keys(endpoints: list[tuple[str, str, int]]) -> dict[str, str]:
    """Section 4.5: ``kind:name:port`` items joined by ";" in e0, e1... of at most 250 bytes,
    never splitting an item."""
    txt: dict[str, str] = {}
    chunk: list[str] = []
    for kind, name, port in endpoints:
        item = f"{kind}:{name}:{port}"
        if chunk and len(";".join([*chunk, item])) > MAX_TXT_VALUE:
            txt[f"e{len(txt)}"] = ";".join(chunk)
            chunk = []
        chunk.append(item)
    if chunk:
        txt[f"e{len(txt)}"] = ";".join(chunk)
    return txt


class PlainNode:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = args.name
        self.node_id = os.urandom(8).hex()
        self.started = time.monotonic()
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.auth: Any = None
        self.public = self.secret = b""
        if args.secure:  # section 3.2: every endpoint a CURVE server; clients checked by ZAP
            self.public, self.secret = zmq.curve_keypair()
            from zmq.auth.thread import ThreadAuthenticator  # pyzmq's ZAP handler

            allowed = {self.public.decode(), *args.allow}
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback("zmqfabric", _Allow(allowed))
        self.control = self._bind(zmq.ROUTER, MAX_CONTROL)
        self.service = self._bind(zmq.ROUTER)
        self.tasks = self._bind(zmq.ROUTER)
        self.stream = self._bind(zmq.XPUB, MAX_SUBSCRIPTION)
        self.pull = self._bind(zmq.PULL)
        self.endpoints = sorted([
            ("ctl", "control", port_of(self.control)),
            ("rep", args.service, port_of(self.service)),
            ("task", args.tasks, port_of(self.tasks)),
            ("pub", args.stream, port_of(self.stream)),
            ("pull", args.pipeline, port_of(self.pull)),
        ])
        self.host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip("-._")[:200]
        self.txt = {"v": "1", "id": self.node_id, "host": self.host or "localhost",
                    "pid": str(os.getpid()), "seq": "1", "fab": args.fabric,
                    **endpoint_keys(self.endpoints)}
        if args.secure:
            self.txt["ck"] = self.public.decode()
        self.inc = 0  # section 6.5: our incarnation, raised only to refute
        self.counters: dict[str, int] = {}
        self.ops: dict[str, int] = {}
        self.peers: dict[str, float] = {}  # names heard in hellos
        self.markers: set[bytes] = set()
        self.events = 0
        self.pulled: list[Any] = []
        # Section 7.4, per producer connection (ROUTER routing id): the window granted, tasks
        # held (delivered, no result sent yet), and what the test checks.
        self.window: dict[bytes, int] = {}
        self.held: dict[bytes, list[list[Any]]] = {}
        self.task_stats = {"credit_requests": 0, "unasked_credits": 0, "held_max": 0,
                           "beyond_window": 0, "ran": 0, "failed": 0}
        self.last_task_at = 0.0
        self.zc: Zeroconf | None = None
        self.info: ServiceInfo | None = None

    def _bind(self, kind: int, max_size: int = 1024 * 1024 + 64 * 1024) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_size)  # section 5.5
        if self.secret:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
            sock.setsockopt(zmq.ZAP_DOMAIN, b"zmqfabric")
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished caller: send fails, not blocks
        sock.bind(f"tcp://{ADDRESS}:0")
        self.sockets.append(sock)
        return sock

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # --- section 4: advertise, goodbye ------------------------------------------------------

    def advertise(self) -> None:
        self.zc = Zeroconf(interfaces=[ADDRESS], ip_version=IPVersion.V4Only)
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{self.name}@{self.node_id}.{SERVICE_TYPE}",
            port=port_of(self.control),  # the SRV port is the control endpoint's
            properties=self.txt,
            server=f"zf-{self.node_id}.local.",
            addresses=[socket.inet_aton(ADDRESS)],
            host_ttl=self.args.ttl,
            other_ttl=self.args.ttl,
        )
        # Instance names hold a fresh random id: no probing (section 4.7).
        self.zc.register_service(self.info, cooperating_responders=True)

    def goodbye(self) -> None:
        if self.zc is not None:
            if self.info is not None:
                self.zc.unregister_service(self.info)
            self.zc.close()
        for sock in self.sockets:
            sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        handlers = {self.control: self.on_control, self.service: self.on_service,
                    self.tasks: self.on_tasks, self.stream: self.on_subscription,
                    self.pull: self.on_pull}
        for sock in handlers:
            poller.register(sock, zmq.POLLIN)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        deadline = time.monotonic() + self.args.lifetime
        next_event = time.monotonic()
        while not stop and time.monotonic() < deadline:
            wait_ms = 10 if (self.markers or any(self.held.values())) else 100
            for sock, _ in poller.poll(wait_ms):
                for _ in range(64):  # bounded: the other sockets get their turn
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    handlers[sock](frames)
            self.flush_results(force=False)
            if self.markers and time.monotonic() >= next_event:
                next_event = time.monotonic() + 0.02
                self.publish()

    # --- section 6: the control endpoint ----------------------------------------------------

    def on_control(self, zframes: list[zmq.Frame]) -> None:
        frames = [f.bytes for f in zframes]
        peer_address = zframes[-1].get("Peer-Address")
        parsed = self.request(frames, "control")
        if parsed is None:
            return
        route, msg_id, body = parsed
        op = body.get("op") if isinstance(body, dict) else None
        self.ops[str(op)[:20]] = self.ops.get(str(op)[:20], 0) + 1
        if op == "hello":  # one-way: a hint, never answered (section 6.4)
            name = body.get("name")
            if isinstance(name, str) and len(self.peers) < 256:
                self.peers[name[:46]] = time.monotonic()
                out(event="hello", name=name, address=peer_address)
            return
        if op in ("peers", "probe-ack"):  # one-way (sections 6.4, 6.5)
            return
        if op in ("probe", "probe-req"):
            answer: Any = self.probe_answer(body)
        elif op in ("ping", "info", "stats", "record"):
            answer = self.control_answer(op)
        else:
            if msg_id:
                self.reply_error(self.control, route, msg_id, "UnknownOp",
                                 f"unknown control op {str(op)[:40]!r}")
            return
        if msg_id:  # id 0: one-way, never answered (section 6.1)
            self.reply(self.control, route, msg_id, answer)

    def control_answer(self, op: str) -> dict[str, Any]:
        """Section 6.3."""
        if op == "record":
            return {"name": self.name, "txt": self.txt}
        answer: dict[str, Any] = {"node": self.name, "id": self.node_id, "host": self.txt["host"],
                                  "pid": os.getpid(),
                                  "uptime_s": round(time.monotonic() - self.started, 3)}
        if op == "ping":
            return answer
        answer["address"] = ADDRESS
        answer["endpoints"] = [{"kind": k, "name": n, "port": p} for k, n, p in self.endpoints]
        if op == "info":
            answer["peers"] = sorted(self.peers)
            return answer
        answer["counters"] = dict(self.counters)
        answer["plain"] = {"subscribers": len(self.markers), "events": self.events,
                           "pulled": self.pulled[-100:], "tasks": dict(self.task_stats),
                           "ops": dict(self.ops), "incarnation": self.inc}
        return answer

    def probe_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """Section 6.5: answer at once; refute an accusation about us before answering. (A
        probe-req is answered like a probe; this node does not probe for others, which the
        document allows.)"""
        accused = -1
        to = body.get("to")
        if (isinstance(to, list) and len(to) == 3 and to[0] == self.node_id and to[2] is True
                and type(to[1]) is int):
            accused = to[1]
        gossip = body.get("g")
        for update in gossip if isinstance(gossip, list) and len(gossip) <= 32 else []:
            if (isinstance(update, list) and len(update) == 7 and update[1] == self.node_id
                    and type(update[0]) is int and type(update[2]) is int):
                kind, inc = update[0], update[2]
                if (kind == 0 and inc > self.inc) or (kind in (1, 2, 3) and inc >= self.inc):
                    accused = max(accused, inc)
        news = []
        if accused >= self.inc:
            self.inc = accused + 1
            self.count("refutations")
            news = [[0, self.node_id, self.inc, self.name, f"tcp://{ADDRESS}:{port_of(self.control)}",
                     None, ""]]
        answer = {"id": self.node_id, "name": self.name, "inc": self.inc,
                  "seq": int(self.txt["seq"]), "g": news}
        if body.get("op") == "probe" and body.get("rec") is True:
            answer["txt"] = self.txt
        return answer

    # --- section 7.1: request/reply ---------------------------------------------------------

    def request(self, frames: list[bytes], service: str) -> tuple[list[bytes], int, Any] | None:
        """(route, msg_id, body) of ``[route, "", header, body]``; a malformed request is
        refused with an error reply that repeats its id when readable (section 5.6)."""
        if len(frames) < 2 or frames[1]:
            self.count("refused_requests")  # no readable route: nothing to answer
            return None
        route, payload = frames[:2], frames[2:]
        try:
            kind, msg_id, headers, body = parse_message(payload)
            if kind != REQUEST:
                raise Refused(f"expected a request, got kind {kind}")
            named = headers.get("svc")
            if named is not None and named != service:
                raise Refused(f"request for service {str(named)[:64]!r} reached {service!r}")
            return route, msg_id, body
        except Refused as exc:
            self.count("refused_requests")
            self.reply_error(self.control if service == "control" else self.service, route,
                             peek_id(payload[0]) if payload else 0, "RemoteProtocolError",
                             str(exc))
            return None

    def on_service(self, zframes: list[zmq.Frame]) -> None:
        parsed = self.request([f.bytes for f in zframes], self.args.service)
        if parsed is None:
            return
        route, msg_id, body = parsed
        if body == "fail":
            self.reply_error(self.service, route, msg_id, "ValueError", "failure on request")
        elif isinstance(body, bytes) and len(body) >= RAW_THRESHOLD:
            self.reply(self.service, route, msg_id, body[::-1])  # goes out raw
        else:
            self.reply(self.service, route, msg_id, {"echo": body, "by": self.name})
        self.count("replies_sent")

    def reply(self, sock: zmq.Socket, route: list[bytes], msg_id: int, body: Any) -> None:
        if isinstance(body, bytes) and len(body) >= RAW_THRESHOLD:
            frames = [*route, header(REPLY, msg_id, {"enc": "raw"}), body]
        else:
            frames = [*route, one_frame(REPLY, msg_id, body)]
        self.send(sock, frames)

    def reply_error(self, sock: zmq.Socket, route: list[bytes], msg_id: int, kind: str,
                    message: str) -> None:
        self.send(sock, [*route, one_frame(
            ERROR, msg_id, {"type": kind, "message": message})])

    def send(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:  # the caller left, or its queue is full
            self.count("replies_undeliverable")

    # --- section 7.4: reliable tasks (a worker) ---------------------------------------------

    def on_tasks(self, zframes: list[zmq.Frame]) -> None:
        frames = [f.bytes for f in zframes]
        if len(frames) not in (3, 4) or frames[1]:
            self.count("refused_tasks")
            return
        route = frames[0]
        try:
            kind, _, _, body = parse_message(frames[2:])
        except Refused:
            self.count("refused_tasks")  # no error replies on a task connection
            return
        if kind == CREDIT:  # a producer opens (or reopens) its connection
            self.task_stats["credit_requests"] += 1
            self.grant(route, self.args.credit)
            return
        if kind != TASKS or not isinstance(body, list) or not body:
            self.count("refused_tasks")
            return
        if route not in self.window:  # tasks before credit: the default window
            self.window[route] = self.args.credit
        held = self.held.setdefault(route, [])
        if self.args.raise_credit and self.window[route] < self.args.raise_credit:
            # A worker may send credit unasked, at any time: it replaces the window.
            self.task_stats["unasked_credits"] += 1
            self.grant(route, self.args.raise_credit)
        for item in body:
            if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str)
                    and type(item[1]) is int):
                self.count("refused_tasks")
                continue
            if len(held) >= self.window[route]:
                self.task_stats["beyond_window"] += 1  # still run: the producer decides
            held.append(item)
        self.task_stats["held_max"] = max(self.task_stats["held_max"], len(held))
        self.last_task_at = time.monotonic()

    def grant(self, route: bytes, credit: int) -> None:
        self.window[route] = credit
        self.send(self.tasks, [route, b"", header(CREDIT, 0),
                               msgpack.packb({"credit": credit, "slots": 1})])

    def flush_results(self, force: bool) -> None:
        """Run what is held, one at a time in order (slots 1), and send the results: when a
        connection's window is full (nothing more can come) or after 30 ms without news."""
        quiet = time.monotonic() - self.last_task_at >= 0.03
        for route, held in self.held.items():
            if not held or not (force or quiet or len(held) >= self.window.get(route, 1)):
                continue
            results = [self.run_task(item) for item in held]
            held.clear()
            self.send(self.tasks, [route, b"", header(RESULTS, 0), msgpack.packb(results)])

    def run_task(self, item: list[Any]) -> list[Any]:
        task_id, attempt, payload, _key = item
        self.task_stats["ran"] += 1
        if isinstance(payload, dict) and payload.get("fail_first") and attempt == 1:
            self.task_stats["failed"] += 1
            return [task_id, attempt, False,
                    {"type": "ValueError", "message": "the first attempt fails"}]
        n = payload.get("n") if isinstance(payload, dict) else None
        return [task_id, attempt, True, {"n": n, "attempt": attempt, "by": self.name}]

    # --- section 7.2: publish/subscribe -----------------------------------------------------

    def on_subscription(self, zframes: list[zmq.Frame]) -> None:
        data = zframes[0].bytes
        if len(zframes) != 1 or not data or data[0] > 1:
            self.count("refused_subscriptions")
            return
        topic = data[1:]
        if not topic.startswith(b"\xffzf/sub/"):
            return  # a topic filter: the XPUB applies it
        if data[0] == 0:
            self.markers.discard(topic)  # the subscriber left
        elif MARKER.match(topic) and len(self.markers) < 65536:
            self.markers.add(topic)  # its topics before it are applied
        else:
            self.count("refused_subscriptions")
            return
        out(event="subscribers", count=len(self.markers))

    def publish(self) -> None:
        n = self.events
        # Section 7.2: one frame, the topic and NUL first (ZeroMQ filters on the first bytes).
        self.stream.send(b"t.tick\x00" + one_frame(EVENT, n, {"n": n}))
        self.stream.send(b"u.other\x00" + one_frame(EVENT, n + 1, {"n": n}))
        self.stream.send_multipart([b"t.raw\x00" + header(EVENT, n + 2, {"enc": "raw"}),
                                    bytes([n % 256]) * 3])
        self.events += 3
        self.count("events_sent", 3)

    # --- section 7.3: push/pull -------------------------------------------------------------

    def on_pull(self, zframes: list[zmq.Frame]) -> None:
        frames = [f.bytes for f in zframes]
        try:
            kind, _, _, body = parse_message(frames)
            if kind not in (MESSAGE, MESSAGE | BATCH):
                raise Refused(f"expected a message, got kind {kind}")
        except Refused:
            self.count("refused_messages")
            return
        for item in body if kind & BATCH else [body]:
            if len(self.pulled) < 1000:
                self.pulled.append(item)


class _Allow:
    """ZAP for CURVE: a client's public key (Z85) must be in the allow-list."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key.decode("ascii", "replace") in self.allowed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--fabric", default="default")
    parser.add_argument("--credit", type=int, default=2)
    parser.add_argument("--raise-credit", type=int, default=0)
    parser.add_argument("--ttl", type=int, default=15)
    parser.add_argument("--lifetime", type=float, default=120.0)
    parser.add_argument("--secure", action="store_true", help="CURVE keys of its own")
    parser.add_argument("--allow", action="append", default=[], help="a client's public key")
    node = PlainNode(parser.parse_args())
    try:
        node.advertise()
        print("READY", json.dumps({"id": node.node_id, "txt": node.txt,
                                   "zmqfabric": "zmqfabric" in sys.modules
                                   and sys.modules["zmqfabric"] is not None}), flush=True)
        node.run()
    finally:
        node.goodbye()
    out(event="done")


if __name__ == "__main__":
    main()
