"""Liveness: SWIM over the nodes' control endpoints (the protocol: :mod:`zmqfabric.core.swim`;
the messages: :mod:`.swim`; admitting nodes heard of second-hand: :mod:`.admission`).

mDNS cannot tell that a peer died: a SIGKILLed process sends no goodbye. So each node, once per
period, probes one member through its control endpoint, taking turns over its successors on the
PROBE_SPREAD rings (connections it keeps and watches); a silent member is tried through a few
others, then suspect, then dead unless it refutes in time. A member whose host refuses a connect
to its control port is dead at once, and a kept connection that drops is checked so at once.
News travels as gossip on probes and answers and, while there is some, is pushed to the ring
successors: suspicions and refutations at most every GOSSIP_INTERVAL_S, the rest (deaths,
leaves, joins) every GOSSIP_BATCH_S (the same by default; longer, fewer and fuller pushes where
a death storm is CPU-bound).
A node's work and sockets do not grow with the fabric: about one probe sent and one answered per
period, PROBE_SPREAD kept connections, a few short-lived ones
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
import logging
import math
import random
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq

from ..constants import (
    HELLO_LINGER_MS,
    LEAVE_FANOUT,
    REQUERY_SENDERS,
    SUSPICION_RTO_MULT,
    SYNC_FIRST_S,
)
from ..core.records import NodeRecord
from ..core.rings import phase
from ..core.swim import NOTHING, Effects, Kind, Member, Members, Update
from .admission import Admission, Rediscovery
from .probes import Prober
from .probing import Probing
from .swim import Local, Responder, Sender, decode_updates, is_inc

if TYPE_CHECKING:
    from .local import LocalNode

log = logging.getLogger(__name__)

__all__ = ["Liveness", "Rediscovery"]


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
        self._probing = Probing(node, self._members, self._prober, self.local, self._answer,
                                self._effects, clock)
        self._watched: dict[str, Member] = {}  # url -> the members we take turns probing
        now = clock()
        self._next_round = now
        # When we last pushed news (see Local.gossip_due): as if long ago, so the first news
        # goes at once, but finite: news can come before our first push (a refutation the
        # control thread queued), and -inf made next_deadline -inf, which ended the
        # housekeeping thread (an OverflowError at 250 nodes; that node's view froze).
        self._last_gossip = now - max(self._timing.gossip_interval_s, self._timing.gossip_batch_s)
        self._next_former = now + self._timing.former_probe_s
        self._next_requery = now + self._timing.requery_s * self._rng.random()
        self._next_sync = now + SYNC_FIRST_S * (1 + self._rng.random())
        self._synced = False  # a first swap happened (until then, tried every SYNC_FIRST_S)
        self._summary_due = now  # when the responder's copy of our member list is refreshed
        #: This period's probe, when its target's phase comes: (monotonic time, member).
        self._due: tuple[float, Member] | None = None
        #: One of the members we probe died: check the new ones at once (see tick).
        self._successor_died = False
        #: While a message's updates are applied (_apply), a removal defers _changed to the end:
        #: a death storm's gossip removes many members in one message.
        self._applying = False
        self._removed_while_applying = False
        self._members.floor = SUSPICION_RTO_MULT * self._probing.settled_rto()
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
            self._probing.probe(member, self._clock())
        elif self._prober.rtt.srtt is None and not self._probing.busy():
            # We have timed no answer yet, so each probe waits PROBE_TIMEOUT_INITIAL_S (1 s, as
            # TCP) and ends after three: probe the newcomer now, for a first answer time, not
            # at its turn (a cable pulled right after a young fabric converged was seen in 4.1 s
            # instead of 2, when the first probe of a node went to the cut one). One probe at a
            # time, and only until an answer is timed: a start among hundreds costs a few.
            self._probing.probe(member, self._clock())

    def leave(self, record: NodeRecord) -> None:
        """``record``'s node left the directory (a goodbye, or our own removal). A goodbye is
        passed on as gossip: mDNS is multicast, and a node may have missed it."""
        member = self._members.leave(record.node_id)
        if member is not None:  # else we removed it ourselves (dead): nothing changes now
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
        if self._successor_died:
            times.append(self._clock())
        if self._due is not None:
            times.append(self._due[0])
        times += self._probing.deadlines()
        suspect = self._members.next_deadline()
        if suspect is not None:
            times.append(suspect)
        if len(self._members):
            times.append(self.local.gossip_due(self._last_gossip))
        if self._members.formers():
            times.append(self._next_former)
        if self._summary_due != float("inf"):
            times.append(self._summary_due)
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
        planned, self._planned = self._planned, None
        if planned is not None and now - planned > self._probing.rto():
            self._probing.sick()  # we slept through our own deadline: this host is overloaded
        self._members.floor = SUSPICION_RTO_MULT * self._probing.settled_rto()
        if (planned is not None and now < planned and not self._successor_died
                and now < self.local.gossip_due(self._last_gossip)):
            return  # woken early (a post, an answer) and no timer is due: the storm's common case
        self._prober.expire(now)
        self._probing.tick(now)
        for _ in range(len(self._members) + 1):
            if not self._successor_died:
                break
            self._successor_died = False
            for member in self._watch():
                self._probing.check(member)  # a killed node's successors are often killed too
        if now >= self._next_round:
            self._round(now)
        if self._due is not None and now >= self._due[0]:
            self._start_due(now)
        self._effects(self._members.expire(now), "no answer")
        if now >= self.local.gossip_due(self._last_gossip):
            self._last_gossip = now
            self._spread()
        if now >= self._next_former:
            self._next_former = now + self._timing.former_probe_s
            self._admission.look_for_former()
            self._admission.ask_again()
        if now >= self._next_requery:
            self._next_requery = now + self._timing.requery_s
            if self._rng.random() < REQUERY_SENDERS / (len(self._members) + 1):
                self._discovery.requery()
        if now >= self._next_sync:
            self._synced = self._admission.sync(self._probing.body) or self._synced
            self._next_sync = now + (self._timing.sync_s if self._synced else SYNC_FIRST_S)
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
                body = self._probing.body(member, [left.encode()])
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
        self._probing.relayed(nonce, node_id, inc)

    def probe_for(self, target: Update, reply_url: str, reply_key: str | None,
                  nonce: int) -> None:
        """Probe ``target`` for the member that asked, and tell it if the target answers."""
        self._probing.probe_for(target, reply_url, reply_key, nonce)

    # --- probing ---------------------------------------------------------------------------------

    def _round(self, now: float) -> None:
        """A probe period begins (periods follow the wall clock, the same in every process):
        plan its probe, the turn of one of the members after us on a ring, at the target's own
        phase in the period. So every member is probed once a period at the same offset, by
        whichever node's turn it is: one period apart, not up to two (as with each prober's own
        phase), and the probes of a period are spread over it."""
        interval = self._timing.probe_interval_s
        wall = self._wall()
        round_no = math.floor(wall / interval)
        # Every period's turn is taken, however unhealthy we are (Lifeguard would stretch the
        # period too, but on the rings a period we skip is a member nobody probes in it).
        boundary = (round_no + 1) * interval
        self._next_round = now + max(interval / 2, boundary - wall)
        self._watch()
        self._probing.period()
        if self._due is not None:
            self._start_due(now)  # the last period's, if we woke up too late for it
        target = self._members.target(round_no, self._probing.busy())
        if target is not None:
            start = (round_no + phase(target.node_id)) * interval
            self._due = (now + max(0.0, start - wall), target)

    def _watch(self) -> list[Member]:
        """Keep connections to the members we probe (our ring successors); returns the ones
        that were not among them."""
        watched = {m.url: m for m in self._members.targets()}
        fresh = [m for url, m in watched.items() if url not in self._watched]
        if watched.keys() != self._watched.keys():
            self._prober.watch({url: m.record.curve_key for url, m in watched.items()})
        self._watched = watched
        return fresh

    def _start_due(self, now: float) -> None:
        due, self._due = self._due, None
        if due is not None and self._members.get(due[1].node_id) is due[1]:
            self._probing.probe(due[1], now)

    def _lost(self, url: str) -> None:
        """A watched connection dropped: is its port closed? Probe that member now anyway, not
        at its turn."""
        member = self._watched.get(url)
        if member is not None and self._members.get(member.node_id) is member:
            self._probing.check(member)
            self._probing.probe(member, self._clock())

    def _refused(self, url: str) -> None:
        member = self._watched.get(url)
        if member is not None:
            self._members.refused(member.node_id)

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
        """Push our successors on the rings (kept connections) the news they were not sent
        yet, each update once to each (see :meth:`Local.spread`), as one-way probes: an answer
        would cost both sides a message more, and its news (theirs) reach us anyway, pushed by
        our predecessors, piggybacked on probes and their answers. Except a push that carries a
        suspicion: it is a probe answered as any, so that a refutation comes straight back
        (the suspect, often our successor, refutes before it answers; others may have heard
        it), instead of going round the rings while the suspicion runs out. And until we have
        timed an answer: a node that has not waits 1 s for each (PROBE_TIMEOUT_INITIAL_S, as
        TCP), and a young fabric's pushes were what timed its first answers (a pulled cable
        took 4-5 s to be seen instead of 2 when they were one-way)."""
        targets = self._members.targets()
        batches = self.local.spread([m.node_id for m in targets])
        untimed = self._prober.rtt.srtt is None
        for member in targets:
            news = batches[member.node_id]
            if not news:
                continue
            body = self._probing.body(member, news)
            if untimed or any(update[0] == Kind.SUSPECT for update in news):
                self._ask(member.url, member.record.curve_key, body,
                          self._timing.probe_interval_s,
                          functools.partial(self._answer, member.node_id))
            else:
                self._prober.send(member.url, member.record.curve_key, body)

    # --- applying -------------------------------------------------------------------------------

    def apply_wire(self, raw: object) -> None:
        """Take the gossip of a message (its ``g``)."""
        updates, refused = decode_updates(raw, taken=self.local.taken)
        if refused:
            self._node.counters.add("refused_gossip", refused)
        self._apply(updates)

    def _apply(self, updates: list[Update]) -> None:
        now = self._clock()
        me = self._node.node_id
        self._applying = True
        try:
            for update in updates:
                if update.node_id == me:
                    if self.local.consider(update):
                        self._refuted()
                else:
                    self._effects(self._members.apply(update, now), "gossip")
                    if (self._members.get(update.node_id) is not None
                            or self._members.former(update.node_id) is not None):
                        self.local.took(update)
        finally:
            self._applying = False
            if self._removed_while_applying:
                self._removed_while_applying = False
                self._changed()

    def _effects(self, out: Effects, source: str = "") -> None:
        if out is NOTHING:
            return
        self.local.add(out.gossip)
        for member, why in out.removed:
            if why == "dead":
                self._node.counters.add("peers_lost")
                why = f"dead ({source})" if source else why
            elif why == "left":
                why = f"said goodbye ({source})" if source else "said goodbye"
            self._node.directory.remove(member.record.name, member.node_id, why)
            self._discovery.reverify(member.record)
        if out.removed:
            if self._applying:
                self._removed_while_applying = True
            else:
                self._changed()
            if any(m.url in self._watched for m, _ in out.removed):
                self._successor_died = True
        for former in out.forgotten:
            # No longer looked for: if it comes back, its next mDNS answer must be news.
            self._discovery.forget(former.record)
        for update in out.verify:
            self._admission.verify(update.url, update.key, update.node_id)
        for member in out.check:
            self._probing.check(member)  # closed: dead at our incarnation (see Members.apply)
        if out.confirm:
            chance = 2 * self._timing.confirmations / max(1, len(self._members))
            now = self._clock()
            for member, inc in out.confirm:
                if self._rng.random() < chance:
                    self._probing.probe(member, now, accuse=inc)

    def _refuted(self) -> None:
        self._node.counters.add("refutations")
        log.info("%s: refuted a suspicion about this node (incarnation %d)", self._node.name,
                 self.local.inc)
        self._probing.sick()

    def _changed(self) -> None:
        self.local.sized(len(self._members))
        self.local.retarget()  # our ring successors may be others now
        self.responder.known = self._members.alive_ids()
        if self._summary_due == float("inf"):  # refreshed at most once a second
            self._summary_due = self._clock() + 1.0
