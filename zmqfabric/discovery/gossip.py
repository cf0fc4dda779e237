"""Gossip: how a node introduces itself to peers over their control endpoints.

mDNS answers a newcomer's query after 20-120 ms, or a second after our last announcement, and
does not cross routers. So a node also speaks for itself over ZeroMQ, with one-way messages to a
peer's control endpoint (request frames that get no reply):

- ``hello`` carries our record (name and TXT map). A node greets each newcomer it sees, and its
  seed peers (``NodeConfig.peers``) every SEED_RETRY_S until it knows them. The receiver validates
  a hello like an mDNS record (:meth:`Membership.accept_hello`): it is a hint, never the truth.
- ``peers`` carries the control URLs (and CURVE keys) of the nodes we know, shared with a peer
  across subnets; the receiver greets the ones it does not know (:meth:`Gossip.accept_peers`),
  each once, a few per host, at a bounded rate (:class:`Introductions`).
  A node enters a directory only through its own hello or mDNS record, never on another's word,
  and those are hints too: verified with the node itself (:mod:`.verify`).

Everything here runs in the housekeeping thread (:mod:`.housekeeping`), which owns the
short-lived sockets that carry these messages.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq

from ..config import peer_url
from ..constants import (
    GREET_WAIT_S,
    HELLO_LINGER_MS,
    INTRODUCE_BURST,
    INTRODUCE_RATE_PER_S,
    MAX_INTRODUCED_PER_HOST,
    MAX_PENDING_GREETS,
    MAX_SHARED,
    MAX_VERIFY_CACHE,
    SEED_RETRY_S,
    VERIFY_CACHE_S,
)
from ..core import wire
from ..core.curve import is_public_key
from ..core.records import NodeRecord, address_in_scope, encode_txt
from ..errors import FabricError

if TYPE_CHECKING:
    from .local import LocalNode

log = logging.getLogger(__name__)
_TCP_URL = re.compile(r"tcp://[0-9.]{7,15}:[0-9]{1,5}\Z")


class Gossip:
    """Sends hellos and peer lists. Owned by the housekeeping thread; not thread-safe."""

    def __init__(self, node: LocalNode, clock: Callable[[], float] = time.monotonic) -> None:
        self._node = node
        self._clock = clock
        self._seeds = [peer_url(peer) for peer in node.config.peers]  # (url, CURVE key)
        self._next_seeding = 0.0
        self._introductions = Introductions()
        #: Greetings waiting for a newcomer's call back: node id -> (due, record, known).
        self._greetings: dict[str, tuple[float, NodeRecord, Callable[[], bool]]] = {}

    def introduce(self, url: str, key: str | None) -> None:
        """Send our record to the control endpoint at ``url`` (a fresh connection)."""
        self._send_hello(url, key)

    def greet(self, record: NodeRecord, known: Callable[[], bool] | None = None) -> None:
        """Introduce ourselves to a newcomer: now, or (``known``) GREET_WAIT_S later unless
        ``known()`` then says it has our record (it called us back: a hello per join at every
        node spared). At most MAX_PENDING_GREETS wait; more are greeted at once."""
        if known is not None and len(self._greetings) < MAX_PENDING_GREETS:
            self._greetings[record.node_id] = (self._clock() + GREET_WAIT_S, record, known)
            return
        if self._node.advertised and record.control is not None:
            self._send_hello(record.url(record.control), record.curve_key)

    def share(self, record: NodeRecord) -> None:
        """Send the control URLs of every node we know to ``record``'s node, so that nodes
        seeded across subnets learn each other."""
        if record.control is None:
            return
        known = [
            [r.url(r.control), r.curve_key] for r in self._node.directory.records() if r.control
        ]
        body = {"op": "peers", "peers": known[:MAX_SHARED]}
        self._send_oneway(record.url(record.control), record.curve_key, body)

    def reseed(self) -> None:
        """Say hello to every seed peer we do not know yet, at most every SEED_RETRY_S, and
        to each newcomer whose greeting is due and who has not called us back (call it each
        turn of the loop)."""
        now = self._clock()
        if self._greetings and min(due for due, _, _ in self._greetings.values()) <= now:
            for node_id in [n for n, (due, _, _) in self._greetings.items() if due <= now]:
                _, record, has_us = self._greetings.pop(node_id)
                if not has_us():
                    self.greet(record)
        if not self._seeds or self._clock() < self._next_seeding:
            return
        self._next_seeding = self._clock() + SEED_RETRY_S
        known = {r.url(r.control) for r in self._node.directory.records() if r.control}
        for url, key in self._seeds:
            if url not in known:
                self._send_hello(url, key)

    def accept_peers(self, peers: object) -> None:
        """Greet the shared control URLs (a peer's ``peers`` message) that we do not know.
        Malformed lists are counted (``refused_peer_lists``); malformed items are skipped.

        An introduction is a hint: the greeted node enters our directory only through its own
        hello, verified with it. And a peer list must not make this node a cannon: each URL is
        greeted once per VERIFY_CACHE_S, at most MAX_INTRODUCED_PER_HOST ports per host, at most
        INTRODUCE_BURST at once then INTRODUCE_RATE_PER_S (:class:`Introductions`); the rest is
        counted (``introductions_dropped``)."""
        node = self._node
        if not isinstance(peers, list) or len(peers) > MAX_SHARED:
            node.counters.add("refused_peer_lists")
            return
        known = {r.url(r.control) for r in node.directory.records() if r.control}
        for item in peers:
            if not (isinstance(item, list) and len(item) == 2):
                continue
            url, key = item
            if (
                isinstance(url, str)
                and url not in known
                and _TCP_URL.match(url)
                and (key is None or (isinstance(key, str) and is_public_key(key)))
                and in_scope(node, url)
            ):
                if self._introductions.admit(url, self._clock()):
                    self._send_hello(url, key)
                else:
                    node.counters.add("introductions_dropped")

    def _hello(self) -> dict[str, Any]:
        record = self._node.record
        return {"op": "hello", "name": record.name, "txt": encode_txt(record)}

    def _send_hello(self, url: str, key: str | None) -> None:
        if self._node.advertised:
            self._send_oneway(url, key, self._hello())

    def _send_oneway(self, url: str, key: str | None, body: dict[str, Any]) -> None:
        """Send a one-way control message (hello, peers) from a short-lived socket."""
        sockets = self._node.sockets
        sock = sockets.socket(zmq.DEALER, sync=True)
        sock.setsockopt(zmq.IMMEDIATE, 0)  # queue now, deliver while the socket lingers
        sock.setsockopt(zmq.RECONNECT_IVL, 2 * HELLO_LINGER_MS)  # one connection attempt
        try:
            sockets.connect(sock, url, key)
            sock.send_multipart(_frames(body), zmq.NOBLOCK)
        except (zmq.ZMQError, FabricError) as exc:
            log.debug("cannot send %s to %s: %s", body.get("op"), url, exc)
        finally:
            sock.close(HELLO_LINGER_MS)


def in_scope(node: LocalNode, url: str) -> bool:
    """Whether a peer's word may make ``node`` reach out to ``url``: a node of this host's scope
    only reaches loopback addresses (unless it has seed peers); LAN nodes reach the other
    subnets their peers know."""
    if not node.config.scope.is_local or node.config.peers:
        return True
    host = url[len("tcp://"):].rsplit(":", 1)[0]
    try:
        return address_in_scope(host, node.config.scope.networks)
    except ValueError:
        return False


def _frames(body: dict[str, Any]) -> list[bytes]:
    """A one-way control message: request frames with message id 0 (no reply expected)."""
    header = wire.pack_header(wire.Kind.REQUEST, 0, time.time())
    return [b"", header, wire.pack_body(body)]


class Introductions:
    """Which introduced control URLs may be greeted now: deduplicated (each URL once per
    VERIFY_CACHE_S), at most MAX_INTRODUCED_PER_HOST distinct ports per host in that time, and a
    token bucket (INTRODUCE_BURST, INTRODUCE_RATE_PER_S). Bounded: MAX_VERIFY_CACHE URLs kept.
    Owned by the housekeeping thread; not thread-safe."""

    def __init__(self) -> None:
        self._greeted: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._tokens = float(INTRODUCE_BURST)
        self._stamp: float | None = None

    def admit(self, url: str, now: float) -> bool:
        greeted = self._greeted
        while greeted and next(iter(greeted.values())) <= now:
            greeted.popitem(last=False)
        if url in greeted:
            return False
        host = url.rsplit(":", 1)[0]
        if sum(1 for u in greeted if u.rsplit(":", 1)[0] == host) >= MAX_INTRODUCED_PER_HOST:
            return False
        if self._stamp is not None:
            self._tokens = min(float(INTRODUCE_BURST),
                               self._tokens + (now - self._stamp) * INTRODUCE_RATE_PER_S)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        greeted[url] = now + VERIFY_CACHE_S
        while len(greeted) > MAX_VERIFY_CACHE:
            greeted.popitem(last=False)
        return True
