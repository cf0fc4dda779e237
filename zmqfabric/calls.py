"""Control calls: asking another node's control endpoint (``ping``, ``info``, ``stats``,
``record``; see :mod:`zmqfabric.control` for what it answers).

:func:`control_call` (blocking, any thread) and :func:`control_call_async` (a coroutine) are one
plan (see :mod:`zmqfabric.patterns.plan`) with one fresh socket per call: find the node in the
directory (:func:`find_node`: a node we refuse or that refuses us ends the call at once), connect,
send without blocking once the connection is up, and watch the socket's monitor for a refused
handshake, all within the call's timeout, whatever the peer does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .constants import CONTROL_TIMEOUT_S
from .core import wire
from .core.records import NodeRecord
from .errors import (
    AuthorizationError,
    ClosedError,
    FabricTimeoutError,
    NodeNotFoundError,
    RemoteError,
    RemoteProtocolError,
)
from .patterns.plan import AWAITING, BLOCKING, POLL, WAIT_DIRECTORY, Plan, drive, drive_async
from .runtime import NodeRuntime
from .transport.frames import NOBLOCK, deadline_after, ms_left, recv_frames, send_frames
from .transport.sockets import translate_zmq_errors

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


#: Why discovery refuses a record for this node's keys (discovery/mdns.py's security refusals):
#: no answer could change that, so a call to that node ends at once.
_WE_REFUSE = ("not in this node's allow-list", "this node has no keys", "only talks CURVE")


def find_node(runtime: NodeRuntime, name: str, timeout: float | None) -> Plan[NodeRecord]:
    """The plan of waiting for node ``name`` to be listed (verified). A node whose control
    endpoint refused our key, or whose key this node does not allow, is never listed, only
    refused: that ends the wait at once with AuthorizationError. One advertised but not
    answering for its record ends it at the timeout with FabricTimeoutError, one never seen with
    NodeNotFoundError."""
    directory = runtime.directory
    deadline = deadline_after(timeout)
    while (record := directory.get(name)) is None:
        refusal = runtime.refusal_of(name)
        if refusal is not None and "refused our key" in refusal:
            raise AuthorizationError("control endpoint", name, [name])
        if refusal is not None and any(why in refusal for why in _WE_REFUSE):
            raise AuthorizationError("control endpoint", name, [name], ours=refusal)
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
