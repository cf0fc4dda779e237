"""What the verifier (:mod:`.verify`) keeps of one call: the hint's identity, the call's sockets
and deadline, and how its connection events read.

Pure but for ZeroMQ's event numbers; no thread of its own.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import zmq

from ..core.records import NodeRecord

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
#: ...and the events that say something listens there (a connection was taken): a node busy
#: starting answers late and is retried longer than an address where nothing takes a connection.
REACHED = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
HintKey = tuple[str, str, int, str, int, str, str]


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


@dataclass(slots=True)
class Probe:
    """One call under way: the hint, its sockets, its id, when it ends."""

    hint: NodeRecord
    key: HintKey
    sock: zmq.Socket
    monitor: zmq.Socket
    msg_id: int
    deadline: float
    timeout: float
    reached: bool = False  # something took the connection: the advertiser is there
    introduced: bool = False  # the call carries our record: answered, its node knows us
