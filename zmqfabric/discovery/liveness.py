"""Liveness: SWIM over the nodes' control endpoints (the protocol: :mod:`zmqfabric.core.swim`;
the messages: :mod:`.swim`; admitting nodes heard of second-hand: :mod:`.admission`).

mDNS cannot tell that a peer died: a SIGKILLed process sends no goodbye. So each node, once per
period, probes one member through its control endpoint, taking turns over its successors on the
PROBE_SPREAD rings (connections it keeps and watches); a silent member is tried through a few
others, then suspect, then dead unless it refutes in time. A member whose host refuses a connect
to its control port is dead at once, and a kept connection that drops is checked so at once.
News travels as gossip on probes and answers and, while there is some, to the ring successors
every GOSSIP_INTERVAL_S. A node's work and sockets do not grow with the fabric: about one probe
sent and one answered per period, PROBE_SPREAD kept connections, a few short-lived ones
(:class:`~.probes.Prober`), a member table that costs memory only. Timeouts follow the answer
times seen: a loaded host slows the verdicts, not the fabric.

A dead member is removed from the directory and kept as a *former* for ``former_keep_s``, probed
now and then and admitted again if it answers: a partition heals when the link comes back.
Beyond that, mDNS finds it again (:meth:`Rediscovery.requery`).

Housekeeping thread only (:mod:`.housekeeping`); the control thread answers the liveness ops
with :attr:`Liveness.responder`, which only posts to this thread.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import zmq

from ..constants import (
    HEALTH_MAX,
    HELLO_LINGER_MS,
    LEAVE_FANOUT,
    MAX_GOSSIP,
    MAX_PIGGYBACK,
    MAX_VERIFYING,
    PROBE_TIMEOUT_INITIAL_S,
    PROBE_TIMEOUT_MAX_S,
    REQUERY_SENDERS,
    SUSPICION_RTO_MULT,
)
from ..core.records import NodeRecord
from ..core.swim import Effects, Kind, Member, Members, State, Update
from .admission import Admission, Rediscovery
from .gossip import in_scope
from .probes import REFUSED, Prober
from .swim import Local, Responder, Sender, decode_updates, is_inc

if TYPE_CHECKING:
    from .local import LocalNode

log = logging.getLogger(__name__)

__all__ = ["Liveness", "Rediscovery"]


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


class Liveness:
    """SWIM for one node. Housekeeping thread only (see the module docstring)."""

    def __init__(
        self,
        node: LocalNode,
        poller: zmq.Poller,
        discovery: Rediscovery,
        post: Callable[..., bool],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._node = node
        self._timing = node.config.liveness
        self._discovery = discovery
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self.local = Local(node)
        self.responder = Responder(node, self.local, self, post)
        self._members = Members(node.node_id, self._timing, self._rng)
        self._prober = Prober(node, poller, self._lost, self._refused, clock)
        self._ask = self._prober.request
        self._admission = Admission(node, self._members, self.local, self._ask, self._answer,
                                    self._effects, discovery, self.join, clock)
        self._probes: dict[str, _Probe] = {}  # node id -> its probe under way
        self._watched: dict[str, Member] = {}  # url -> the members we take turns probing
        self._nonces = itertools.count(1)
        now = clock()
        self._next_round = self._next_gossip = now
        self._next_former = now + self._timing.former_probe_s
        self._next_requery = now + self._timing.requery_s * self._rng.random()
        self._next_sync = now + self._timing.sync_s * self._rng.random()
        self._summary_due = now  # when the responder's copy of our member list is refreshed
        self._phase = self._rng.random() * self._timing.probe_interval_s
        self._health = 0
        self._members.floor = SUSPICION_RTO_MULT * self._rto()
        self._planned: float | None = None
        self._left = False

    # --- the directory (posted by membership) ---------------------------------------------------

    def join(self, record: NodeRecord) -> None:
        """``record``'s node is in the directory (joined or updated)."""
        if record.node_id == self._node.node_id or record.control is None:
            return
        inc = self._admission.incarnation(record.node_id)
        buried = self._members.former(record.node_id) is not None
        member = self._members.join(record, record.url(record.control), self._clock(), inc)
        self._changed()
        if buried and member.inc <= member.buried:
            # Back from the dead at the incarnation we buried it: tell it, so that it refutes
            # (and the "dead" still travelling about it cannot remove it again).
            self._probe(member, self._clock())

    def leave(self, record: NodeRecord) -> None:
        """``record``'s node left the directory (a goodbye, or our own removal). A goodbye is
        passed on as gossip: mDNS is multicast, and a node may have missed it."""
        member = self._members.leave(record.node_id)
        if member is not None and member.node_id == record.node_id:
            self.local.add([member.update(Kind.LEFT, self._node.node_id)])
        self._changed()

    # --- sockets and time ------------------------------------------------------------------

    def on_readable(self, sock: zmq.Socket) -> bool:
        return self._prober.on_readable(sock)

    def next_deadline(self) -> float:
        """When :meth:`tick` has work next (monotonic)."""
        if self._left:
            return self._clock() + 3600.0
        times = [self._next_round, self._next_requery, self._next_sync]
        for probe in self._probes.values():
            times.append(probe.ends if probe.asked else probe.indirect_at)
        suspect = self._members.next_deadline()
        if suspect is not None:
            times.append(suspect)
        if self.local.news() and len(self._members):
            times.append(self._next_gossip)
        if self._members.formers():
            times.append(self._next_former)
        when = self._prober.next_deadline()
        if when is not None:
            times.append(when)
        self._planned = min(times)
        return self._planned

    def tick(self) -> None:
        """Do what is due: call after reading the sockets, at least by :meth:`next_deadline`."""
        if self._left:
            return
        now = self._clock()
        if self._planned is not None and now - self._planned > self._rto():
            self._sick()  # we slept through our own deadline: this host is overloaded
        self._planned = None
        self._members.floor = SUSPICION_RTO_MULT * self._rto()
        self._prober.expire(now)
        for probe in list(self._probes.values()):
            if now >= probe.ends:
                self._finish(probe)
            elif not probe.asked and now >= probe.indirect_at:
                self._indirect(probe, now)
        if now >= self._next_round:
            self._round(now)
        self._effects(self._members.expire(now), "no answer")
        if now >= self._next_gossip and self.local.news():
            self._next_gossip = now + self._timing.gossip_interval_s
            self._spread()
        if now >= self._next_former:
            self._next_former = now + self._timing.former_probe_s
            self._admission.look_for_former()
        if now >= self._next_requery:
            self._next_requery = now + self._timing.requery_s
            if self._rng.random() < REQUERY_SENDERS / (len(self._members) + 1):
                self._discovery.requery()
        if now >= self._next_sync:
            self._next_sync = now + self._timing.sync_s
            self._admission.sync(self._probe_body)
        if now >= self._summary_due:
            self._summary_due = float("inf")
            self.responder.summary = self._members.summary()
        self._prober.close_idle(now)

    def leave_fabric(self) -> None:
        """Tell a few members that we leave (they spread it), then close our connections and
        stop probing. Idempotent."""
        if self._left:
            return
        self._left = self.local.leaving = True
        if self._node.advertised:
            left = self.local.me()
            left = Update(Kind.LEFT, left.node_id, left.inc, left.name, left.url, left.key)
            for member in self._members.targets()[:LEAVE_FANOUT]:
                body = self._probe_body(member)
                body["g"] = [left.encode()]
                self._prober.send(member.url, member.record.curve_key, body)
        self._prober.close(HELLO_LINGER_MS)

    def close(self) -> None:
        self._prober.close()

    # --- posted by the control thread (the responder's listener) -----------------------------

    def heard(self, updates: list[Update], refused: int, refuted: bool,
              sender: Sender | None, key: str | None) -> None:
        if refused:
            self._node.counters.add("refused_gossip", refused)
        if refuted:
            self._refuted()
        self._apply(updates)
        if sender is not None:
            if self._members.get(sender.node_id) is not None:
                self._effects(self._members.acked(sender.node_id, sender.inc, self._clock()))
            else:
                former = self._members.former(sender.node_id)
                self._admission.verify(sender.url, key, sender.node_id, former)

    def synced(self, raw: object) -> None:
        self._admission.synced(raw)

    def relayed(self, nonce: int, node_id: str, inc: int) -> None:
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
                "from": self.local.sender(), "g": self.local.take(MAX_PIGGYBACK)}

        def answered(reply: Any) -> None:
            inc = self._answer(target.node_id, reply)
            if inc is not None:
                self._prober.send(reply_url, reply_key, {
                    "op": "probe-ack", "nonce": nonce, "id": target.node_id, "inc": inc,
                    "g": self.local.take(MAX_PIGGYBACK)})

        def silent() -> None:
            # We could not reach it either: our own suspicion, which confirms the asker's,
            # unless its host still accepts connections (then it is only slow).
            member = self._members.get(target.node_id)
            if member is not None:
                self._check(member, functools.partial(self._unreachable, member))

        self._ask(target.url, target.key, body, 2 * self._rto(), answered, silent)

    # --- probing ---------------------------------------------------------------------------------

    def _round(self, now: float) -> None:
        """Start this period's probe: the turn of one of the members after us on the ring."""
        interval = self._timing.probe_interval_s
        wall = self._wall()
        round_no = math.floor((wall - self._phase) / interval)
        boundary = (round_no + 1 + self._health) * interval + self._phase
        self._next_round = now + max(interval / 2, boundary - wall)
        targets = self._members.targets()
        watched = {m.url: m for m in targets}
        if watched.keys() != self._watched.keys():
            self._prober.watch({url: m.record.curve_key for url, m in watched.items()})
        self._watched = watched
        if targets:
            self._probe(targets[round_no % len(targets)], now)

    def _lost(self, url: str) -> None:
        """A watched connection dropped: is its port closed? Probe that member now anyway, not
        at its turn."""
        member = self._watched.get(url)
        if member is not None and self._members.get(member.node_id) is member:
            self._check(member)
            self._probe(member, self._clock())

    def _check(self, member: Member,
               then: Callable[[bool], object] | None = None) -> None:
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
                then(closed is False)

        self._prober.check_port(member.url, result)

    def _unreachable(self, member: Member, listening: bool) -> None:
        """A probe we made for another member went unanswered: our own suspicion, unless the
        member's host still accepts connections (a live process, only slow)."""
        if not listening:
            self._effects(self._members.failed(member.node_id, self._clock()))

    def _refused(self, url: str) -> None:
        member = self._watched.get(url)
        if member is not None:
            self._members.refused(member.node_id)

    def _probe(self, member: Member, now: float, accuse: int | None = None) -> None:
        """Probe ``member`` (accusing it at ``accuse``, if given, so that it refutes)."""
        if member.node_id in self._probes:
            return
        timeout = self._rto() * (1 + self._health)
        probe = _Probe(member, now + 3 * timeout, now + timeout, next(self._nonces))
        body = self._probe_body(member)
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

        if self._ask(member.url, member.record.curve_key, body, probe.ends - now, answered):
            self._probes[member.node_id] = probe

    def _indirect(self, probe: _Probe, now: float) -> None:
        target = probe.member
        self._check(target, lambda listening: setattr(probe, "listening", listening))
        helpers = self._members.helpers(target.node_id, self._timing.indirect_probes)
        probe.asked = True
        control = self._node.record.control
        if control is None:
            return
        body = {"op": "probe-req", "nonce": probe.nonce, "port": control.port,
                "target": [target.node_id, target.record.name, target.url,
                           target.record.curve_key, target.inc],
                "from": self.local.sender(), "g": self.local.take(MAX_PIGGYBACK)}
        for helper in helpers:
            self._ask(helper.url, helper.record.curve_key, body, probe.ends - now,
                      functools.partial(self._answer, helper.node_id))

    def _finish(self, probe: _Probe) -> None:
        del self._probes[probe.member.node_id]
        if probe.acked:
            self._health = max(0, self._health - 1)
            return
        member = probe.member
        log.debug("%s: no answer from %s (rto %.3f, health %d, srtt %s)", self._node.name,
                  member.record.name, self._rto(), self._health, self._prober.rtt.srtt)
        self._effects(self._members.failed(member.node_id, self._clock(), probe.listening))
        if self._members.get(member.node_id) is member and member.state is State.SUSPECT:
            self._probe(member, self._clock())  # tell it (Lifeguard's buddy system): it refutes

    def _probe_body(self, member: Member) -> dict[str, Any]:
        accused = member.state is not State.ALIVE or member.inc <= member.buried
        return {"op": "probe", "to": [member.node_id, member.inc, accused],
                "from": self.local.sender(), "g": self.local.take(MAX_PIGGYBACK)}

    def _rto(self) -> float:
        """How long to wait for an answer now (see :class:`~zmqfabric.core.swim.RoundTrip`)."""
        floor = self._timing.probe_timeout_s
        return self._prober.rtt.timeout(floor, PROBE_TIMEOUT_MAX_S,
                                        max(floor, PROBE_TIMEOUT_INITIAL_S))

    def _answer(self, node_id: str, reply: Any) -> int | None:
        """Take an answer's gossip; its sender's incarnation if it is ``node_id``, else None.
        (An error reply, from a node too old to know these ops, still shows it is alive.)"""
        if not isinstance(reply, dict):
            return None
        self.apply_wire(reply.get("g"))
        member = self._members.get(node_id)
        inc = reply.get("inc")
        if reply.get("id") != node_id or not is_inc(inc):
            if "type" in reply and "message" in reply and member is not None:
                return member.inc  # an error reply: alive, old
            return None
        self._effects(self._members.acked(node_id, inc, self._clock()))
        return inc

    def _spread(self) -> None:
        """Send the pending news to our successors on the rings (kept connections); their
        answers bring theirs back."""
        news = self.local.take(MAX_GOSSIP)
        for member in self._members.targets() if news else ():
            body = self._probe_body(member)
            body["g"] = news
            self._ask(member.url, member.record.curve_key, body, self._timing.probe_interval_s,
                      functools.partial(self._answer, member.node_id))

    # --- applying -------------------------------------------------------------------------------

    def apply_wire(self, raw: object) -> None:
        """Take the gossip of a message (its ``g``)."""
        updates, refused = decode_updates(raw)
        if refused:
            self._node.counters.add("refused_gossip", refused)
        self._apply(updates)

    def _apply(self, updates: list[Update]) -> None:
        now = self._clock()
        me = self._node.node_id
        for update in updates:
            if update.node_id == me:
                if self.local.consider(update):
                    self._refuted()
            else:
                self._effects(self._members.apply(update, now), "gossip")

    def _effects(self, out: Effects, source: str = "") -> None:
        self.local.add(out.gossip)
        for member, why in out.removed:
            if why == "dead":
                self._node.counters.add("peers_lost")
                log.info("%s: node %s (%s) is gone: %s", self._node.name,
                         member.record.name, member.record.address, source)
            self._node.directory.remove(member.record.name, member.node_id)
            self._discovery.reverify(member.record)
        if out.removed:
            self._changed()
        for former in out.forgotten:
            # No longer looked for: if it comes back, its next mDNS answer must be news.
            self._discovery.forget(former.record)
        for update in out.verify:
            self._admission.verify(update.url, update.key, update.node_id)
        if out.confirm:
            chance = 2 * self._timing.confirmations / max(1, len(self._members))
            now = self._clock()
            for member, inc in out.confirm:
                if self._rng.random() < chance:
                    self._probe(member, now, accuse=inc)

    def _refuted(self) -> None:
        self._node.counters.add("refutations")
        log.info("%s: refuted a suspicion about this node (incarnation %d)", self._node.name,
                 self.local.inc)
        self._sick()

    def _sick(self) -> None:
        self._health = min(HEALTH_MAX, self._health + 1)

    def _changed(self) -> None:
        self.local.sized(len(self._members))
        self.responder.known = self._members.alive_ids()
        if self._summary_due == float("inf"):  # refreshed at most once a second
            self._summary_due = self._clock() + 1.0
