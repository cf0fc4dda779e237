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

:func:`control_call` (blocking, any thread) and :func:`control_call_async` (a coroutine) are
the client side: one plan (see :mod:`zmqfabric.patterns.plan`), one fresh socket per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from .constants import (
    CONTROL_HEARTBEAT_IVL_MS,
    CONTROL_TIMEOUT_S,
    MAX_CONTROL_MESSAGE,
    THREAD_JOIN_TIMEOUT_S,
)
from .core import wire
from .core.records import EndpointKind, NodeRecord, encode_txt
from .discovery.swim import OPS as PROBE_OPS
from .errors import (
    AuthorizationError,
    ClosedError,
    FabricTimeoutError,
    LocalProtocolError,
    NodeNotFoundError,
    RemoteError,
    RemoteProtocolError,
)
from .patterns.plan import AWAITING, BLOCKING, POLL, WAIT_DIRECTORY, Plan, drive, drive_async
from .patterns.service import ServiceEndpoint
from .runtime import NodeRuntime, host_name
from .stats import RateLimitedLog
from .transport.frames import NOBLOCK, deadline_after, ms_left, recv_frames, send_frames
from .transport.inbox import Inbox
from .transport.sockets import translate_zmq_errors

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
        zframes = _recv_bounded(self._endpoint.socket)
        if zframes is None:
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


def _recv_bounded(sock: zmq.Socket) -> list[zmq.Frame] | None:
    """One control message (frames kept for their Peer-Address), or None: nothing there, or a
    message of more than MAX_CONTROL_MESSAGE bytes in all, read to its end and dropped (each
    frame is bounded by the socket's MAXMSGSIZE, the whole message here)."""
    try:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames = [frame]
    total = len(frame.buffer)
    while frame.more:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        total += len(frame.buffer)
        frames.append(frame)
        if total > MAX_CONTROL_MESSAGE:
            while frame.more:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            _rlog.warning("oversized", "dropped a control message of more than %d bytes",
                          MAX_CONTROL_MESSAGE)
            return None
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
    base: dict[str, Any] = {
        "node": runtime.name,
        "id": runtime.node_id,
        "host": host_name(),
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - runtime.started_at, 3),
    }
    if op == "ping":
        return base
    if op == "record":
        # What peers verify a discovery hint against: this node's own word, over a connection
        # that CURVE authenticated with the key the hint names (zmqfabric.discovery.verify).
        own = runtime.record
        return {"name": own.name, "txt": encode_txt(own)}
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


#: Connection events a control call watches: a refused handshake ends it at once.
_CALL_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def control_call(
    runtime: NodeRuntime, target: str, op: str, timeout: float = CONTROL_TIMEOUT_S
) -> Any:
    """Ask node ``target``'s control endpoint ``op`` from a fresh socket; any thread, blocking
    it at most ``timeout`` s, whatever the peer does. Raises NodeNotFoundError,
    FabricTimeoutError, AuthorizationError (the peer refused our key), RemoteError,
    ClosedError (the node closed meanwhile)."""
    return drive(_call(runtime, target, op, timeout), BLOCKING)


async def control_call_async(
    runtime: NodeRuntime, target: str, op: str, timeout: float = CONTROL_TIMEOUT_S
) -> Any:
    """Coroutine of :func:`control_call` (the same plan, awaited): never blocks the loop. The
    call is one of the node's open things while it runs: closing the node (in this loop) ends
    it at once with ClosedError, and closes its sockets before the context terminates."""
    call = asyncio.ensure_future(drive_async(_call(runtime, target, op, timeout), AWAITING))
    closer = _Canceller(call)
    runtime.track(closer)
    try:
        return await call
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if closer.closed and task is not None and not task.cancelling():
            raise ClosedError(f"node {runtime.name!r} closed during a control call") from None
        raise
    finally:
        runtime.untrack(closer)


class _Canceller:
    """What the node closes of a control call in flight (see ``control_call_async``)."""

    def __init__(self, call: asyncio.Future[Any]) -> None:
        self.call = call
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.call.cancel()


