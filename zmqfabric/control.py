"""The control endpoint every node answers on: ``ping``, ``info`` and ``stats``.

Served by a node-owned thread that owns only the control socket (sync, even on an asyncio node),
so a node answers pings whether or not its user runs a serve loop. Requests use the ordinary
request/reply wire format with body ``{"op": "ping" | "info" | "stats"}``.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from typing import Any, Callable

import zmq

from .config import peer_url
from .constants import (
    CONTROL_TIMEOUT_S,
    HELLO_LINGER_MS,
    LIVENESS_TICK_MS,
    MAX_SHARED,
    SEED_RETRY_S,
    THREAD_JOIN_TIMEOUT_S,
)
from .core import wire
from .core.records import EndpointKind, NodeRecord, address_in_scope, encode_txt
from .discovery.liveness import PeerWatch
from .errors import (
    FabricError,
    FabricTimeoutError,
    LocalProtocolError,
    NodeNotFoundError,
    RemoteError,
    RemoteProtocolError,
)
from .patterns.reqrep import ServiceEndpoint
from .runtime import NodeRuntime, host_name
from .security.keys import is_public_key
from .stats import RateLimitedLog

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)
_TCP_URL = re.compile(r"tcp://[0-9.]{7,15}:[0-9]{1,5}\Z")
OPS = ("ping", "info", "stats")


class ControlEndpoint(ServiceEndpoint):
    kind = EndpointKind.CONTROL
    noun = "control endpoint"
    sync_socket = True

    def __init__(self, runtime: NodeRuntime, handler: Any) -> None:
        self.fixed_port = runtime.config.control_port
        super().__init__(runtime, "control", handler)


class ControlServer:
    """Owns the control endpoint and the thread that serves it. ``stop()`` is idempotent.

    ``accept_hello(body, peer_address)`` takes a peer's introduction (membership's).
    """

    def __init__(
        self, runtime: NodeRuntime, accept_hello: Callable[[dict[str, Any], str | None], None]
    ) -> None:
        node = self._node = runtime
        self._accept_hello = accept_hello
        self._endpoint = ControlEndpoint(runtime, self._answer)
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_r, False)
        os.set_blocking(self._stop_w, False)
        self._stopping = False
        self._commands: collections.deque[tuple[str, Any]] = collections.deque()
        self._seeds = [peer_url(peer) for peer in node.config.peers]  # (url, CURVE key)
        self._next_seeding = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"zmqfabric-control-{node.name}", daemon=False
        )

    @property
    def port(self) -> int:
        return self._endpoint.port

    def start(self) -> None:
        self._thread.start()

    def introduce(self, url: str, key: str | None = None) -> None:
        """Send our record to the control endpoint at ``url`` (thread-safe, returns at once).

        mDNS answers a newcomer's query after 20-120 ms, or a second after our last announcement;
        introducing ourselves over ZeroMQ when we see a newcomer makes mutual discovery take
        milliseconds. The newcomer validates the record like any other (see ``hello``)."""
        self._post("introduce", (url, key))

    def watch(self, record: NodeRecord) -> None:
        """Start watching a peer's liveness (thread-safe)."""
        self._post("watch", record)

    def greet(self, record: NodeRecord) -> None:
        """Introduce ourselves to a peer over its watch connection (thread-safe)."""
        self._post("greet", record)

    def unwatch(self, record: NodeRecord) -> None:
        """Stop watching a peer that left cleanly (thread-safe)."""
        self._post("unwatch", record)

    def share(self, record: NodeRecord) -> None:
        """Send the control URLs of every node we know to ``record``'s node (thread-safe), so
        that nodes seeded across subnets learn each other."""
        self._post("share", record)

    def _post(self, op: str, arg: Any) -> None:
        if self._stop_w < 0 or self._stopping:
            return
        self._commands.append((op, arg))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._stop_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def stop(self) -> None:
        if self._stop_w < 0:
            return
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(THREAD_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("control thread of %s did not stop within %s s",
                          self._node.name, THREAD_JOIN_TIMEOUT_S)
        self._endpoint.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_r = self._stop_w = -1

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._endpoint.socket, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        peers = PeerWatch(self._node, poller)
        try:
            while not self._stopping:
                events = dict(poller.poll(LIVENESS_TICK_MS))
                if self._stop_r in events:
                    _drain(self._stop_r)
                try:
                    self._step(events, peers)
                except Exception:  # a bug here must not silence the node's control endpoint
                    self._node.counters.add("control_errors")
                    _rlog.exception("control", "%s: error in the control thread", self._node.name)
        finally:
            peers.close()

    def _step(self, events: dict[Any, int], peers: PeerWatch) -> None:
        self._run_commands(peers)
        if self._endpoint.socket in events:
            self._serve_one()
        for sock in events:
            if isinstance(sock, zmq.Socket) and sock is not self._endpoint.socket:
                peers.on_monitor(sock)
        peers.tick()

    def _run_commands(self, peers: PeerWatch) -> None:
        while self._commands:
            op, arg = self._commands.popleft()
            if op == "introduce":
                self._send_hello(*arg)
            elif op == "greet":
                # Over the peer's watch connection: delivered whenever it comes up.
                if not self._node.advertised:
                    continue
                if not peers.send(arg.name, self._frames(self._hello())):
                    self._send_hello(arg.url(arg.control), arg.curve_key)
            elif op == "watch":
                peers.watch(arg)
            elif op == "unwatch":
                peers.unwatch(arg.name, arg.node_id)
            elif op == "share" and arg.control is not None:
                known = [
                    [r.url(r.control), r.curve_key]
                    for r in self._node.directory.records()
                    if r.control
                ]
                body = {"op": "peers", "peers": known[:MAX_SHARED]}
                self._send_oneway(arg.url(arg.control), arg.curve_key, body)
        if self._seeds and time.monotonic() >= self._next_seeding:
            self._introduce_to_seeds()

    def _introduce_to_seeds(self) -> None:
        """Say hello to every seed peer we do not know yet; again every SEED_RETRY_S."""
        self._next_seeding = time.monotonic() + SEED_RETRY_S
        known = {r.url(r.control) for r in self._node.directory.records() if r.control}
        for url, key in self._seeds:
            if url not in known:
                self._send_hello(url, key)

    def _hello(self) -> dict[str, Any]:
        record = self._node.record
        return {"op": "hello", "name": record.name, "txt": encode_txt(record)}

    @staticmethod
    def _frames(body: dict[str, Any]) -> list[bytes]:
        header = wire.pack_header(wire.Kind.REQUEST, 0, time.time())
        return [b"", header, wire.pack_body(body)]

    def _send_hello(self, url: str, key: str | None) -> None:
        if self._node.advertised:
            self._send_oneway(url, key, self._hello())

    def _send_oneway(self, url: str, key: str | None, body: dict[str, Any]) -> None:
        """Send a one-way control message (hello, peers) from a short-lived socket."""
        sock = self._node.sockets.socket(zmq.DEALER, sync=True)
        sock.setsockopt(zmq.IMMEDIATE, 0)  # queue now, deliver while the socket lingers
        try:
            self._node.sockets.connect(sock, url, key)
            sock.send_multipart(self._frames(body), zmq.NOBLOCK)
        except (zmq.ZMQError, FabricError) as exc:
            log.debug("cannot send %s to %s: %s", body.get("op"), url, exc)
        finally:
            sock.close(HELLO_LINGER_MS)

    def _serve_one(self) -> None:
        try:
            zframes = self._endpoint.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        parsed = self._endpoint.parse([f.bytes for f in zframes])
        if parsed is None:
            return
        route, header, body = parsed
        op = body.get("op") if isinstance(body, dict) else None
        if op == "hello":
            self._accept_hello(body, zframes[-1].get("Peer-Address"))
            return  # introductions are one-way: no reply
        if op == "peers":
            self._accept_peers(body.get("peers"))
            return
        try:
            result = self._answer(op)
        except LocalProtocolError as exc:
            self._endpoint.reply_error(route, header.msg_id, exc)
        else:
            self._endpoint.reply(route, header.msg_id, result)

    def _accept_peers(self, peers: object) -> None:
        """Introduce ourselves to shared control URLs we do not know. Only URLs: a node enters
        our directory only through its own hello or mDNS record, never on another's word."""
        if not isinstance(peers, list) or len(peers) > MAX_SHARED:
            self._node.counters.add("refused_peer_lists")
            return
        known = {r.url(r.control) for r in self._node.directory.records() if r.control}
        seeded = bool(self._node.config.peers)
        for item in peers:
            if not (isinstance(item, list) and len(item) == 2):
                continue
            url, key = item
            if (
                isinstance(url, str)
                and url not in known
                and _TCP_URL.match(url)
                and (key is None or (isinstance(key, str) and is_public_key(key)))
                and (seeded or self._in_scope(url))
            ):
                self._send_hello(url, key)

    def _in_scope(self, url: str) -> bool:
        """A node of this host's scope only greets loopback addresses: a peer list must not make
        it reach out to other hosts. LAN nodes greet the other subnets their peers know."""
        if not self._node.config.scope.is_local:
            return True
        host = url[len("tcp://"):].rsplit(":", 1)[0]
        try:
            return address_in_scope(host, self._node.config.scope.networks)
        except ValueError:
            return False

    def _answer(self, op: object) -> Any:
        if op not in OPS:
            raise LocalProtocolError(f"unknown control op {op!r}; expected one of {', '.join(OPS)}")
        return control_answer(self._node, str(op))


def control_answer(runtime: NodeRuntime, op: str) -> dict[str, Any]:
    """The answer to control op ``op`` (the control thread: reads only thread-safe state)."""
    base: dict[str, Any] = {
        "node": runtime.name,
        "id": runtime.node_id,
        "host": host_name(),
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - runtime.started_at, 3),
    }
    if op == "ping":
        return base
    record = runtime.record
    base["address"] = record.address
    base["endpoints"] = [
        {"kind": ep.kind.value, "name": ep.name, "port": ep.port} for ep in record.endpoints
    ]
    if op == "info":
        base["peers"] = [r.name for r in runtime.directory.records()]
        return base
    base["counters"] = runtime.counters.snapshot()
    base.update(runtime.stats_sections())
    return base


