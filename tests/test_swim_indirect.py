"""An unanswered probe checks the member's port before it asks helpers (discovery/probing.py
``Probing._indirect``): a closed port is a death at once, and helpers asked about a dead member
each open a connection to it and check its port themselves. In a death storm most unanswered
probes are about dead members. A member whose port still takes connections (a live process, only
slow) is probed through helpers as before.

Real sockets on loopback: the member's port is closed, or a listener that accepts and never
answers; the helpers are raw ROUTER sockets that record what they receive. The node is a
stand-in with the parts Probing and Prober use.
"""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace
from typing import Any, Iterator

import msgpack
import pytest
import zmq

from zmqfabric.config import NodeConfig
from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord
from zmqfabric.core.swim import Effects, Members, Timing
from zmqfabric.discovery.probes import Prober
from zmqfabric.discovery.probing import Probing
from zmqfabric.discovery.swim import Local
from zmqfabric.stats import Counters
from zmqfabric.transport.sockets import SocketFactory

ME, TARGET = f"{1:016x}", f"{2:016x}"


def record(node_id: str, port: int) -> NodeRecord:
    ctl = Endpoint(EndpointKind.CONTROL, "control", port)
    return NodeRecord(f"n{node_id[-2:]}", node_id, "host", 1, "127.0.0.1", (ctl,))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Rig:
    """A node's Probing over real sockets, with three helpers listening."""

    def __init__(self, target_port: int) -> None:
        config = NodeConfig()
        self.sockets = SocketFactory(config)
        self.helpers = []
        for _ in range(3):
            router = self.sockets.context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind("tcp://127.0.0.1:0")
            self.helpers.append(router)
        self.node: Any = SimpleNamespace(
            config=config, counters=Counters(), node_id=ME, name="n01", advertised=True,
            sockets=self.sockets, record=record(ME, closed_port()))
        self.members = Members(ME, Timing())
        self.target = self.members.join(record(TARGET, target_port),
                                        f"tcp://127.0.0.1:{target_port}", 0.0, 0)
        for i, router in enumerate(self.helpers):
            port = int(router.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
            helper = f"{10 + i:016x}"
            self.members.join(record(helper, port), f"tcp://127.0.0.1:{port}", 0.0, 0)
        self.poller = zmq.Poller()
        self.prober = Prober(self.node, self.poller, lambda url: None, lambda url: None)
        self.effects: list[Effects] = []
        self.probing = Probing(self.node, self.members, self.prober, Local(self.node),
                               lambda node_id, reply: None,
                               lambda out, source="": self.effects.append(out))

    def drive(self, seconds: float) -> None:
        """The housekeeping loop's part: poll, hand readable sockets over, expire."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for sock, _ in self.poller.poll(20):
                self.prober.on_readable(sock)
            self.prober.expire(time.monotonic())

    def asked(self) -> list[str]:
        """The ops the helpers received."""
        ops = []
        for router in self.helpers:
            while router.poll(0):
                frames = router.recv_multipart()
                ops.append(msgpack.unpackb(frames[-1])["op"])
        return ops

    def close(self) -> None:
        self.prober.close()
        for router in self.helpers:
            router.close(0)
        self.sockets.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port that takes connections and never answers (a live process, only slow)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def test_a_closed_port_is_a_death_and_no_helper_is_asked() -> None:
    rig = Rig(closed_port())
    try:
        now = time.monotonic()
        rig.probing.probe(rig.target, now)
        rig.probing.tick(now + 1.5 * rig.probing.rto())  # past the direct timeout: indirect
        rig.drive(0.5)
        assert any(m.node_id == TARGET for out in rig.effects for m, why in out.removed
                   if why == "dead"), "refused: dead at once"
        assert rig.asked() == [], "no helper is asked about a dead member"
    finally:
        rig.close()


def test_a_port_that_takes_connections_gets_helpers_asked(listener: socket.socket) -> None:
    rig = Rig(int(listener.getsockname()[1]))
    try:
        now = time.monotonic()
        rig.probing.probe(rig.target, now)
        rig.probing.tick(now + 1.5 * rig.probing.rto())
        rig.drive(0.5)
        assert not any(out.removed for out in rig.effects)
        assert rig.asked() == ["probe-req"] * 3
    finally:
        rig.close()
