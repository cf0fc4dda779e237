"""The control endpoint every node answers on: ``ping``, ``info`` and ``stats``.

Served by the control thread, a node-owned thread that owns the control socket and nothing else
(sync, even on an asyncio node), so a node answers pings whether or not its user runs a serve
loop. Requests use the ordinary request/reply wire format with body
``{"op": "ping" | "info" | "stats"}``.

The same socket receives the one-way gossip messages of membership (``hello``, ``peers``; see
:mod:`zmqfabric.discovery.gossip`), which the control thread hands on without answering: hellos to
``Membership.accept_hello`` (validated there, in this thread), peer lists to the housekeeping
thread. Liveness and gossip run in that thread (:mod:`zmqfabric.discovery.housekeeping`); the
liveness ops (``probe``, ``probe-req``, ``probe-ack``; :mod:`zmqfabric.discovery.swim`) are
answered here by its ``answer_probe``, which never blocks.

:func:`control_call` is the client side: any thread, one fresh socket per call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import zmq

from .constants import CONTROL_TIMEOUT_S, THREAD_JOIN_TIMEOUT_S
from .core import wire
from .core.records import EndpointKind
from .discovery.swim import OPS as PROBE_OPS
from .errors import (
    FabricTimeoutError,
    LocalProtocolError,
    NodeNotFoundError,
    RemoteError,
    RemoteProtocolError,
)
from .patterns.reqrep import ServiceEndpoint
from .runtime import NodeRuntime, host_name
from .stats import RateLimitedLog
from .transport.inbox import Inbox

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)
OPS = ("ping", "info", "stats")


class ControlEndpoint(ServiceEndpoint):
    kind = EndpointKind.CONTROL
    noun = "control endpoint"
    sync_socket = True

    def __init__(self, runtime: NodeRuntime, handler: Any) -> None:
        self.fixed_port = runtime.config.control_port
        super().__init__(runtime, "control", handler)


class ControlServer:
    """Owns the control endpoint and the control thread that serves it.

    The constructor binds the endpoint; ``start()`` starts the thread; ``stop()`` (idempotent,
    any thread) stops and joins it and closes the endpoint. ``on_hello(body, peer_address)``
    takes a peer's introduction and ``on_peers(peers)`` a peer's list of control URLs;
    ``on_probe(body, peer_address, peer_key)`` answers a liveness op (the reply body, or None:
    no reply). All are called in the control thread and must not block it.
    """

    def __init__(
        self,
        runtime: NodeRuntime,
        on_hello: Callable[[dict[str, Any], str | None], None],
        on_peers: Callable[[object], None],
        on_probe: Callable[[dict[str, Any], str | None, str | None], dict[str, Any] | None],
    ) -> None:
        self._node = runtime
        self._on_hello = on_hello
        self._on_peers = on_peers
        self._on_probe = on_probe
        self._endpoint = ControlEndpoint(runtime, self._answer)
        #: Nothing is posted here: the inbox only wakes the thread to stop.
        self._inbox = Inbox()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"zmqfabric-control-{runtime.name}", daemon=False
        )

    @property
    def port(self) -> int:
        return self._endpoint.port

    def start(self) -> None:
        self._inbox.open()
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the endpoint. Idempotent; also if never started."""
        if self._stopping:
            return
        self._stopping = True
        self._inbox.wake()
        if self._thread.is_alive():
            self._thread.join(THREAD_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("control thread of %s did not stop within %s s",
                          self._node.name, THREAD_JOIN_TIMEOUT_S)
        self._endpoint.close()
        self._inbox.close()

    def _run(self) -> None:
        sock, inbox = self._endpoint.socket, self._inbox
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(inbox.fd, zmq.POLLIN)
        while not self._stopping:
            if sock in inbox.poll(poller, None):
                try:
                    self._serve_one()
                except Exception:  # a bug here must not silence the node's control endpoint
                    self._node.counters.add("control_errors")
                    _rlog.exception("control", "%s: error in the control thread",
                                    self._node.name)

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
            address = zframes[-1].get("Peer-Address")
            self._on_hello(body, address if isinstance(address, str) else None)
            return  # introductions are one-way: no reply
        if op == "peers":
            self._on_peers(body.get("peers"))
            return
        if op in PROBE_OPS:
            last = zframes[-1]
            key = _property(last, "User-Id") if self._node.config.keys is not None else None
            answer = self._on_probe(body, _property(last, "Peer-Address"), key or None)
            if answer is not None and header.msg_id:  # id 0: one-way, no reply
                self._endpoint.reply(route, header.msg_id, answer)
            return
        try:
            result = self._answer(op)
        except LocalProtocolError as exc:
            self._endpoint.reply_error(route, header.msg_id, exc)
        else:
            self._endpoint.reply(route, header.msg_id, result)

    def _answer(self, op: object) -> Any:
        if op not in OPS:
            raise LocalProtocolError(f"unknown control op {op!r}; expected one of {', '.join(OPS)}")
        return control_answer(self._node, str(op))


def _property(frame: zmq.Frame, name: str) -> str | None:
    """A message property (``Peer-Address``; ``User-Id``: the client's key on a CURVE socket)."""
    try:
        value = frame.get(name)
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) else None


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


def control_call(
    node: NodeRuntime, target: str, op: str, timeout: float = CONTROL_TIMEOUT_S
) -> Any:
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

