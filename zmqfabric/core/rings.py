"""The probe rings of SWIM (:mod:`.swim`): PROBE_SPREAD orders of the same node ids.

Each ring orders the ids by its own hash (splitmix64 of the id and the ring's number), the same
in every process, so that every node computes the same rings from the same members (as Rapid's
K rings, Suresh et al. 2018): a node's successor on each ring is whom it probes and gossips to,
and the union of the rings is a random graph of low diameter.

Pure: no IO. Not thread-safe.
"""

from __future__ import annotations

import bisect

_M64 = 2**64 - 1


def ring_key(ring: int, node_id: str) -> int:
    """Where ``node_id`` sits on ring ``ring``: splitmix64 of the id and the ring's number, the
    same in every process (unlike ``hash``)."""
    z = (int(node_id, 16) + (ring + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def phase(node_id: str) -> float:
    """Where in each probe period ``node_id`` is probed, as a fraction in [0, 1): the same in
    every process, spread evenly over the members (a hash of its own, not a ring's)."""
    return ring_key(-2, node_id) / 2**64


class Rings:
    """``count`` rings of node ids, each in its own pseudo-random order, kept sorted as members
    come and go (O(log N) to find, one list insert each)."""

    def __init__(self, me: str, count: int) -> None:
        self._me = me
        self._rings: list[list[tuple[int, str]]] = [[(ring_key(j, me), me)] for j in range(count)]

    def add(self, node_id: str) -> None:
        for j, ring in enumerate(self._rings):
            entry = (ring_key(j, node_id), node_id)
            at = bisect.bisect_left(ring, entry)
            if at == len(ring) or ring[at] != entry:
                ring.insert(at, entry)

    def remove(self, node_id: str) -> None:
        for j, ring in enumerate(self._rings):
            entry = (ring_key(j, node_id), node_id)
            at = bisect.bisect_left(ring, entry)
            if at < len(ring) and ring[at] == entry:
                del ring[at]

    def successor(self, ring: int, skip: set[str] | frozenset[str] = frozenset()) -> str | None:
        """The first id after ours on ring ``ring`` that is not in ``skip`` (None if none)."""
        entries = self._rings[ring]
        at = bisect.bisect_left(entries, (ring_key(ring, self._me), self._me))
        for step in range(1, len(entries)):
            node_id = entries[(at + step) % len(entries)][1]
            if node_id not in skip:
                return node_id
        return None

    def successors(self) -> list[str]:
        """Our successor on each ring (empty while we are alone)."""
        out = []
        for j, ring in enumerate(self._rings):
            if len(ring) > 1:
                at = bisect.bisect_left(ring, (ring_key(j, self._me), self._me))
                out.append(ring[(at + 1) % len(ring)][1])
        return out
