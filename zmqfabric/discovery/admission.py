"""Admission by liveness: a node it learns of second-hand is admitted only on its own word.

Liveness hears of nodes it does not hold as members: an ``alive`` update in gossip (a node that
refuted, or that another member found again after a partition), the ``from`` of a probe sent by a
stranger, a former member that probes us. Each is a hint. :meth:`Admission.verify` probes the
node at the hinted control URL and asks for its record (``rec``); over a secured fabric that
connection is a CURVE client of the hinted key, so only the holder of that key can answer. The
record in the answer must be the answering node's own (its id, and a control port that is the one
we reached) and goes to discovery like any record that came straight from its node
(:meth:`Rediscovery.accept` with ``direct=True``: fabric, keys and name conflicts are checked
there).

Formers (members found dead) are looked for now and then (:meth:`Admission.look_for_former`):
about FORMER_PROBERS probes per FORMER_PROBE_S fabric-wide, so the cost does not grow with the
fabric, and a node that answers is admitted again and announced (``alive``) to the others, who
verify it in turn.

Anti-entropy (:meth:`Admission.sync`): every ``sync_s`` a node swaps its member list with one
random member, so that a join or a death that gossip missed reaches it anyway; what a list holds
and we do not is a hint like any other, and a member we buried that the peer still lists is
verified, and reported dead again if it does not answer.

Housekeeping thread only. Bounded: MAX_VERIFYING verifications at once; a URL that did not answer
is not tried again on a hint for HINT_RETRY_S.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..constants import (
    ADMISSION_ATTEMPTS,
    FORMER_PROBERS,
    HINT_RETRY_S,
    MAX_PIGGYBACK,
    MAX_SYNC,
    MAX_VERIFYING,
    PROBE_TIMEOUT_MAX_S,
)
from ..core.records import NodeRecord
from ..core.swim import Effects, Kind, Member, Members, Update
from ..errors import RemoteProtocolError
from .gossip import in_scope
from .swim import Local, decode_record, decode_updates, is_inc

if TYPE_CHECKING:
    from .local import LocalNode

log = logging.getLogger(__name__)

#: ``ask(url, key, body, timeout, on_answer, on_timeout) -> sent``: a request to a control URL.
Ask = Callable[..., bool]


class Rediscovery(Protocol):
    """What liveness asks of discovery (thread-safe, returning at once)."""

    def accept(self, record: NodeRecord, *, direct: bool = False,
               proven: bool = False) -> None: ...
    def forget(self, record: NodeRecord) -> None: ...
    def reverify(self, record: NodeRecord) -> None: ...
    def checking(self, node_id: str) -> bool: ...
    def requery(self) -> None: ...


class Admission:
    """Verifies hinted nodes and formers, and admits those that answer. Not thread-safe."""

    def __init__(self, node: LocalNode, members: Members, local: Local, ask: Ask,
                 answer: Callable[[str, Any], int | None],
                 effects: Callable[[Effects, str], None], discovery: Rediscovery,
                 join: Callable[[NodeRecord], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``ask`` sends requests, ``answer(node_id, reply)`` takes an answer (its gossip, and
        the node's incarnation if it is ``node_id``), ``effects`` carries out what the member
        table asks, ``join`` makes an admitted node a member."""
        self._node = node
        self._members = members
        self._local = local
        self._ask = ask
        self._answer = answer
        self._effects = effects
        self._discovery = discovery
        self._join = join
        self._clock = clock
        self._timeout = node.config.liveness.probe_interval_s
        self._verifying: dict[str, float] = {}  # url -> since
        self._unanswered: dict[str, float] = {}  # url -> not again before
        #: Nodes heard of whose call went unanswered, asked again (a node busy starting, or a
        #: host under load, answers late; gossip about it may not come again for 30 s):
        #: url -> (when, key, node id, calls so far).
        self._again: dict[str, tuple[float, str | None, str, int]] = {}
        self._incs: dict[str, int] = {}  # node id -> incarnation it told us

    def incarnation(self, node_id: str) -> int | None:
        """The incarnation a node told us while we verified it (None if none); read once."""
        return self._incs.pop(node_id, None)

    def sync(self, probe_body: Callable[[Member], dict[str, Any]]) -> bool:
        """Swap member lists with one random member (anti-entropy; its answer carries its).
        False if there was no member to swap with."""
        chosen = self._members.helpers("", 1)
        for member in chosen:
            body = probe_body(member)
            body["sync"] = self._members.summary()

            def answered(reply: Any, member: Member = member) -> None:
                self._answer(member.node_id, reply)
                if isinstance(reply, dict) and "sync" in reply:
                    self.synced(reply["sync"])

            self._ask(member.url, member.record.curve_key, body, self._timeout, answered)
        return bool(chosen)

    def synced(self, raw: object) -> None:
        """Take a peer's member list (anti-entropy): learn what it holds that we missed."""
        if not isinstance(raw, list) or len(raw) > MAX_SYNC:
            self._node.counters.add("refused_gossip")
            return
        updates, refused = decode_updates([item for item in raw if not self._held(item)],
                                          MAX_SYNC)
        if refused:
            self._node.counters.add("refused_gossip", refused)
        now = self._clock()
        for update in updates:
            if update.kind is Kind.DEAD:  # a death we may have missed (or taken as old news)
                self._effects(self._members.apply(update, now), "anti-entropy")
                continue
            if update.kind is not Kind.ALIVE:
                continue
            out = self._members.merge(update, now)
            for hint in out.verify:
                former = self._members.former(hint.node_id)
                self.verify(hint.url, hint.key, hint.node_id, former, report=True)
            out.verify = []
            self._effects(out, "gossip")

    def _held(self, item: object) -> bool:
        """Whether list entry ``item`` says a member is alive at an incarnation we hold already
        (it would change nothing: not worth validating; a list of 300 took 1.7 ms to decode)."""
        if not (type(item) is list and len(item) == 7 and item[0] == Kind.ALIVE
                and type(item[1]) is str and type(item[2]) is int):
            return False
        member = self._members.get(item[1])
        return member is not None and member.inc >= item[2]

    def look_for_former(self) -> None:
        """Probe a random former member, with probability FORMER_PROBERS / N."""
        if self._members.rng.random() >= FORMER_PROBERS / (len(self._members) + 1):
            return
        former = self._members.random_former()
        if former is not None:
            self.verify(former.url, former.record.curve_key, former.node_id, former)

    def ask_again(self) -> None:
        """Call again the nodes heard of whose calls went unanswered, as their time comes."""
        now = self._clock()
        for url in [u for u, (when, *_) in self._again.items() if when <= now]:
            _, key, node_id, calls = self._again.pop(url)
            self._unanswered.pop(url, None)
            self.verify(url, key, node_id, calls=calls)

    def verify(self, url: str, key: str | None, node_id: str, former: Member | None = None,
               report: bool = False, calls: int = 0) -> None:
        """Ask the node at ``url`` for its record and admit it if it answers (a hint about
        ``node_id``, or ``former``). ``report``: if a former does not answer, gossip its death
        again (a peer still lists it). A hint whose node does not answer is asked again,
        ADMISSION_ATTEMPTS calls in all, each waiting longer, the pauses doubling from
        HINT_RETRY_S (``calls``: made so far)."""
        now = self._clock()
        if (node_id == self._node.node_id or self._members.get(node_id) is not None
                or url in self._verifying or len(self._verifying) >= MAX_VERIFYING):
            return
        if former is None and (self._unanswered.get(url, 0.0) > now or url in self._again
                               or not in_scope(self._node, url)
                               or self._discovery.checking(node_id)):
            return  # (the verifier is calling it already: its introduction came first)
        # A former is told it was found dead (it refutes before it answers), so that the
        # "dead" still travelling about it cannot remove it again.
        to = [node_id, former.inc, True] if former is not None else [node_id, 0, False]
        body = {"op": "probe", "to": to, "from": self._local.sender(), "rec": True,
                "g": self._local.take(MAX_PIGGYBACK)}

        def silent() -> None:
            self._verifying.pop(url, None)
            if report and former is not None and self._members.former(node_id) is former:
                self._local.add([former.update(Kind.DEAD, self._node.node_id)])
            if len(self._unanswered) >= MAX_VERIFYING:
                self._unanswered.clear()
            pause = HINT_RETRY_S * 2 ** calls
            self._unanswered[url] = self._clock() + pause
            if (former is None and calls + 1 < ADMISSION_ATTEMPTS
                    and len(self._again) < MAX_VERIFYING):
                self._again[url] = (self._clock() + pause, key, node_id, calls + 1)

        timeout = min(self._timeout * (1 + calls), PROBE_TIMEOUT_MAX_S)
        if self._ask(url, key, body, timeout,
                     lambda reply: self._answered(url, key, former, reply), silent):
            self._verifying[url] = now
            self._node.counters.add("admission_calls")

    def _answered(self, url: str, key: str | None, former: Member | None, reply: Any) -> None:
        self._verifying.pop(url, None)
        if not isinstance(reply, dict):
            return
        self._answer("", reply)  # its gossip (it is no member yet)
        try:
            record = decode_record(reply, url)
        except RemoteProtocolError as exc:
            self._node.counters.add("refused_probe_answers")
            log.debug("%s: %s", url, exc)
            return
        inc = reply.get("inc")
        if record.node_id == self._node.node_id or not is_inc(inc):
            return
        if len(self._incs) < MAX_VERIFYING:
            self._incs[record.node_id] = inc
        try:
            # Its own word at its control URL (over CURVE with ``key`` when secured): a node
            # not listed yet needs no second call from the verifier.
            self._discovery.accept(record, direct=True, proven=record.curve_key == key)
        except RemoteProtocolError as exc:
            self._node.counters.add("refused_peers")
            log.debug("%s: %s", url, exc)
            return
        current = self._node.directory.get(record.name)
        if current is None or current.node_id != record.node_id:
            return  # refused, or held back behind another node of that name
        self._join(current)
        if former is not None and former.node_id == record.node_id:
            self._node.counters.add("peers_returned")
            log.info("%s: node %s (%s) is reachable again", self._node.name, record.name,
                     record.address)
            self._local.add([Update(Kind.ALIVE, record.node_id, inc, record.name, url,
                                    record.curve_key)])
