"""What runs behind a node, and the order it opens and closes in.

A node's parts beside its endpoints: the ZAP guard (secured nodes), discovery (mDNS), membership
(claiming the name), housekeeping (liveness and gossip) and the control endpoint, plus the
metrics server when the node has one. :class:`NodeParts` builds them with the node (constructors
only allocate) and runs the two sequences of :mod:`zmqfabric.nodebase`:

- opening: guard, discovery, housekeeping and control (made, not started), the node's endpoints
  (a callback: services, then tasks), the node marked started, then the threads, the metrics
  server, the directory's listener, browsing, and last the name claim (or, for an observer, its
  own record in its directory);
- closing: the directory's listener, the discovery goodbye first (peers stop sending to us),
  then the threads (the caller closes the task dispatcher before), then, after the handles, the
  guard, the context and the metrics server.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .control import ControlServer
from .core.records import NodeRecord
from .discovery.housekeeping import Housekeeping
from .discovery.mdns import Discovery
from .discovery.membership import Membership
from .runtime import NodeRuntime, NodeState
from .security.guard import Guard

log = logging.getLogger(__name__)

__all__ = ["NodeParts"]


class NodeParts:
    """Guard, discovery, membership, housekeeping and control of one node. ``open`` runs in the
    thread that starts the node; each closing step says which thread may call it."""

    def __init__(self, runtime: NodeRuntime, on_conflict: str) -> None:
        """``on_conflict``: what claiming a taken name does (see :class:`Membership`)."""
        rt = self._runtime = runtime
        self.discovery = Discovery(rt.config, rt.directory, rt.counters, self._on_name_conflict,
                                   rt.sockets)
        self.membership = Membership(rt, self.discovery, on_conflict)
        rt.on_record_change = self.discovery.advertise
        rt.refusals = self.discovery.refused
        rt.verifying = self.discovery.verifying
        self._control: ControlServer | None = None
        self._housekeeping: Housekeeping | None = None
        self._unlisten: Callable[[], None] | None = None

    def open(self, open_endpoints: Callable[[], None], metrics_port: int | None) -> None:
        """Open every part, in order (module docstring), and mark the node started. Raises what
        a part raises (FabricError, NameConflictError, JournalError...); the caller then closes
        whatever was opened."""
        rt = self._runtime
        config = rt.config
        if config.keys is not None:
            rt.guard = Guard(rt.sockets.context, config.keys, rt.counters, rt.name)
            rt.guard.start()
        elif not config.scope.is_local:
            log.warning("node %s is on %s without keys: its traffic is unauthenticated and "
                        "unencrypted; give it keys (--keys DIR) on a shared network",
                        rt.name, config.scope.interface, extra={"zf_event": "unsecured_lan"})
        self.discovery.start(rt.name)
        housekeeping = self._housekeeping = Housekeeping(rt, self.discovery)
        control = self._control = ControlServer(
            rt, self.membership.accept_hello, housekeeping.accept_peers,
            housekeeping.answer_probe,
        )
        self.membership.attach(housekeeping)
        open_endpoints()
        rt.started_at = time.monotonic()
        rt.state = NodeState.STARTED
        housekeeping.start()
        control.start()
        if rt.metrics is not None and metrics_port is not None:
            rt.metrics.start(config.scope.address, metrics_port)
        self._unlisten = rt.directory.listen(self.membership.on_directory_event)
        self.discovery.browse(advertising=rt.advertised)
        if rt.advertised:
            self.membership.claim_name()
        else:
            rt.directory.put(rt.record)

    def _on_name_conflict(self, other: NodeRecord) -> None:
        self.membership.on_name_conflict(other)

    # --- closing, in this order ----------------------------------------------------------------

    def stop_listening(self) -> None:
        """The directory's changes no longer reach membership. Thread-safe."""
        if self._unlisten is not None:
            self._unlisten()

    def leave(self) -> None:
        """Goodbye first, so peers stop sending to us (and liveness says "left" and stops
        probing, so that nobody takes us back). Blocks ~250 ms; thread-safe."""
        if self._housekeeping is not None:
            self._housekeeping.leave()
        self.discovery.close()

    def stop_threads(self) -> None:
        """Stop and join the control and housekeeping threads (blocks up to
        THREAD_JOIN_TIMEOUT_S each)."""
        if self._control is not None:
            self._control.stop()
        if self._housekeeping is not None:
            self._housekeeping.stop()

    def close_context(self) -> None:
        """Stop the ZAP thread, terminate the context (blocks up to the linger time), stop the
        metrics server. After every handle is closed."""
        rt = self._runtime
        if rt.guard is not None:
            rt.guard.stop()
        rt.sockets.close()
        if rt.metrics is not None:
            rt.metrics.close()
