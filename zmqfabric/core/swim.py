"""SWIM membership without IO: who is alive, suspect or dead, and what to gossip about it.

The protocol is SWIM (Das, Gupta, Motivala 2002) with the Lifeguard refinements that HashiCorp's
memberlist uses (Dadgar et al. 2018): each protocol period a node probes one member; on a miss
(``probe_timeout_s``) it asks ``indirect_probes`` others to probe it; with no answer within three
times ``probe_timeout_s`` the member is *suspect*, and *dead* unless it refutes in time (log10 of
the fabric's size, shrinking from ``suspicion_max_factor`` times that as others independently
confirm the suspicion: Lifeguard's dynamic suspicion). A member refutes by raising its
*incarnation*: ``alive(n)`` overrides ``suspect(m)`` and ``dead(m)`` for n > m, and only the
member itself raises its own number. Updates travel as gossip piggybacked on probes and their
answers, each sent about ``retransmit_mult * log10(N + 1)`` times, the least sent first.

What is not SWIM: a node does not pick a random member to probe, nor random members to gossip
to. Members sit on PROBE_SPREAD rings, each ordered by its own hash of the node ids (as in
Rapid, Suresh et al. 2018); a node probes its successor on ring ``r mod PROBE_SPREAD`` in period
``r`` (periods follow the wall clock, so every node uses the same ring in a period and every
member is probed by exactly one node each period: a random choice leaves a member unprobed with
probability 1/e, and 30 dead nodes are then all found only after about four periods), and pushes
each update once to each of its successors on all rings. So a node keeps PROBE_SPREAD
connections open and reuses them, and news crosses the union of the rings, a random graph of
degree 2 * PROBE_SPREAD, in O(log N) hops. Members that die become *formers*: kept for
``former_keep_s`` and probed now and then, so a partition heals when the link comes back.

The updates and their queue: :mod:`.updates`; the timers (configured, the answer-time estimate,
the suspicion time): :mod:`.timers`; the rings: :mod:`.rings`.

Trust: gossip is a hint. An ``alive`` update about a node this node does not hold as a member
never admits it: it asks the caller to verify the node directly (:attr:`Effects.verify`).
Suspicions, deaths and leaves are taken from gossip, and refuted by the node concerned.

Pure: no IO, threads or clock; every method takes ``now`` (monotonic seconds). Not thread-safe.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any

from .. import constants as C
from .records import NodeRecord
from .rings import Rings
from .timers import RoundTrip, Timing, suspicion_timeout
from .updates import Kind, Update

__all__ = ["NOTHING", "Effects", "Kind", "Member", "Members", "RoundTrip", "State", "Timing",
           "Update"]


class State(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(slots=True)
class Member:
    """A node this node holds: a member (alive, suspect) or a former one (dead)."""

    record: NodeRecord
    url: str
    state: State = State.ALIVE
    inc: int = 0
    since: float = 0.0
    #: Suspect: node ids that suspect it (the first is who started it). Dead: unused.
    suspecters: list[str] = field(default_factory=list)
    #: The peer refused our key in the handshake: alive, not ours to probe.
    refused: bool = False
    #: The incarnation at which we last found it dead (-1: never). It came back since, so
    #: suspicions and deaths at that incarnation or older are old news.
    buried: int = -1
    #: We learned its incarnation from it (an answer, its ``alive``), not only from its record:
    #: until then an accusation may be about an incarnation it already refuted.
    known: bool = False
    #: It missed our probes while its host still accepted connections at its port (see failed).
    slow: bool = False
    #: The incarnation at which a stale "dead" about it last asked for a port check (-1: never).
    checked: int = -1

    @property
    def node_id(self) -> str:
        return self.record.node_id

    def update(self, kind: Kind, me: str) -> Update:
        origin = me if kind is Kind.SUSPECT else ""
        return Update(kind, self.node_id, self.inc, self.record.name, self.url,
                      self.record.curve_key, origin)


@dataclass(slots=True)
class Effects:
    """What the caller must do after a call: gossip ``gossip``; remove ``removed`` from the
    directory (the dead ones are kept as formers); verify ``verify`` directly (alive updates
    about nodes we do not hold); maybe probe ``confirm`` now, each member accused at the
    incarnation given (new suspects: a probe that fails is an independent confirmation); ask the
    hosts of ``check`` whether anything still listens at their control port (a "dead" about an
    older incarnation than ours: see :meth:`Members.apply`); and let discovery find
    ``forgotten`` (formers no longer looked for) again by itself."""

    gossip: list[Update] = field(default_factory=list)
    removed: list[tuple[Member, str]] = field(default_factory=list)
    verify: list[Update] = field(default_factory=list)
    confirm: list[tuple[Member, int]] = field(default_factory=list)
    check: list[Member] = field(default_factory=list)
    forgotten: list[Member] = field(default_factory=list)


#: What a call that changes nothing returns (most updates of a death storm), shared: no six lists
#: built per update. Its fields are empty tuples: an append to it fails instead of leaking.
NOTHING: Effects = Effects(*([()] * 6))  # type: ignore[arg-type]


class Members:
    """The member table of node ``me`` (its node id). See the module docstring."""

    def __init__(self, me: str, timing: Timing, rng: random.Random | None = None) -> None:
        self.me = me
        self.timing = timing
        self.rng = rng or random.Random()
        self._members: dict[str, Member] = {}
        self._suspects: dict[str, Member] = {}  # the members that are suspect
        self._formers: dict[str, Member] = {}
        self._rings = Rings(me, C.PROBE_SPREAD)  # of the members we probe (not refused)
        #: The least time (s) a suspect gets, whatever N: set from the answer times seen.
        self.floor = 0.0

    def __len__(self) -> int:
        """Members (alive and suspect), not counting this node."""
        return len(self._members)

    def get(self, node_id: str) -> Member | None:
        return self._members.get(node_id)

    def former(self, node_id: str) -> Member | None:
        return self._formers.get(node_id)

    def formers(self) -> int:
        return len(self._formers)  # in the order they died (see expire)

    def alive_ids(self) -> frozenset[str]:
        # Members are alive or suspect, and _suspects holds the suspect ones (see _set): a set
        # difference in C, not a Python loop over every member (called on every change).
        return frozenset(self._members.keys() - self._suspects.keys())

    def summary(self) -> list[list[Any]]:
        """Every member as ``alive`` on the wire, then the latest formers as ``dead``, MAX_SYNC
        in all (anti-entropy: a node that missed a death learns it at the next swap)."""
        out = [m.update(Kind.ALIVE, self.me).encode() for m in self._members.values()]
        room = C.MAX_SYNC - len(out)
        if room > 0 and self._formers:
            recent = sorted(self._formers.values(), key=lambda f: f.since, reverse=True)
            out += [f.update(Kind.DEAD, self.me).encode() for f in recent[:room]]
        return out[:C.MAX_SYNC]

    def merge(self, update: Update, now: float) -> Effects:
        """Take an entry of a peer's member list (anti-entropy): the peer holds ``update``'s
        node as a member at ``update.inc``. A later incarnation of a member is taken as its
        ``alive``; a node we do not hold, or buried, is a hint to verify (the caller reports a
        buried one dead again if it does not answer)."""
        if update.node_id == self.me:
            return NOTHING
        member = self._members.get(update.node_id)
        if member is not None:
            return self.apply(update, now) if update.inc > member.inc else NOTHING
        return Effects(verify=[update]) if update.url else NOTHING

    def suspects(self) -> list[Member]:
        return list(self._suspects.values())

    def join(self, record: NodeRecord, url: str, now: float, inc: int | None = None) -> Member:
        """``record``'s node is in the directory: a member (again), alive at ``inc`` (what the
        node told us, if it did) or above what we knew."""
        known = self._members.get(record.node_id) or self._formers.pop(record.node_id, None)
        if known is None:
            member = Member(record, url, State.ALIVE, inc or 0, now, known=inc is not None)
        else:
            member = known
            member.record, member.url = record, url
            if member.state is State.DEAD:
                self._set(member, State.ALIVE, now)
                member.buried = member.inc
            if inc is not None:
                member.inc, member.known = max(member.inc, inc), True
        if record.node_id not in self._members:
            self._members[record.node_id] = member
            if not member.refused:
                self._rings.add(record.node_id)
        return member

    def leave(self, node_id: str) -> Member | None:
        """``node_id`` left the directory. One still a member here left cleanly (a goodbye): it
        is dropped and returned (to gossip its leave); the dead are formers already."""
        member = self._members.pop(node_id, None)
        if member is not None:
            self._rings.remove(node_id)
            self._suspects.pop(node_id, None)
        return member

    # --- probing -------------------------------------------------------------------------------

    def targets(self) -> list[Member]:
        """The members this node probes in turn and gossips to: its successor on each ring
        (each one once)."""
        return [self._members[i] for i in dict.fromkeys(self._rings.successors())]

    def target(self, round_no: int, busy: set[str] | frozenset[str] = frozenset()) -> Member | None:
        """The member to probe in period ``round_no``: our successor on ring ``round_no`` mod
        PROBE_SPREAD (every node uses the same ring in a period: every member is probed by
        exactly one node). Members in ``busy`` (being probed already) and members we suspect
        ourselves are skipped for the next on that ring: so a node cut off from the others
        suspects all its members within a few periods, not only its successors."""
        skip = set(busy)
        skip.update(i for i, m in self._suspects.items() if self.me in m.suspecters)
        node_id = self._rings.successor(round_no % C.PROBE_SPREAD, skip)
        return None if node_id is None else self._members[node_id]

    def helpers(self, exclude: str, count: int) -> list[Member]:
        """Up to ``count`` random members (not ``exclude``) to probe a member for us."""
        pool = [m for i, m in self._members.items() if i != exclude and not m.refused
                and m.state is State.ALIVE]
        return self.rng.sample(pool, min(count, len(pool)))

    def random_former(self) -> Member | None:
        if not self._formers:
            return None
        return self._formers[self.rng.choice(list(self._formers))]

    def acked(self, node_id: str, inc: int, now: float) -> Effects:
        """``node_id`` answered us at incarnation ``inc`` (directly, or through a helper)."""
        member = self._members.get(node_id)
        if member is None or inc < member.inc:
            return NOTHING
        out = NOTHING
        if member.state is State.SUSPECT and inc > member.inc:
            out = Effects()
            self._set(member, State.ALIVE, now)
            member.inc = inc
            out.gossip.append(member.update(Kind.ALIVE, self.me))  # its refutation, relayed
        member.inc = inc
        member.refused = member.slow = False
        member.known = True
        return out

    def refused(self, node_id: str) -> None:
        """``node_id`` refused our key: alive, but we stop probing it."""
        member = self._members.get(node_id)
        if member is not None and not member.refused:
            member.refused = True
            self._rings.remove(node_id)

    def failed(self, node_id: str, now: float, listening: bool = False) -> Effects:
        """Neither ``node_id`` nor anyone we asked got an answer from it within a period.
        ``listening``: its host still accepts connections at its control port, so the process
        is there, only slow (or hung): it gets at least SLOW_PEER_S to answer."""
        out = Effects()
        member = self._members.get(node_id)
        if member is None:
            return out
        member.slow = member.slow or listening
        if member.state is State.ALIVE:
            self._suspect(member, self.me, now)
        elif self.me in member.suspecters:
            return out
        else:
            member.suspecters.append(self.me)  # we confirm someone else's suspicion
        out.gossip.append(member.update(Kind.SUSPECT, self.me))
        return out

    def dead(self, node_id: str, now: float) -> Effects:
        """``node_id`` is dead for certain (nothing listens at its address any more: its process
        is gone, it cannot refute): no suspicion."""
        out = Effects()
        member = self._members.get(node_id)
        if member is not None:
            self._remove(member, Kind.DEAD, now, out)
            out.gossip.append(member.update(Kind.DEAD, self.me))
        return out

    # --- gossip --------------------------------------------------------------------------------

    def apply(self, update: Update, now: float) -> Effects:
        """Take one update heard from a peer. Updates about this node are the caller's to
        refute (see :func:`refutes`); they are ignored here.

        A suspicion about a member whose incarnation we never heard from it (it joined our
        table from its record) starts no timer here: it may be about an incarnation the member
        already refuted before we knew it. It only asks for a confirmation probe, whose failure
        makes it our own suspicion. Deaths are taken as they come (the member refutes).

        A death at an older incarnation than ours (or one we buried) may be a real death found by
        a node that missed a refutation, and only ring predecessors probe a member: so we ask
        once per incarnation (``check``) whether its port still listens; a process that is gone
        is then dead at our incarnation, which counts everywhere."""
        if update.node_id == self.me:
            return NOTHING
        member = self._members.get(update.node_id)
        if member is None:
            former = self._formers.get(update.node_id)
            if former is not None and update.kind is Kind.LEFT and update.inc >= former.inc:
                del self._formers[update.node_id]  # gone for good: stop looking for it
            elif update.kind is Kind.ALIVE and update.url and (
                former is None or update.inc > former.inc
            ):
                return Effects(verify=[update])
            return NOTHING
        if update.inc < member.inc or (update.kind in (Kind.SUSPECT, Kind.DEAD)
                                       and update.inc <= member.buried):
            if update.kind is Kind.DEAD and member.checked < member.inc:
                member.checked = member.inc
                return Effects(check=[member])
            return NOTHING
        if update.kind is Kind.SUSPECT and not member.known and member.state is State.ALIVE:
            return Effects(confirm=[(member, update.inc)])
        out = Effects()
        if update.kind is Kind.ALIVE:
            member.known = True
            if update.inc > member.inc:
                member.inc = update.inc
                if member.state is State.SUSPECT:
                    self._set(member, State.ALIVE, now)
                out.gossip.append(update)
        elif update.kind is Kind.SUSPECT:
            origin = update.origin or update.node_id
            if member.state is State.ALIVE or update.inc > member.inc:
                member.inc = update.inc
                self._suspect(member, origin, now)
                out.gossip.append(update)
                out.confirm.append((member, update.inc))
            elif origin not in member.suspecters:  # an independent confirmation
                member.suspecters.append(origin)
                out.gossip.append(update)
        else:
            member.inc = update.inc
            self._remove(member, update.kind, now, out)
            out.gossip.append(update)
        return out

    # --- time ----------------------------------------------------------------------------------

    def suspicion_timeout(self, confirmations: int) -> float:
        """See :func:`~.timers.suspicion_timeout`, for this table's size and floor."""
        return suspicion_timeout(self.timing, len(self._members) + 1, self.floor, confirmations)

    def deadline(self, member: Member) -> float:
        timeout = self.suspicion_timeout(len(member.suspecters) - 1)
        return member.since + (max(timeout, C.SLOW_PEER_S) if member.slow else timeout)

    def expire(self, now: float) -> Effects:
        """Suspects whose time ran out die; formers kept long enough are forgotten. Only a
        suspicion of our own runs out here (we failed to reach the member ourselves); one we only
        heard of waits for its "dead" or its refutation (the member's probers on the rings each
        reach it every few periods, so someone with evidence decides)."""
        out = NOTHING
        for member in self._own_suspects():
            if now >= self.deadline(member):
                out = Effects() if out is NOTHING else out
                self._remove(member, Kind.DEAD, now, out)
                out.gossip.append(member.update(Kind.DEAD, self.me))
        if self._formers and now - next(iter(self._formers.values())).since > (
                keep := self.timing.former_keep_s):  # the oldest first (see _remove)
            out = Effects() if out is NOTHING else out
            for node_id in [i for i, f in self._formers.items() if now - f.since > keep]:
                out.forgotten.append(self._formers.pop(node_id))
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has work next (suspects only; formers are not urgent)."""
        times = [self.deadline(m) for m in self._own_suspects()]
        return min(times) if times else None

    def _own_suspects(self) -> list[Member]:
        return [m for m in self._suspects.values() if self.me in m.suspecters]

    # --- internals -----------------------------------------------------------------------------

    def _suspect(self, member: Member, origin: str, now: float) -> None:
        self._set(member, State.SUSPECT, now, [origin])

    def _set(self, member: Member, state: State, now: float,
             suspecters: list[str] | None = None) -> None:
        member.state, member.since, member.suspecters = state, now, suspecters or []
        if state is State.SUSPECT:
            self._suspects[member.node_id] = member
        else:
            self._suspects.pop(member.node_id, None)
            member.slow = False  # a suspicion's verdict: the next one starts afresh

    def _remove(self, member: Member, kind: Kind, now: float, out: Effects) -> None:
        del self._members[member.node_id]
        self._rings.remove(member.node_id)
        self._suspects.pop(member.node_id, None)
        if kind is Kind.DEAD:
            self._set(member, State.DEAD, now)
            self._formers[member.node_id] = member
            while len(self._formers) > C.MAX_FORMERS:
                oldest = min(self._formers.values(), key=lambda f: f.since)
                out.forgotten.append(self._formers.pop(oldest.node_id))
        out.removed.append((member, "left" if kind is Kind.LEFT else "dead"))