def find_node(runtime: NodeRuntime, name: str, timeout: float | None) -> Plan[NodeRecord]:
    """The plan of waiting for node ``name`` to be listed (verified). A node whose control
    endpoint refused our key is never listed, only refused: that ends the wait at once with
    AuthorizationError. One advertised but not answering for its record ends it at the timeout
    with FabricTimeoutError, one never seen with NodeNotFoundError."""
    directory = runtime.directory
    deadline = deadline_after(timeout)
    while (record := directory.get(name)) is None:
        refusal = runtime.refusal_of(name)
        if refusal is not None and "refused our key" in refusal:
            raise AuthorizationError("control endpoint", name, [name])
        if ms_left(deadline) == 0:
            if refusal is not None or runtime.verifying(name):
                why = f" ({refusal})" if refusal else ""
                raise FabricTimeoutError(
                    f"node {name!r} is advertised but did not answer for its record within "
                    f"{timeout:g} s{why}", timeout=timeout)
            raise NodeNotFoundError(name, timeout)
        step = time.monotonic() + REFUSAL_CHECK_S
        until = step if deadline is None else min(step, deadline)
        yield WAIT_DIRECTORY, (directory, lambda: directory.get(name) is not None, until)
    return record


def _call(runtime: NodeRuntime, target: str, op: str, timeout: float) -> Plan[Any]:
    """The plan of a control call. The request is sent without blocking once the connection
    is up (the socket's IMMEDIATE option holds it back before: a peer that accepts TCP and never
    speaks ZeroMQ must not hang us); the socket's monitor reports a refused handshake."""
    deadline = deadline_after(timeout)
    record = yield from find_node(runtime, target, timeout)
    endpoint = record.control
    if endpoint is None:
        raise NodeNotFoundError(target, timeout)
    secured = runtime.config.keys is not None or record.curve_key is not None
    msg_id = int(time.monotonic_ns() & 0xFFFFFFFF)
    request: list[bytes] | None = [
        b"", wire.pack_header(wire.Kind.REQUEST, msg_id, time.time()), wire.pack_body({"op": op})
    ]
    sock = runtime.sockets.socket(zmq.DEALER, sync=True)
    monitor = runtime.sockets.monitor(sock, _CALL_EVENTS, sync=True)
    try:
        with translate_zmq_errors(f"ask node {target!r} for {op}"):
            runtime.sockets.connect(sock, record.url(endpoint), record.curve_key)
            while True:
                if request is not None and _sent(sock, request):
                    request = None
                if _refused(monitor, secured):
                    raise AuthorizationError("control endpoint", target, [target])
                if request is None and (answer := _answer(sock, msg_id, target)) is not None:
                    return answer[0]
                if ms_left(deadline) == 0:
                    raise FabricTimeoutError(
                        f"node {target!r} did not answer {op} within {timeout:g} s",
                        timeout=timeout)
                mask = zmq.POLLOUT if request is not None else zmq.POLLIN
                yield POLL, ([(sock, mask), (monitor, zmq.POLLIN)], deadline)
    finally:
        with contextlib.suppress(zmq.ZMQError):  # the node's context may be terminating
            sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


#: While it waits for a node to be listed, a control call looks this often (s) whether the node
#: was refused for refusing our key.
REFUSAL_CHECK_S = 0.05


def _sent(sock: zmq.Socket, frames: list[bytes]) -> bool:
    """Send without blocking; False while the connection is not up."""
    try:
        send_frames(sock, frames, NOBLOCK)
    except zmq.Again:
        return False
    return True


def _refused(monitor: zmq.Socket, secured: bool) -> bool:
    """Whether the peer refused our handshake (read from the events queued; never waits). Any
    failed handshake with a secured peer means our key (or theirs) is not accepted; a plain peer
    that fails one is retried by ZeroMQ until the call times out."""
    while True:
        try:
            kind = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
        except zmq.Again:
            return False
        if secured or kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return True


def _answer(sock: zmq.Socket, msg_id: int, target: str) -> tuple[Any] | None:
    """``(body,)`` of our reply if it is there, else None; malformed and stale replies are
    dropped. Raises RemoteError for an error reply."""
    while True:
        try:
            frames = recv_frames(sock, NOBLOCK)
        except zmq.Again:
            return None
        try:
            header, body = wire.parse_reply(frames)
        except RemoteProtocolError:
            continue
        if header.msg_id != msg_id:
            continue
        if header.kind is wire.Kind.ERROR:
            raise RemoteError(f"{target}/control", body["type"], body["message"], target)
        return (body,)
