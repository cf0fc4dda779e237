"""The control endpoint every node answers on: ``ping``, ``info``, ``stats`` and ``record``.

Served by the control thread, a node-owned thread that owns the control socket and nothing else
(sync, even on an asyncio node), so a node answers pings whether or not its user runs a serve
loop. Requests use the ordinary request/reply wire format with body
``{"op": "ping" | "info" | "stats" | "record"}`` (header map ``{"svc": "control"}`` optional).
``record`` answers ``{"name": str, "txt": {str: str}}``: the node's own discovery record as its
TXT map (:mod:`zmqfabric.core.records`), what peers verify every discovery hint against
(:mod:`zmqfabric.discovery.verify`); its address is the one the question was sent to. Messages
are at most MAX_CONTROL_MESSAGE bytes in all.

The same socket receives the one-way gossip messages of membership (``hello``, ``peers``; see
:mod:`zmqfabric.discovery.gossip`), which the control thread hands on without answering: hellos to
``Membership.accept_hello`` (validated there, in this thread), peer lists to the housekeeping
thread. Liveness and gossip run in that thread (:mod:`zmqfabric.discovery.housekeeping`); the
liveness ops (``probe``, ``probe-req``, ``probe-ack``; :mod:`zmqfabric.discovery.swim`) are
answered here by its ``answer_probe``, which never blocks.

The client side, asking another node, is :mod:`zmqfabric.calls`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any, Callable

import zmq

from .constants import (
    CONTROL_BATCH,
    CONTROL_HEARTBEAT_IVL_MS,
    MAX_CONTROL_MESSAGE,
    THREAD_JOIN_TIMEOUT_S,
    VERIFY_TIMEOUT_MAX_S,
)
from .core.records import EndpointKind, NodeRecord, encode_txt
from .discovery.hints import on_loopback
from .discovery.swim import OPS as PROBE_OPS
from .errors import (
    LocalProtocolError,
)
from .patterns.service import ServiceEndpoint
from .runtime import NodeRuntime, host_name
from .stats import RateLimitedLog
from .transport.frames import NOBLOCK, crecv
from .transport.inbox import Inbox

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)
OPS = ("ping", "info", "stats", "record")


class ControlEndpoint(ServiceEndpoint):
    """The control socket, served by the control thread. Its traffic has counters of its own:
    a monitor's pings are not service traffic (``replies_sent`` counts services only)."""

    kind = EndpointKind.CONTROL
    noun = "control endpoint"
    sync_socket = True
    counter_sent = "control_replies_sent"
    counter_failed = "control_op_errors"
    counter_undeliverable = "control_replies_undeliverable"
    #: Control messages are small: a peer that sends a bigger frame is disconnected unread.
    max_message_size = MAX_CONTROL_MESSAGE
    #: Peers keep liveness connections here: ping them seldom (each ping wakes two IO threads).
    heartbeat_ivl_ms = CONTROL_HEARTBEAT_IVL_MS

    def __init__(self, runtime: NodeRuntime, handler: Any) -> None:
        self.fixed_port = runtime.config.control_port
        super().__init__(runtime, "control", handler)


