"""One call of the verifier (:mod:`.verify`): the hint's identity, the call's sockets and
deadline, how its connection events read, and the call itself (open, send, read the answer,
close). No thread of its own: every function runs in the verifier's thread, which owns the
sockets.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import time
from dataclasses import dataclass
from typing import Any

import zmq

from ..constants import ADDRESS_CACHE, MAX_CONTROL_MESSAGE, MAX_VERIFY_CACHE
from ..core import wire
from ..core.records import NodeRecord, confirm_record
from ..errors import RemoteProtocolError
from ..transport.sockets import SocketFactory

_CONTROL_TAIL = wire.service_tail("control")

#: Events that end a probe before its answer: nothing listens there (the connection was refused
#: and ZeroMQ would retry), the handshake failed (the advertiser does not hold the key's
#: secret, or speaks something else), or the connection dropped.
FAIL_EVENTS = (
    zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)
WHY = {
    zmq.EVENT_CONNECT_RETRIED: "nothing answers at its control port",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "its control endpoint refused our key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "it could not complete a CURVE handshake with its key",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "it could not complete a CURVE handshake with its key",
    zmq.EVENT_DISCONNECTED: "it closed the connection before answering",
}
#: ...and the event that says something listens there (a connection was taken): a node busy
#: starting answers late and is retried longer than an address where nothing takes a connection.
#: (Not also the handshake's success: a monitor message each, per call, at every node of a join;
#: the answer follows it, and a failed handshake is reported.)
REACHED = zmq.EVENT_CONNECTED
HintKey = tuple[str, str, int, str, int, str, str]


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def on_loopback(address: str) -> bool:
    """A loopback address: its kernel answers every connect at once (taken or refused), so a
    silent call there is a node too busy to be scheduled (its listen queue full), not a host
    that drops packets."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def hint_key(hint: NodeRecord) -> HintKey:
    """What makes two hints the same claim: name, id, seq, address, control port, key, fabric
    (endpoints are not part of it: the truth at one seq is what the node answers)."""
    control = hint.control
    return (hint.name, hint.node_id, hint.seq, hint.address,
            control.port if control else 0, hint.curve_key or "", hint.fabric)


class Decided:
    """Claims decided (verified, or refused), each not checked again until its time, the most
    recent MAX_VERIFY_CACHE of them; indexed by node, so that forgetting a node that died costs
    its own entries, not a scan of all of them (once per death at every node). Not
    thread-safe: the verifier holds its lock."""

    def __init__(self) -> None:
        self._until: collections.OrderedDict[HintKey, float] = collections.OrderedDict()
        self._by_node: dict[tuple[str, str], set[HintKey]] = {}

    def until(self, key: HintKey) -> float | None:
        return self._until.get(key)

    def remember(self, key: HintKey, until: float) -> None:
        self._until[key] = until
        self._until.move_to_end(key)
        self._by_node.setdefault((key[0], key[1]), set()).add(key)
        while len(self._until) > MAX_VERIFY_CACHE:
            self._drop(self._until.popitem(last=False)[0])

    def forget(self, name: str, node_id: str) -> None:
        """Drop every claim about node ``name`` with ``node_id``."""
        for key in self._by_node.pop((name, node_id), ()):
            del self._until[key]

    def _drop(self, key: HintKey) -> None:
        keys = self._by_node.get((key[0], key[1]))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_node[(key[0], key[1])]


@dataclass(slots=True)
class Probe:
    """One call under way: the hint, its sockets, its id, when it ends."""

    hint: NodeRecord
    key: HintKey
    sock: zmq.Socket[Any]
    monitor: zmq.Socket[Any]
    msg_id: int
    deadline: float
    timeout: float
    reached: bool = False  # something took the connection: the advertiser is there
    introduced: bool = False  # the call carries our record: answered, its node knows us


def open_call(sockets: SocketFactory, hint: NodeRecord, key: HintKey, msg_id: int, now: float,
              timeout: float) -> Probe:
    """The sockets of a call to ``hint``'s control endpoint (a DEALER and its monitor), not
    connected yet. A failed connection is not retried within ``timeout``. On loopback the
    monitor reports failures only: a silent call there is a busy node whether or not its
    connection was taken (:func:`on_loopback`), so an answered call costs no monitor message."""
    sock = sockets.socket(zmq.DEALER, sync=True)
    sock.setsockopt(zmq.IMMEDIATE, 0)  # the request waits in the socket for the connection
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, int(timeout * 2000))
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE)  # an answer is a few kilobytes
    events = FAIL_EVENTS if on_loopback(hint.address) else FAIL_EVENTS | REACHED
    monitor = sockets.monitor(sock, events, sync=True)
    return Probe(hint, key, sock, monitor, msg_id, now + timeout, timeout)


def send_call(sockets: SocketFactory, probe: Probe, me: dict[str, object] | None) -> None:
    """Connect ``probe`` (as a CURVE client of the hint's key when it has one) and send the
    control op ``record``, introducing us with ``me`` (our record) when given. Raises
    zmq.ZMQError or FabricError when the endpoint cannot be connected."""
    hint = probe.hint
    assert hint.control is not None
    sockets.connect(probe.sock, hint.url(hint.control), hint.curve_key)
    header = wire.name_service(
        wire.pack_header(wire.Kind.REQUEST, probe.msg_id, time.time()), _CONTROL_TAIL)
    body = {"op": "record", "me": me} if me is not None else {"op": "record"}
    probe.sock.send_multipart([b"", header, wire.pack_body(body)], zmq.NOBLOCK)
    probe.introduced = me is not None


def read_answer(probe: Probe) -> NodeRecord | None:
    """The record the node answered, checked against the hint; None when nothing is there or
    the reply is not this call's (wait for the answer or the deadline). Raises
    RemoteProtocolError for a malformed or refused answer."""
    try:
        frames = probe.sock.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None
    header, body = wire.parse_reply(frames)
    if header.msg_id != probe.msg_id:
        return None
    if header.kind is wire.Kind.ERROR:
        raise RemoteProtocolError(f"it answered with an error: {body['message'][:120]}")
    return confirm_record(probe.hint, body)


def close_call(probe: Probe) -> None:
    """Close the call's sockets (also while the context terminates)."""
    try:
        probe.sock.disable_monitor()
    except zmq.ZMQError:
        pass  # the context is terminating (a node closed under load): close all the same
    probe.monitor.close(0)
    probe.sock.close(0)
