"""The housekeeping thread: liveness and gossip, the socket work behind membership.

Membership reacts to the directory in discovery's thread (and the control thread's, for hellos),
which must never touch a socket. So it posts what it wants done to this thread, which owns the
sockets involved:

- liveness (:class:`~.liveness.PeerWatch`): one heartbeating DEALER per peer's control endpoint
  and its monitor, read when they have events; time-based checks every LIVENESS_TICK_MS;
- gossip (:class:`~.gossip.Gossip`): hellos and peer lists, from short-lived sockets or over the
  liveness connections; seed peers greeted again every SEED_RETRY_S.

A node runs this thread beside its control thread (``zmqfabric.control``), which owns only the
control socket: a slow ``stats`` answer cannot delay a dead peer's removal, and a burst of
monitor events cannot delay a ping.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import zmq

from ..constants import LIVENESS_TICK_MS, THREAD_JOIN_TIMEOUT_S
from ..core.records import NodeRecord
from ..stats import RateLimitedLog
from ..transport.inbox import Inbox
from .gossip import Gossip
from .liveness import PeerWatch

if TYPE_CHECKING:
    from .local import LocalNode

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)


class Housekeeping:
    """Owns the housekeeping thread, its poller, :class:`PeerWatch` and :class:`Gossip`.

    Allocates only; ``start()`` opens the inbox and starts the thread, ``stop()`` (idempotent)
    stops and joins it, closing every socket it owns. The other methods are thread-safe: they
    post to the thread's inbox and return at once (dropped once stopping). They are what
    :class:`~.membership.Membership` asks for (its ``Introducer``).
    """

    def __init__(self, node: LocalNode) -> None:
        self._node = node
        self._inbox = Inbox()
        self._poller = zmq.Poller()
        self._peers = PeerWatch(node, self._poller)
        self._gossip = Gossip(node, self._peers)
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"zmqfabric-housekeeping-{node.name}"
        )

    def start(self) -> None:
        self._poller.register(self._inbox.open(), zmq.POLLIN)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close its sockets. Idempotent; also if never started."""
        self._stopping = True
        self._inbox.wake()
        if self._thread.is_alive():
            self._thread.join(THREAD_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("housekeeping thread of %s did not stop within %s s",
                          self._node.name, THREAD_JOIN_TIMEOUT_S)
                return
        self._inbox.close()

    # --- any thread ----------------------------------------------------------------------------

    def introduce(self, url: str, key: str | None = None) -> None:
        """Send our record to the control endpoint at ``url`` (a peer that should know us)."""
        if not self._stopping:
            self._inbox.post(self._gossip.introduce, url, key)

    def watch(self, record: NodeRecord) -> None:
        """Start watching a peer's liveness (or take its newer record)."""
        if not self._stopping:
            self._inbox.post(self._peers.watch, record)

    def unwatch(self, record: NodeRecord) -> None:
        """Stop watching a peer that left cleanly."""
        if not self._stopping:
            self._inbox.post(self._peers.unwatch, record.name, record.node_id)

    def greet(self, record: NodeRecord) -> None:
        """Introduce ourselves to a newcomer over its watch connection."""
        if not self._stopping:
            self._inbox.post(self._gossip.greet, record)

    def share(self, record: NodeRecord) -> None:
        """Tell ``record``'s node the control URLs of every node we know."""
        if not self._stopping:
            self._inbox.post(self._gossip.share, record)

    def accept_peers(self, peers: object) -> None:
        """Greet the nodes of a peer's ``peers`` message that we do not know (the control
        thread hands them on; validated here)."""
        if not self._stopping:
            self._inbox.post(self._gossip.accept_peers, peers)

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        inbox, peers, fd = self._inbox, self._peers, self._inbox.fd
        try:
            while not self._stopping:
                events = inbox.poll(self._poller, LIVENESS_TICK_MS)
                try:
                    inbox.run_pending()
                    self._gossip.reseed()
                    for sock in events:
                        if sock != fd:
                            peers.on_monitor(sock)
                    peers.tick()
                except Exception:  # a bug here must not end liveness for the node's lifetime
                    self._node.counters.add("housekeeping_errors")
                    _rlog.exception("housekeeping", "%s: error in the housekeeping thread",
                                    self._node.name)
        finally:
            peers.close()