class ControlServer:
    """Owns the control endpoint and the control thread that serves it.

    The constructor binds the endpoint; ``start()`` starts the thread; ``stop()`` (idempotent,
    any thread) stops and joins it and closes the endpoint. ``on_hello(body, peer_address,
    peer_key, verifying)`` takes a peer's introduction (a hello, or with ``verifying`` the
    ``me`` of a ``record`` call: the peer is verifying our record) and
    ``on_peers(peers)`` a peer's list of control URLs;
    ``on_probe(body, peer_address, peer_key, one_way)`` answers a liveness op (the reply body,
    or None: no reply; ``one_way``: the message wants none). All are called in the control
    thread and must not block it.
    """

    def __init__(
        self,
        runtime: NodeRuntime,
        on_hello: Callable[[dict[str, Any], str | None, str | None, bool], None],
        on_peers: Callable[[object], None],
        on_probe: Callable[[dict[str, Any], str | None, str | None, bool],
                           dict[str, Any] | None],
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
                # What is queued is served without polling again in between (a death storm
                # queues gossip here faster than a loaded host serves it), boundedly.
                for _ in range(CONTROL_BATCH):
                    try:
                        if not self._serve_one() or self._stopping:
                            break
                    except Exception:  # a bug here must not silence the node's control endpoint
                        self._node.counters.add("control_errors")
                        _rlog.exception("control", "%s: error in the control thread",
                                        self._node.name)

    def _serve_one(self) -> bool:
        """Serve one message; False if none was waiting."""
        zframes = _recv_bounded(self._endpoint.socket)
        if zframes is None:
            return False
        if not zframes:
            return True  # an oversized message, dropped
        parsed = self._endpoint.parse([f.bytes for f in zframes])
        if parsed is None:
            return True
        route, header, body = parsed
        op = body.get("op") if isinstance(body, dict) else None
        last = zframes[-1]
        key = _property(last, "User-Id") if self._node.config.keys is not None else None
        if op == "hello":
            self._node.counters.add("hellos_received")
            self._on_hello(body, _property(last, "Peer-Address"), key or None, False)
            return True  # introductions are one-way: no reply
        if op == "peers":
            self._on_peers(body.get("peers"))
            return True
        if op in PROBE_OPS:
            # id 0: one-way (gossip pushed to us), no reply: none is built
            answer = self._on_probe(body, _property(last, "Peer-Address"), key or None,
                                    not header.msg_id)
            if answer is not None and header.msg_id:
                self._endpoint.reply(route, header.msg_id, answer)
            return True
        if op == "record" and _given_up(header.timestamp, _property(last, "Peer-Address")):
            self._node.counters.add("stale_calls")  # its caller has given up: no answer, no work
            return True
        try:
            result = self._answer(op)
        except LocalProtocolError as exc:
            self._endpoint.reply_error(route, header.msg_id, exc)
        else:
            self._endpoint.reply(route, header.msg_id, result)
            if op == "record" and isinstance(body.get("me"), dict):  # a verifier introduces itself
                self._on_hello(body["me"], _property(last, "Peer-Address"), key or None, True)
        return True

    def _answer(self, op: object) -> Any:
        if op not in OPS:
            raise LocalProtocolError(f"unknown control op {op!r}; expected one of {', '.join(OPS)}")
        return control_answer(self._node, str(op))


def _given_up(sent: float, peer: str | None) -> bool:
    """A verification call that waited here longer than any verifier waits (VERIFY_TIMEOUT_MAX_S),
    from this host (its clock is ours): under load, answering calls whose callers have moved on
    kept a starting node from ever catching up."""
    return (sent > 0 and time.time() - sent > VERIFY_TIMEOUT_MAX_S and peer is not None
            and on_loopback(peer))


def _recv_bounded(sock: zmq.Socket) -> list[zmq.Frame] | None:
    """One control message (frames kept for their Peer-Address); None: nothing there; ``[]``:
    a message of more than MAX_CONTROL_MESSAGE bytes in all, read to its end and dropped (each
    frame is bounded by the socket's MAXMSGSIZE, the whole message here).
    C-level receives (:data:`~.transport.frames.crecv`): pyzmq's Python wrapper costs a few
    microseconds a frame, on every message of the liveness hot path."""
    try:
        frame = crecv(sock, NOBLOCK, False)
    except zmq.Again:
        return None
    frames = [frame]
    total = len(frame)
    while frame.more:
        frame = crecv(sock, NOBLOCK, False)
        total += len(frame)
        frames.append(frame)
        if total > MAX_CONTROL_MESSAGE:
            while frame.more:
                frame = crecv(sock, NOBLOCK, False)
            _rlog.warning("oversized", "dropped a control message of more than %d bytes",
                          MAX_CONTROL_MESSAGE)
            return []
    return frames


def _property(frame: zmq.Frame, name: str) -> str | None:
    """A message property (``Peer-Address``; ``User-Id``: the client's key on a CURVE socket)."""
    try:
        value = frame.get(name)
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) else None


def control_answer(runtime: NodeRuntime, op: str) -> dict[str, Any]:
    """The answer to control op ``op`` (the control thread: reads only thread-safe state)."""
    if op == "record":
        # What peers verify a discovery hint against: this node's own word, over a connection
        # that CURVE authenticated with the key the hint names (zmqfabric.discovery.verify).
        # Asked twice per join at every node (the newcomer asks each): encoded once per version.
        own = runtime.record
        return {"name": own.name, "txt": _own_txt(own)}
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


@functools.lru_cache(maxsize=4)
def _own_txt(record: NodeRecord) -> dict[str, str]:
    """``record``'s TXT map (a node's own record changes seldom: its latest few are kept). The
    map is shared: callers only pack it."""
    return encode_txt(record)
