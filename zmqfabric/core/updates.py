"""SWIM's gossip without IO: what an update says, on the wire, and the queue of updates waiting to
go out (:mod:`.swim` holds the member table that makes and takes them).

An update is ``[kind, node id, incarnation, name, control URL, CURVE key, origin]`` on the wire
(msgpack): kind 0 alive, 1 suspect, 2 dead, 3 left. URL and key (of an ``alive``) say where to
verify the node; the origin (of a ``suspect``) is the node id of who suspects it, so that
independent confirmations can be counted. Everything is validated when decoded.

Pure: no IO, threads or clock. Not thread-safe.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from .. import constants as C
from ..errors import LocalProtocolError, RemoteProtocolError
from .curve import is_public_key
from .records import validate_node_name

_NODE_ID: Final = re.compile(r"[0-9a-f]{16}\Z")
_TCP_URL: Final = re.compile(r"tcp://[0-9.]{7,15}:[0-9]{1,5}\Z")
#: Largest incarnation accepted (a peer cannot push ours past what msgpack and we can count).
MAX_INCARNATION: Final = 2**62


class Kind(enum.IntEnum):
    """What a gossip update says about a node (its wire value)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Update:
    """One piece of gossip: ``kind`` about node ``node_id`` at incarnation ``inc``. ``url`` and
    ``key`` (alive) say where to verify the node; ``origin`` (suspect) is who suspects it."""

    kind: Kind
    node_id: str
    inc: int
    name: str
    url: str = ""
    key: str | None = None
    origin: str = ""

    def encode(self) -> list[Any]:
        return [int(self.kind), self.node_id, self.inc, self.name, self.url, self.key,
                self.origin]

    @classmethod
    def decode(cls, raw: object) -> Update:
        """Validate one wire update. Raises RemoteProtocolError."""
        if not isinstance(raw, list) or len(raw) != 7:
            raise RemoteProtocolError("a gossip update is a list of 7 fields")
        kind, node_id, inc, name, url, key, origin = raw
        if not isinstance(kind, int) or kind not in Kind.__members__.values():
            raise RemoteProtocolError(f"unknown gossip kind {kind!r}")
        if not (isinstance(node_id, str) and _NODE_ID.match(node_id)):
            raise RemoteProtocolError("gossip: bad node id")
        if not isinstance(inc, int) or isinstance(inc, bool) or not 0 <= inc <= MAX_INCARNATION:
            raise RemoteProtocolError("gossip: bad incarnation")
        try:
            validate_node_name(name)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"gossip: {exc}") from exc
        if not isinstance(url, str) or (url and not _TCP_URL.match(url)):
            raise RemoteProtocolError("gossip: bad control URL")
        if key is not None and not (isinstance(key, str) and is_public_key(key)):
            raise RemoteProtocolError("gossip: bad CURVE key")
        if not isinstance(origin, str) or (origin and not _NODE_ID.match(origin)):
            raise RemoteProtocolError("gossip: bad origin")
        return cls(Kind(kind), node_id, inc, name, url, key, origin)


def transmit_limit(nodes: int, mult: int) -> int:
    """How often one update is sent before it is dropped: mult * ceil(log10(N + 1)) for a
    fabric of N ``nodes`` (as memberlist)."""
    return mult * max(1, math.ceil(math.log10(nodes + 1)))


class Broadcasts:
    """Updates waiting to go out, each sent at most ``transmit_limit`` times, the least sent
    first; a new update about a node replaces the one queued about it. Bounded by MAX_BROADCASTS
    (the most sent are dropped first).

    Two ways out: piggybacked on probes and answers (:meth:`take`, to whoever is asked or
    answered), and pushed to the node's gossip targets (:meth:`spread`), each update to each
    target once: the targets are kept connections (TCP), so a second copy to the same target
    carries nothing new, and in a death storm those copies were most of a node's messages."""

    def __init__(self) -> None:
        #: node id -> [update, times sent, targets pushed to, the update on the wire]
        self._queue: dict[str, list[Any]] = {}
        #: Some update was not pushed to every target yet (set by :meth:`add` and
        #: :meth:`retarget`, cleared by :meth:`spread`).
        self.unspread = False
        #: ...and one of those is urgent: a suspicion or a refutation (:func:`urgent`).
        self.urgent = False

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, update: Update) -> None:
        self._queue.pop(update.node_id, None)
        self._queue[update.node_id] = [update, 0, set(), update.encode()]
        self.unspread = True
        self.urgent = self.urgent or urgent(update)
        if len(self._queue) > C.MAX_BROADCASTS:
            worst = max(self._queue, key=lambda k: self._queue[k][1])
            del self._queue[worst]

    def retarget(self) -> None:
        """The targets may have changed: a new one gets every update queued."""
        self.unspread = bool(self._queue)
        self.urgent = any(urgent(entry[0]) for entry in self._queue.values())

    def take(self, count: int, limit: int) -> list[Update]:
        """Up to ``count`` updates to send now, each counted as sent once more."""
        return [entry[0] for entry in self._take(count, limit)]

    def take_wire(self, count: int, limit: int) -> list[list[Any]]:
        """:meth:`take`, on the wire (each update encoded once, when queued)."""
        return [entry[3] for entry in self._take(count, limit)]

    def spread(self, targets: list[str], count: int, limit: int) -> dict[str, list[list[Any]]]:
        """What to push to each of ``targets`` (node ids), on the wire: the updates not pushed
        to it yet, up to ``count``, the least sent first. An update pushed to any counts as
        sent once more. :attr:`unspread` stays set if some did not fit."""
        out: dict[str, list[list[Any]]] = {t: [] for t in targets}
        self.unspread = self.urgent = False
        if not self._queue or not targets:
            return out
        for node_id, entry in sorted(self._queue.items(), key=lambda item: item[1][1]):
            pushed = entry[2]
            went = False
            for target in targets:
                if target not in pushed:
                    batch = out[target]
                    if len(batch) < count:
                        batch.append(entry[3])
                        pushed.add(target)
                        went = True
                    else:
                        self.unspread = True
                        self.urgent = self.urgent or urgent(entry[0])
            if went:
                entry[1] += 1
                if entry[1] >= limit:
                    del self._queue[node_id]
        return out

    def _take(self, count: int, limit: int) -> list[list[Any]]:
        if not self._queue:
            return []
        chosen = sorted(self._queue.items(), key=lambda item: item[1][1])[:count]
        for node_id, entry in chosen:
            entry[1] += 1
            if entry[1] >= limit:
                del self._queue[node_id]
        return [entry for _, entry in chosen]


def urgent(update: Update) -> bool:
    """Whether ``update`` races a clock: a suspicion (the suspect must hear it soon enough to
    refute before it runs out; it hears it in gossip) or a refutation (an ``alive`` above
    incarnation 0: only a refuting node raises its own), which must reach every node holding
    the suspicion before it runs out there, or that node takes a live member for dead."""
    return update.kind is Kind.SUSPECT or (update.kind is Kind.ALIVE and update.inc > 0)


def refutes(update: Update, inc: int) -> bool:
    """Whether ``update`` about this node (at our incarnation ``inc``) calls for a refutation:
    it says we are suspect, dead or gone at our incarnation or later, or claims a later one."""
    if update.kind is Kind.ALIVE:
        return update.inc > inc
    return update.inc >= inc
