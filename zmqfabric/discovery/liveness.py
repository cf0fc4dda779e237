"""Liveness: a heartbeating connection to every peer's control endpoint.

mDNS alone cannot tell that a peer died: a SIGKILLed process sends no goodbye and its records live
until their TTL. So the housekeeping thread keeps one DEALER connected to each peer's control
endpoint, with ZeroMQ heartbeats, and watches it with a socket monitor:

- a process that dies has its sockets closed by the kernel: DISCONNECTED arrives at once;
- a host that vanishes (link down, power off) stops answering heartbeats: DISCONNECTED arrives after
  the heartbeat timeout (1.5 s by default);
- a peer we never manage to connect to within LIVENESS_CONNECT_TIMEOUT_S is treated as dead.

A dead peer is removed from the directory (its endpoints disconnected) but kept watched for
DEAD_FORGET_S: ZeroMQ keeps reconnecting, and a successful handshake puts it back.
Everything here runs in the housekeeping thread (:mod:`.housekeeping`), which owns these sockets.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..constants import DEAD_FORGET_S, LIVENESS_CONNECT_TIMEOUT_S
from ..core.records import NodeRecord

if TYPE_CHECKING:
    from .local import LocalNode

log = logging.getLogger(__name__)

_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclass(slots=True)
class _Peer:
    record: NodeRecord
    url: str
    sock: zmq.Socket
    monitor: zmq.Socket
    since: float
    up: bool = False
    dead: bool = False
    dead_since: float = 0.0
    #: The peer answered a handshake by refusing our key: alive, just not ours to talk to.
    refused: bool = False


class PeerWatch:
    """Owned by the housekeeping thread. ``poller`` is that thread's poller; monitors join it."""

    def __init__(
        self, node: LocalNode, poller: zmq.Poller, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._node = node
        self._poller = poller
        self._clock = clock
        self._peers: dict[str, _Peer] = {}
        self._by_monitor: dict[zmq.Socket, _Peer] = {}

    def watch(self, record: NodeRecord) -> None:
        control = record.control
        if control is None or record.node_id == self._node.node_id:
            return
        url = record.url(control)
        peer = self._peers.get(record.name)
        if peer is not None:
            if peer.record.node_id == record.node_id and peer.url == url:
                peer.record = record
                return
            self._drop(peer)
        sock = self._node.sockets.socket(zmq.DEALER, sync=True)
        sock.setsockopt(zmq.IMMEDIATE, 0)  # a hello sent now waits for the connection
        monitor = self._node.sockets.monitor(sock, _EVENTS, sync=True)
        self._node.sockets.connect(sock, url, record.curve_key)
        peer = _Peer(record, url, sock, monitor, self._clock())
        self._peers[record.name] = peer
        self._by_monitor[monitor] = peer
        self._poller.register(monitor, zmq.POLLIN)

    def send(self, name: str, frames: list[bytes]) -> bool:
        """Send a one-way control message over the watch connection to node ``name``; it waits
        in the socket until the connection is up. False if the node is not watched."""
        peer = self._peers.get(name)
        if peer is None or peer.dead:
            return False
        try:
            peer.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def unwatch(self, name: str, node_id: str) -> None:
        """Stop watching (the peer left cleanly). Ignored for peers we declared dead ourselves."""
        peer = self._peers.get(name)
        if peer is not None and peer.record.node_id == node_id and not peer.dead:
            self._drop(peer)

    def on_monitor(self, monitor: zmq.Socket) -> None:
        peer = self._by_monitor.get(monitor)
        if peer is None:
            return
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                peer.up = True
                if peer.dead:
                    peer.dead = False
                    log.info("%s: node %s is reachable again", self._node.name, peer.record.name)
                    self._node.directory.put(peer.record)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                # ZeroMQ does not retry after a refusal: from here on the peer's record (goodbye
                # or TTL) decides when it is gone, not the connect timeout.
                peer.refused = True
            elif kind == zmq.EVENT_DISCONNECTED and peer.up:
                peer.up = False
                self._declare_dead(peer, "its connection dropped")

    def tick(self) -> None:
        """Time-based checks; call a few times a second."""
        now = self._clock()
        for peer in list(self._peers.values()):
            if peer.dead:
                if now - peer.dead_since > DEAD_FORGET_S:
                    self._drop(peer)
            elif (not peer.up and not peer.refused
                  and now - peer.since > LIVENESS_CONNECT_TIMEOUT_S):
                self._declare_dead(peer, f"unreachable for {LIVENESS_CONNECT_TIMEOUT_S:g} s")

    def _declare_dead(self, peer: _Peer, why: str) -> None:
        if peer.dead:
            return
        peer.dead = True
        peer.dead_since = self._clock()
        self._node.counters.add("peers_lost")
        log.info("%s: node %s (%s) is gone: %s", self._node.name, peer.record.name,
                    peer.record.address, why)
        self._node.directory.remove(peer.record.name, peer.record.node_id)

    def _drop(self, peer: _Peer) -> None:
        self._peers.pop(peer.record.name, None)
        self._by_monitor.pop(peer.monitor, None)
        self._poller.unregister(peer.monitor)
        peer.sock.disable_monitor()
        peer.monitor.close(0)
        peer.sock.close(0)

    def close(self) -> None:
        for peer in list(self._peers.values()):
            self._drop(peer)
