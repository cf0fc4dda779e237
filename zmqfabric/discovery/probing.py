"""One member's probe, from the first request to the verdict (SWIM's failure detector; the
protocol: :mod:`zmqfabric.core.swim`), and the prober's own state: how long answers take and
Lifeguard's local health.

A probe asks the member directly; after one answer timeout (:meth:`Probing.rto`, stretched by
the node's local health) it checks the member's control port (a TCP connect: "refused" is certain
death, an accepted connect a process that is there, only slow) and, unless it is closed, asks
``indirect_probes`` others to try (``probe-req``); with no answer after three timeouts the member
fails (our suspicion, or our confirmation of another's), and is probed again at once so that it
learns it and refutes (Lifeguard's buddy system). A member that asked us to probe another is told
if it answers (``probe-ack``), and a silence we find ourselves is our own suspicion.

Local health (Lifeguard): a node that wakes up later than it planned, or has to refute, is
probably the slow one; it waits up to (1 + HEALTH_MAX) times longer for answers instead of
accusing others (its probe periods stay: on the rings, a period a node skips is a period in which
nobody probes one member). Each answered probe eases it by one, and so does each period with
neither, so a node cut off from every other (no answers at all) is not stretched for good.

The least time a suspect gets to refute is SUSPICION_RTO_MULT answer timeouts as measured, or
of ``probe_timeout_s`` before any answer came (:meth:`Probing.settled_rto`): a node that has
timed nothing yet waits PROBE_TIMEOUT_INITIAL_S for an answer, as TCP does, but does not make
its suspects wait four times that (a node cut off right after it started took 12 s per
unconfirmed suspicion). A live but slow process is told apart by its port (SLOW_PEER_S).

Housekeeping thread only (:mod:`.liveness` owns it). Not thread-safe.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..constants import (
    HEALTH_MAX,
    MAX_PIGGYBACK,
    MAX_VERIFYING,
    PROBE_TIMEOUT_INITIAL_S,
    PROBE_TIMEOUT_MAX_S,
)
from ..core.swim import Effects, Member, Members, State, Update
from .gossip import in_scope
from .hints import on_loopback
from .probes import REFUSED, Prober
from .swim import Local

if TYPE_CHECKING:
    from .local import LocalNode

log = logging.getLogger(__name__)

__all__ = ["Probing"]


@dataclass(slots=True)
class _Probe:
    """One member being probed: directly, then through helpers, until ``ends``."""

    member: Member
    ends: float
    indirect_at: float
    nonce: int
    acked: bool = False
    asked: bool = False  # helpers were asked to probe it for us
    listening: bool = False  # its host accepted a connect at its port meanwhile
    checked: bool = False  # the port check has answered


class Probing:
    """The probes under way of one node. Housekeeping thread only."""

    def __init__(self, node: LocalNode, members: Members, prober: Prober, local: Local,
                 answer: Callable[[str, Any], int | None],
                 effects: Callable[..., None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``answer(node_id, reply)`` takes an answer (its gossip, and the node's incarnation if
        it is ``node_id``, else None); ``effects(out, source)`` carries out what the member
        table asks."""
        self._node = node
        self._timing = node.config.liveness
        self._members = members
        self._prober = prober
        self._local = local
        self._answer = answer
        self._effects = effects
        self._clock = clock
        self._probes: dict[str, _Probe] = {}  # node id -> its probe under way
        self._nonces = itertools.count(1)
        #: Lifeguard's local health: 0 (healthy) to HEALTH_MAX.
        self.health = 0
        self._health_moved = False  # health changed this period

    def busy(self) -> set[str]:
        """The members being probed now."""
        return set(self._probes)

    def deadlines(self) -> list[float]:
        return [p.ends if p.asked else p.indirect_at for p in self._probes.values()]

    def tick(self, now: float) -> None:
        """Ask helpers, or end probes, as their time comes."""
        for probe in list(self._probes.values()):
            if now >= probe.ends:
                self._finish(probe)
            elif not probe.asked and now >= probe.indirect_at:
                self._indirect(probe, now)

    def period(self) -> None:
        """A probe period begins: health eases by one if nothing moved it in the last one."""
        if not self._health_moved:
            self.health = max(0, self.health - 1)
        self._health_moved = False

    def sick(self) -> None:
        """This node is probably the slow one (it woke up late, or had to refute): wait longer
        for answers."""
        self.health = min(HEALTH_MAX, self.health + 1)
        self._health_moved = True

    def rto(self) -> float:
        """How long to wait for an answer now (see :class:`~zmqfabric.core.timers.RoundTrip`)."""
        floor = self._timing.probe_timeout_s
        return self._prober.rtt.timeout(floor, PROBE_TIMEOUT_MAX_S,
                                        max(floor, PROBE_TIMEOUT_INITIAL_S))

    def settled_rto(self) -> float:
        """The answer timeout as measured, or ``probe_timeout_s`` before any answer came (the
        unit of the least suspicion time; see the module docstring)."""
        floor = self._timing.probe_timeout_s
        return self._prober.rtt.timeout(floor, PROBE_TIMEOUT_MAX_S, floor)

    def body(self, member: Member, gossip: list[Any] | None = None) -> dict[str, Any]:
        """A probe of ``member`` (accusing it if we hold it suspect or buried it at its
        incarnation, so that it refutes), with ``gossip`` (on the wire), else our piggyback."""
        accused = member.state is not State.ALIVE or member.inc <= member.buried
        if gossip is None:
            gossip = self._local.take(MAX_PIGGYBACK)
        return {"op": "probe", "to": [member.node_id, member.inc, accused],
                "from": self._local.sender(), "g": gossip}

    def probe(self, member: Member, now: float, accuse: int | None = None) -> None:
        """Probe ``member`` (accusing it at ``accuse``, if given, so that it refutes), unless a
        probe of it is under way."""
        if member.node_id in self._probes:
            return
        timeout = self.rto() * (1 + self.health)
        probe = _Probe(member, now + 3 * timeout, now + timeout, next(self._nonces))
        body = self.body(member)
        if accuse is not None:
            body["to"] = [member.node_id, max(member.inc, accuse), True]

        def answered(reply: Any) -> None:
            if reply is REFUSED:
                self._members.refused(member.node_id)
            elif self._answer(member.node_id, reply) is None:
                return
            probe.acked = True
            if self._probes.get(member.node_id) is probe:
                self._finish(probe)

        if self._prober.request(member.url, member.record.curve_key, body, probe.ends - now,
                                answered):
            self._probes[member.node_id] = probe

    def check(self, member: Member, then: Callable[[bool], object] | None = None) -> None:
        """Ask the member's host whether anything still listens at its control port; if not,
        the member is dead now, without a suspicion (a process that is gone cannot refute).
        Otherwise ``then(listening)``: True if the host accepted (the process is there)."""

        def result(closed: bool | None) -> None:
            if self._members.get(member.node_id) is not member:
                return
            if closed:
                self._effects(self._members.dead(member.node_id, self._clock()),
                              "its control port is closed")
            elif then is not None:
                # On loopback the kernel answers a connect at once, taken or refused: no answer
                # means the process is too starved to take connections (its listen queue is
                # full) or we are; either way it is there (as for the verifier, hints.py).
                then(closed is False or _starved(member))

        self._prober.check_port(member.url, result)

    def relayed(self, nonce: int, node_id: str, inc: int) -> None:
        """A helper reached ``node_id`` for us (its ``probe-ack``)."""
        probe = self._probes.get(node_id)
        if probe is not None and probe.nonce == nonce:
            probe.acked = True
            self._effects(self._members.acked(node_id, inc, self._clock()))
            self._finish(probe)

    def probe_for(self, target: Update, reply_url: str, reply_key: str | None,
                  nonce: int) -> None:
        """Probe ``target`` for the member that asked, and tell it if the target answers."""
        if len(self._prober) >= MAX_VERIFYING or not in_scope(self._node, target.url):
            return
        body = {"op": "probe", "to": [target.node_id, target.inc, False],
                "from": self._local.sender(), "g": self._local.take(MAX_PIGGYBACK)}

        def answered(reply: Any) -> None:
            inc = self._answer(target.node_id, reply)
            if inc is not None:
                self._prober.send(reply_url, reply_key, {
                    "op": "probe-ack", "nonce": nonce, "id": target.node_id, "inc": inc,
                    "g": self._local.take(MAX_PIGGYBACK)})

        # Its port is checked meanwhile (the answer takes PORT_CHECK_S at most, less than the
        # probe's timeout), so a silence is judged at once.
        listening: list[bool] = []
        member = self._members.get(target.node_id)
        if member is not None:
            self.check(member, listening.append)

        def silent() -> None:
            # We could not reach it either: our own suspicion, which confirms the asker's,
            # unless its host still accepts connections (then it is only slow), or, on
            # loopback, the check has not answered yet (see check()).
            if member is None or any(listening) or (not listening and _starved(member)):
                return
            self._effects(self._members.failed(member.node_id, self._clock()))

        self._prober.request(target.url, target.key, body, 2 * self.rto(), answered, silent)

    # --- internals ---------------------------------------------------------------------------

    def _indirect(self, probe: _Probe, now: float) -> None:
        """The direct probe went unanswered: check the member's port, and unless it is closed
        (the process is gone: dead at once) ask helpers. The check comes first: in a death
        storm most of these members are dead, and helpers asked for nothing cost each of them
        a connection to the dead member and a port check of their own."""
        target = probe.member
        probe.asked = True

        def checked(listening: bool) -> None:
            probe.listening, probe.checked = listening, True
            if self._probes.get(target.node_id) is probe and not probe.acked:
                self._ask_helpers(probe)

        self.check(target, checked)

    def _ask_helpers(self, probe: _Probe) -> None:
        target = probe.member
        control = self._node.record.control
        if control is None:
            return
        helpers = self._members.helpers(target.node_id, self._timing.indirect_probes)
        body = {"op": "probe-req", "nonce": probe.nonce, "port": control.port,
                "target": [target.node_id, target.record.name, target.url,
                           target.record.curve_key, target.inc],
                "from": self._local.sender(), "g": self._local.take(MAX_PIGGYBACK)}
        left = probe.ends - self._clock()
        for helper in helpers:
            self._prober.request(helper.url, helper.record.curve_key, body, left,
                                 functools.partial(self._answer, helper.node_id))

    def _finish(self, probe: _Probe) -> None:
        del self._probes[probe.member.node_id]
        if probe.acked:
            self.health = max(0, self.health - 1)
            self._health_moved = True
            return
        member = probe.member
        log.debug("%s: no answer from %s within %.3f s (rto now %.3f, health %d, srtt %s)",
                  self._node.name, member.record.name, 1.5 * (probe.ends - probe.indirect_at),
                  self.rto(), self.health, self._prober.rtt.srtt)
        # A port check still unanswered on loopback: the host is starved, not the member dead
        # (check()); a dead process's port refuses at once.
        listening = probe.listening or (probe.asked and not probe.checked and _starved(member))
        out: Effects = self._members.failed(member.node_id, self._clock(), listening)
        self._effects(out, "no answer")
        if self._members.get(member.node_id) is member and member.state is State.SUSPECT:
            self.probe(member, self._clock())  # tell it (Lifeguard's buddy system): it refutes


def _starved(member: Member) -> bool:
    """A port check of ``member`` that has no answer means a starved host, not a dead process:
    on loopback, where a connect is answered at once (taken or refused)."""
    return on_loopback(member.record.address)
