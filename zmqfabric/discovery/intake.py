"""From a peer's record to the directory: the checks every record passes, and the refusals.

Records reach a node as hints: heard on mDNS (:mod:`.mdns`), or straight from their node (a
hello, an answer to a probe; ``direct``). :meth:`Intake.accept` takes a record that
:func:`zmqfabric.core.records.decode_txt` validated and

1. drops it without a word (counted) if it belongs to another fabric;
2. refuses an mDNS record whose address lies outside the node's scope (RemoteProtocolError);
3. refuses a peer this node must not talk to: secured against unsecured, or a key outside the
   allow-list (counted, logged once per node id and address, listed by :meth:`Intake.refused`);
4. ignores our own record heard back;
5. hands the rest to the verifier (:mod:`.verify`: the node itself must confirm it), whose
   verdict comes back to :meth:`Intake.admit`: a node of our name is a name conflict, any other
   goes into the directory unless it is full (then it is refused).

Thread-safe: called from zeroconf's thread, the verifier's, the housekeeping thread and the
control thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from ..config import NodeConfig
from ..constants import LOG_RATE_PER_MINUTE, MAX_REFUSED_KEPT, MAX_VERIFY_CACHE
from ..core.records import NodeRecord, address_in_scope, encode_txt
from ..errors import RemoteProtocolError
from ..stats import Counters
from ..transport.sockets import SocketFactory
from .directory import Directory
from .verify import Verifier

log = logging.getLogger(__name__)

__all__ = ["Intake"]


class Intake:
    """The checks between a peer's record and ``directory`` (module docstring).

    ``sockets``: the node's socket factory, for verifying hints with their advertisers. Without
    it (tests of discovery alone) hints are admitted unverified. ``start``/``stop`` run the
    verifier's thread."""

    def __init__(
        self,
        config: NodeConfig,
        directory: Directory,
        counters: Counters,
        on_conflict: Callable[[NodeRecord], None],
        sockets: SocketFactory | None,
        on_admit: Callable[[NodeRecord], None] | None = None,
    ) -> None:
        """``on_admit``: called with each record put into the directory (the verifier's
        thread)."""
        self._config = config
        self._on_admit = on_admit
        self._directory = directory
        self._counters = counters
        self._on_conflict = on_conflict
        #: (name, node id) of our own record once advertised: heard back, it is ignored.
        self.own: tuple[str, str] | None = None
        #: Our own record as a verification call carries it (``me``), once advertised.
        self._me: dict[str, object] | None = None
        self._refused: dict[tuple[str, str], tuple[NodeRecord, str]] = {}
        self._refusal_logs = _Window(LOG_RATE_PER_MINUTE)
        self._lock = threading.Lock()
        self._verifier = (
            None if sockets is None
            else Verifier(config, sockets, counters, self.admit, self._refuse, lambda: self._me,
                          self.introduced)
        )
        #: Nodes that have our record (they answered a call that carried it, or called us to
        #: verify it): no hello of ours needed. Forgotten when they leave our view; bounded,
        #: oldest forgotten first.
        self._know_us: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: Nodes dropped from our view (:meth:`forget`), until they come back (:meth:`returning`).
        self._dropped: collections.OrderedDict[str, None] = collections.OrderedDict()

    def advertised(self, record: NodeRecord) -> None:
        """Our own record is advertised: ignore it when heard back, and introduce ourselves with
        it in each verification call."""
        self.own = (record.name, record.node_id)
        self._me = {"name": record.name, "txt": encode_txt(record)}

    def start(self, owner: str) -> None:
        """Start the verifier's thread (``owner``: the node's name, for the thread's name)."""
        if self._verifier is not None:
            self._verifier.start(owner)

    def stop(self) -> None:
        """Stop and join the verifier's thread."""
        if self._verifier is not None:
            self._verifier.stop()

    def accept(self, record: NodeRecord, *, direct: bool = False, proven: bool = False) -> None:
        """Put a validated peer record into the directory if it is in scope and not ours.

        ``direct``: the record came over a connection from its own address (a hello), so it may
        lie outside the scope's networks (peers seeded across subnets). ``proven``: its node
        itself sent it, from the record's address (over CURVE with the record's key when
        secured): a node not listed yet is admitted without a call of its own, at the
        verifier's rate for that address; a change to a listed node is verified. Raises
        RemoteProtocolError for an mDNS record outside the scope. A record of another fabric
        is dropped without a word (counted): that fabric is none of this node's business."""
        if record.fabric != self._config.fabric:
            self._counters.add("other_fabric_records")
            return
        if not direct and not address_in_scope(record.address, self._config.scope.networks):
            raise RemoteProtocolError(
                f"record {record.name!r}: address {record.address} is outside this node's scope "
                f"{', '.join(self._config.scope.networks)}"
            )
        refusal = self._security_refusal(record)
        if refusal is not None:
            self._refuse(record, refusal)
            return
        own = self.own
        if own is not None and record.node_id == own[1]:
            return  # our own record, heard back
        if self._verifier is None:
            self.admit(record)
        elif (proven and self._directory.get(record.name) is None
              and self._verifier.vouch(record)):
            self._counters.add("peers_introduced")
            self.admit(record)
        else:
            self._verifier.submit(record)  # a hint: the node itself tells what is true

    def admit(self, record: NodeRecord) -> None:
        """Take a verified record (the verifier's thread): a node of our name is a conflict,
        any other goes into the directory, unless it is full (counted and logged)."""
        with self._lock:  # refused earlier (it did not answer then): not any more
            self._refused.pop((record.node_id, record.address), None)
        own = self.own
        if own is not None and record.name == own[0]:
            if record.node_id != own[1]:
                self._counters.add("name_conflicts")
                self._on_conflict(record)
            return
        if not self._directory.put(record):
            self._counters.add("directory_full")
            self._refuse(record, f"this node already knows {self._directory.limit} nodes, "
                                 "its most (raise the limit of open files for more)")
        elif self._on_admit is not None:
            self._on_admit(record)

    def introduced(self, node_id: str) -> None:
        """Node ``node_id`` has our record (see ``_know_us``). Any thread."""
        with self._lock:
            self._know_us[node_id] = None
            self._know_us.move_to_end(node_id)
            while len(self._know_us) > MAX_VERIFY_CACHE:
                self._know_us.popitem(last=False)

    def knows_us(self, node_id: str) -> bool:
        """Whether node ``node_id`` has our record from us (:meth:`introduced`)."""
        with self._lock:
            return node_id in self._know_us

    def forget(self, name: str, node_id: str) -> None:
        """Forget that node ``name`` (``node_id``) was verified: its record heard again is
        verified again. Also forget that it knows us: a node dropped from our view (it left, it
        died, a partition) has likely dropped us too, so it is greeted when it comes back."""
        with self._lock:
            self._know_us.pop(node_id, None)
            self._dropped[node_id] = None
            while len(self._dropped) > MAX_VERIFY_CACHE:
                self._dropped.popitem(last=False)
        if self._verifier is not None:
            self._verifier.forget(name, node_id)

    def returning(self, node_id: str) -> bool:
        """Whether node ``node_id`` comes back after we dropped it (asked once per return): it
        likely dropped us too (a partition), and it does not call back a node it buried, so it
        is greeted at once instead of after GREET_WAIT_S. Any thread."""
        with self._lock:
            return self._dropped.pop(node_id, 0) is None

    def checking(self, node_id: str) -> bool:
        """A hint about node ``node_id`` is being verified, waits to be, or waits for a retry."""
        return self._verifier is not None and any(
            k[1] == node_id for k in self._verifier.claims())

    def verifying(self, name: str) -> bool:
        """A hint claiming node name ``name`` is being verified (or waits to be)."""
        return self._verifier is not None and any(
            k[0] == name for k in self._verifier.claims(retries=False))

    def settled(self, quiet: float) -> bool:
        """Whether no new hint came for ``quiet`` s and none waits for its first call or is in
        it (always, without a verifier)."""
        return self._verifier is None or self._verifier.settled(quiet)

    def hinted(self) -> list[tuple[str, str]]:
        """(name, node id) of the nodes heard of and not verified yet: their hints wait, are
        being verified, or wait to be called again."""
        if self._verifier is None:
            return []
        return list({(k[0], k[1]) for k in self._verifier.claims()})

    def settle(self, name: str, timeout: float) -> bool:
        """Wait until no hint claiming node name ``name`` is being verified. False on
        timeout."""
        return self._verifier is None or self._verifier.wait_idle(name, timeout)

    def refused(self) -> list[tuple[NodeRecord, str]]:
        """Peers seen but refused for security reasons (most recent last)."""
        with self._lock:
            return list(self._refused.values())

    def _security_refusal(self, record: NodeRecord) -> str | None:
        """Why a secured node must not connect to ``record`` (or the other way round), or None."""
        keys = self._config.keys
        if keys is None:
            return "it is secured (CURVE) and this node has no keys" if record.curve_key else None
        if not record.curve_key:
            return "it is not secured and this node only talks CURVE"
        if not keys.allows(record.curve_key):
            return f"its key {record.curve_key} is not in this node's allow-list"
        return None

    def _refuse(self, record: NodeRecord, reason: str) -> None:
        """Count a refused peer; log it once per node id and address."""
        self._counters.add("refused_peers")
        key = (record.node_id, record.address)
        with self._lock:
            first = key not in self._refused
            self._refused[key] = (record, reason)
            while len(self._refused) > MAX_REFUSED_KEPT:
                self._refused.pop(next(iter(self._refused)))
        if first and self._refusal_logs.allow(time.monotonic()):
            log.warning("ignoring node %s on host %s (%s): %s", record.name, record.host,
                        record.address, reason, extra={"zf_event": "peer_refused"})


class _Window:
    """At most ``per_minute`` events a minute (refused peers logged: a flood is counted, not
    logged line by line). Thread-safe enough: a race logs one line more."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._start = -60.0
        self._count = 0

    def allow(self, now: float) -> bool:
        if now - self._start >= 60.0:
            self._start, self._count = now, 0
        self._count += 1
        return self._count <= self._per_minute
