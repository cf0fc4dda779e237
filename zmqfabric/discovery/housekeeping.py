"""The housekeeping thread: liveness and gossip, the socket work behind membership.

Membership reacts to the directory in discovery's thread (and the control thread's, for hellos),
which must never touch a socket. So it posts what it wants done to this thread, which owns the
sockets involved:

- liveness (:class:`~.liveness.Liveness`): SWIM probes and gossip over short-lived connections to
  peers' control endpoints; the thread sleeps until the next of its timers (a probe period, a
  timeout, a suspicion running out), at most LIVENESS_TICK_MS;
- gossip (:class:`~.gossip.Gossip`): hellos and peer lists, from short-lived sockets; seed peers
  greeted again every SEED_RETRY_S.

A node runs this thread beside its control thread (``zmqfabric.control``), which owns only the
control socket and hands the liveness ops it receives to :meth:`Housekeeping.answer_probe`: a
slow ``stats`` answer cannot delay a dead peer's removal, and a burst of gossip cannot delay a
ping.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq

from ..constants import LIVENESS_TICK_MS, THREAD_JOIN_TIMEOUT_S
from ..core.records import NodeRecord
from ..stats import RateLimitedLog
from ..transport.inbox import Inbox
from .gossip import Gossip
from .liveness import Liveness, Rediscovery

if TYPE_CHECKING:
    from .local import LocalNode

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)


class Housekeeping:
    """Owns the housekeeping thread, its poller, :class:`Liveness` and :class:`Gossip`.

    Allocates only; ``start()`` opens the inbox and starts the thread, ``stop()`` (idempotent)
    tells a few members that we leave, stops and joins the thread, closing every socket it owns.
    ``discovery`` is where verified peers are admitted and lost ones forgotten. The other
    methods are thread-safe: they post to the thread's inbox and return at once (dropped once
    stopping). They are what :class:`~.membership.Membership` asks for (its ``Introducer``).
    """

    def __init__(self, node: LocalNode, discovery: Rediscovery) -> None:
        self._node = node
        self._inbox = Inbox()
        self._poller = zmq.Poller()
        self._liveness = Liveness(node, self._poller, discovery, self._inbox.post)
        self._gossip = Gossip(node)
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
        """A peer joined the directory (or its record changed): a member to probe."""
        if not self._stopping:
            self._inbox.post(self._liveness.join, record)

    def unwatch(self, record: NodeRecord) -> None:
        """A peer left the directory."""
        if not self._stopping:
            self._inbox.post(self._liveness.leave, record)

    def greet(self, record: NodeRecord, known: Callable[[], bool] | None = None) -> None:
        """Introduce ourselves to a newcomer (unless ``known()`` says it has our record by
        GREET_WAIT_S later: :meth:`Gossip.greet`)."""
        if not self._stopping:
            self._inbox.post(self._gossip.greet, record, known)

    def share(self, record: NodeRecord) -> None:
        """Tell ``record``'s node the control URLs of every node we know."""
        if not self._stopping:
            self._inbox.post(self._gossip.share, record)

    def accept_peers(self, peers: object) -> None:
        """Greet the nodes of a peer's ``peers`` message that we do not know (the control
        thread hands them on; validated here)."""
        if not self._stopping:
            self._inbox.post(self._gossip.accept_peers, peers)

    def leave(self) -> None:
        """The node is leaving: tell a few members, stop probing, stop answering (so that no
        peer admits us again while we close)."""
        self._liveness.local.leaving = True
        if not self._stopping:
            self._inbox.post(self._liveness.leave_fabric)

    def answer_probe(self, body: dict[str, Any], address: str | None, key: str | None,
                     one_way: bool = False) -> dict[str, Any] | None:
        """Answer a liveness op (control thread; see :class:`~.swim.Responder`)."""
        return self._liveness.responder.answer(body, address, key, one_way)

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        inbox, liveness, fd = self._inbox, self._liveness, self._inbox.fd
        try:
            while not self._stopping:
                wait = liveness.next_deadline() - time.monotonic()
                # Bounded whatever the deadline (a NaN or an infinity from a bug there must
                # not end this thread: OverflowError once did, and the node's view froze).
                timeout = (min(LIVENESS_TICK_MS, max(0, math.ceil(wait * 1000)))
                           if math.isfinite(wait) else 0 if wait < 0 else LIVENESS_TICK_MS)
                events = inbox.poll(self._poller, timeout)
                try:
                    inbox.run_pending()
                    self._gossip.reseed()
                    for sock in events:
                        if sock != fd:
                            liveness.on_readable(sock)
                    if inbox.pending:
                        # What that work posted back (membership's unwatch of each node
                        # liveness removed): now, not after one more poll and tick per death.
                        inbox.run_pending()
                    liveness.tick()
                except Exception:  # a bug here must not end liveness for the node's lifetime
                    self._node.counters.add("housekeeping_errors")
                    _rlog.exception("housekeeping", "%s: error in the housekeeping thread",
                                    self._node.name)
            liveness.leave_fabric()
        finally:
            liveness.close()