def control_call(node: NodeRuntime, target: str, op: str, timeout: float = CONTROL_TIMEOUT_S) -> Any:
    """Ask node ``target``'s control endpoint ``op`` from a fresh socket (any thread).

    Raises NodeNotFoundError, FabricTimeoutError, RemoteError.
    """
    if not node.directory.wait_for(lambda: node.directory.get(target) is not None, timeout):
        raise NodeNotFoundError(target, timeout)
    record = node.directory.get(target)
    endpoint = record.control if record else None
    if record is None or endpoint is None:
        raise NodeNotFoundError(target, timeout)
    sock = node.sockets.socket(zmq.DEALER, sync=True)
    try:
        node.sockets.connect(sock, record.url(endpoint), record.curve_key)
        msg_id = int(time.monotonic_ns() & 0xFFFFFFFF)
        header = wire.pack_header(wire.Kind.REQUEST, msg_id, time.time())
        sock.send_multipart([b"", header, wire.pack_body({"op": op})])
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            try:
                reply_header, body = wire.parse_reply(sock.recv_multipart())
            except RemoteProtocolError:
                continue
            if reply_header.msg_id != msg_id:
                continue
            if reply_header.kind is wire.Kind.ERROR:
                raise RemoteError(f"{target}/control", body["type"], body["message"], target)
            return body
        raise FabricTimeoutError(f"node {target!r} did not answer {op} within {timeout:g} s",
                                 timeout=timeout)
    finally:
        sock.close(0)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass
