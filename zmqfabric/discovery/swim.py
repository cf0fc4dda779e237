"""The SWIM messages on the control endpoint, and this node's side of SWIM shared by two threads.

Liveness speaks over peers' control endpoints with request bodies like the control ops (header
and body as in any request; see docs/PROTOCOL.md). ``UPDATES`` is a list of gossip updates
(:class:`~zmqfabric.core.swim.Update` on the wire: ``[kind, id, inc, name, url, key, origin]``)
and ``FROM`` says who asks, ``[name, node id, incarnation, control port]`` (null from nodes that
are not listed, such as the CLI's observers):

- ``{"op": "probe", "to": [id, inc, accused], "from": FROM, "rec": bool, "g": UPDATES}``: are
  you there? ``to`` is what the prober holds about the target; ``accused`` is true when it holds
  it as suspect or dead at ``inc``, and the target then refutes (raises its incarnation) before
  it answers. Answered by every node's control thread with ``{"id": id, "inc": inc,
  "g": UPDATES}``, plus ``"name"`` and ``"txt"`` (the node's TXT record as a map) when ``rec``
  asks for it.
- A probe with id 0 is one-way: gossip pushed to a ring successor (each update once to each),
  taken like any probe's but never answered (no reply is built: none of our gossip is spent).
  A push that carries a suspicion is a probe with an id, answered (with the refutation), and so
  is every push of a node that has not timed an answer yet.
- A probe may carry ``"sync": UPDATES``, the sender's whole member list as ``alive`` updates
  (anti-entropy, every ``sync_s``); the answer then carries the answerer's list as ``"sync"``.
- ``{"op": "probe-req", "nonce": n, "target": [id, name, url, key, inc], "from": FROM,
  "g": UPDATES}``: probe ``target`` for me. Answered at once like a probe; when the target
  answers the helper, the helper sends the asker the one-way
  ``{"op": "probe-ack", "nonce": n, "id": id, "inc": inc, "g": UPDATES}``.

Everything received is validated here; what does not validate is counted
(``refused_gossip``) and skipped, never fatal.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeGuard

from ..constants import MAX_GOSSIP, MAX_PIGGYBACK, MAX_TAKEN
from ..core.records import NodeRecord, decode_txt, encode_txt, validate_node_name
from ..core.updates import MAX_INCARNATION, Broadcasts, Kind, Update, refutes, transmit_limit
from ..errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from .local import LocalNode

#: The control ops of liveness (the control thread hands them to :meth:`Responder.answer`).
OPS = ("probe", "probe-req", "probe-ack")


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sent a message (its ``from``): a hint, to be verified before it is believed."""

    name: str
    node_id: str
    inc: int
    url: str


def is_inc(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INCARNATION


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef"
                                                               for c in value)


def decode_updates(raw: object, limit: int = MAX_GOSSIP,
                   taken: dict[str, tuple[int, int, str]] | None = None
                   ) -> tuple[list[Update], int]:
    """The valid updates of a message's ``g`` (at most ``limit``) and how many were refused.
    With ``taken`` (:attr:`Local.taken`), a copy of an accusation already taken is skipped
    before it is decoded: in a death storm each update arrives many times over, and decoding
    and applying one costs several microseconds for nothing (nothing of a skipped entry is
    used, so neither is it validated)."""
    if raw is None:
        return [], 0
    if not isinstance(raw, list) or len(raw) > limit:
        return [], 1
    updates, refused = [], 0
    for item in raw:
        if (taken is not None and type(item) is list and len(item) == 7
                and type(item[1]) is str and taken.get(item[1]) == (item[0], item[2], item[6])):
            continue
        try:
            updates.append(Update.decode(item))
        except RemoteProtocolError:
            refused += 1
    return updates, refused


def decode_sender(raw: object, address: str | None) -> Sender | None:
    """The ``from`` of a message that came from ``address``, or None (absent or malformed)."""
    if not (isinstance(raw, list) and len(raw) == 4 and address):
        return None
    name, node_id, inc, port = raw
    if not (is_node_id(node_id) and is_inc(inc) and isinstance(port, int)
            and 0 < port < 65536 and "." in address):
        return None
    try:
        validate_node_name(name)
    except LocalProtocolError:
        return None
    return Sender(name, node_id, inc, f"tcp://{address}:{port}")


def decode_record(body: dict[str, Any], url: str) -> NodeRecord:
    """The record a node sent about itself (``name`` and ``txt`` of an answer) when reached at
    control URL ``url``. Raises RemoteProtocolError if it is malformed or not that node's."""
    name, txt = body.get("name"), body.get("txt")
    if not isinstance(txt, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in txt.items()
    ):
        raise RemoteProtocolError("answer must carry a TXT map of strings")
    try:
        name = validate_node_name(name)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"answer has a bad node name: {exc}") from exc
    host, _, port = url[len("tcp://"):].rpartition(":")
    props = {k.encode(): v.encode() for k, v in txt.items()}
    record = decode_txt(name, [host], props)
    control = record.control
    if record.node_id != body.get("id") or control is None or str(control.port) != port:
        raise RemoteProtocolError(f"node {name!r} answered with another node's record")
    return record


class Local:
    """This node's incarnation and its gossip waiting to go out: what the control thread (which
    answers probes) and the housekeeping thread (which sends them) share. Thread-safe."""

    def __init__(self, node: LocalNode) -> None:
        self._node = node
        self._lock = threading.Lock()
        self._inc = 0
        self._broadcasts = Broadcasts()
        self._limit = transmit_limit(0, 1)
        self._mult = node.config.liveness.retransmit_mult
        #: Set when the node starts to leave: it answers and asks nothing any more.
        self.leaving = False
        #: The last accusation taken about each member, as ``(kind, inc, origin)`` by node id
        #: (see :func:`decode_updates`): written by the housekeeping thread (:meth:`took`), read
        #: by both; single dict operations, atomic under the GIL.
        self.taken: dict[str, tuple[int, int, str]] = {}
        self._sender: list[Any] = ["", ""]  # our name and id (``from``), and control port:
        self._port: int | None = None

    @property
    def inc(self) -> int:
        return self._inc

    def sized(self, members: int) -> None:
        """The fabric has ``members`` members besides us (sets the retransmit limit)."""
        self._limit = transmit_limit(members + 1, self._mult)

    def consider(self, update: Update) -> bool:
        """Take an update about this node: True if it called for a refutation (done)."""
        return refutes(update, self._inc) and self.refute(update.inc)

    def refute(self, accused: int) -> bool:
        """Raise our incarnation above ``accused`` and gossip that we are alive. False when it
        already was."""
        with self._lock:
            if accused < self._inc:
                return False
            self._inc = accused + 1
            self._broadcasts.add(self.me())
        return True

    def me(self) -> Update:
        """``alive`` about this node at its incarnation now."""
        record = self._node.record
        control = record.control
        url = record.url(control) if control else ""
        return Update(Kind.ALIVE, record.node_id, self._inc, record.name, url, record.curve_key)

    def took(self, update: Update) -> None:
        """``update``, about a member or a former, has been applied: skip its copies (alive
        updates are not remembered: each may be a hint to verify)."""
        if update.kind is not Kind.ALIVE:
            taken = self.taken
            if len(taken) >= MAX_TAKEN:
                taken.clear()
            taken[update.node_id] = (int(update.kind), update.inc, update.origin)

    def add(self, updates: list[Update]) -> None:
        if updates:
            with self._lock:
                for update in updates:
                    self._broadcasts.add(update)

    def take(self, count: int) -> list[list[Any]]:
        """Up to ``count`` updates to piggyback on a probe or an answer, on the wire."""
        with self._lock:
            return self._broadcasts.take_wire(count, self._limit)

    def spread(self, targets: list[str]) -> dict[str, list[list[Any]]]:
        """What to push to each of our gossip ``targets`` (node ids): the updates not pushed
        to it yet (see :class:`~zmqfabric.core.updates.Broadcasts`), on the wire."""
        with self._lock:
            return self._broadcasts.spread(targets, MAX_GOSSIP, self._limit)

    def retarget(self) -> None:
        """Our gossip targets may have changed: a new one is sent what is queued."""
        with self._lock:
            self._broadcasts.retarget()

    def gossip_due(self, last: float) -> float:
        """When the news not pushed yet is due, for a node that last pushed at ``last``
        (monotonic): GOSSIP_INTERVAL_S after it for suspicions and refutations, GOSSIP_BATCH_S
        for the rest; inf without news."""
        broadcasts = self._broadcasts
        if not broadcasts.unspread:
            return math.inf
        timing = self._node.config.liveness
        return last + (timing.gossip_interval_s if broadcasts.urgent else timing.gossip_batch_s)

    def sender(self) -> list[Any] | None:
        """Our ``from``: None for a node that is not listed."""
        node = self._node
        if not node.advertised:
            return None
        if self._port is None or self._sender[0] != node.name:
            control = node.record.control
            if control is None:
                return None
            self._port = control.port
            self._sender = [node.name, node.node_id]
        return [*self._sender, self._inc, self._port]


class Listener(Protocol):
    """What the responder hands on to the housekeeping thread (through its inbox)."""

    def heard(self, updates: list[Update], refused: int, refuted: bool, sender: Sender | None,
              key: str | None) -> None: ...
    def relayed(self, nonce: int, node_id: str, inc: int) -> None: ...
    def synced(self, raw: object) -> None: ...
    def probe_for(self, target: Update, reply_url: str, reply_key: str | None,
                  nonce: int) -> None: ...


class Responder:
    """Answers the liveness ops in the control thread: refutes accusations about this node at
    once (so the answer carries the new incarnation), takes gossip off :class:`Local`, and
    posts everything else to ``listener``'s thread with ``post``. ``known`` (set by that thread,
    read here) holds the members that need no hint. Never blocks."""

    def __init__(self, node: LocalNode, local: Local, listener: Listener,
                 post: Callable[..., bool]) -> None:
        self._node = node
        self._local = local
        self._listener = listener
        self._post = post
        self.known: frozenset[str] = frozenset()
        #: Our member list on the wire (set by that thread, read here): anti-entropy answers.
        self.summary: list[list[Any]] = []

    def answer(self, body: dict[str, Any], address: str | None, key: str | None,
               one_way: bool = False) -> dict[str, Any] | None:
        """The reply to a liveness op from ``address`` (``key``: the sender's CURVE key on a
        secured node), or None for a one-way message (``one_way``: sent with id 0, such as the
        gossip pushed to us; no reply is built, so none of our gossip is spent on it)."""
        op = body.get("op")
        local, me = self._local, self._node.node_id
        if local.leaving:
            return None
        updates, refused = decode_updates(body.get("g"), taken=local.taken)
        refuted = False
        for update in updates:
            if update.node_id == me:
                refuted = local.consider(update) or refuted
        to = body.get("to")
        if (op == "probe" and isinstance(to, list) and len(to) == 3 and to[0] == me
                and to[2] is True and is_inc(to[1])):
            refuted = local.refute(to[1]) or refuted
        others = [u for u in updates if u.node_id != me]
        sender = decode_sender(body.get("from"), address)
        if others or refused or refuted or (sender is not None
                                            and sender.node_id not in self.known):
            self._post(self._listener.heard, others, refused, refuted, sender, key)
        if op == "probe-ack":
            nonce, node_id, inc = body.get("nonce"), body.get("id"), body.get("inc")
            if isinstance(nonce, int) and is_node_id(node_id) and is_inc(inc):
                self._post(self._listener.relayed, nonce, node_id, inc)
            return None
        if op == "probe-req":
            self._take_request(body, address, key)
        if one_way:
            return None
        reply: dict[str, Any] = {"id": me, "inc": local.inc, "g": local.take(MAX_PIGGYBACK)}
        if op == "probe" and "sync" in body:
            self._post(self._listener.synced, body["sync"])
            reply["sync"] = self.summary
        if op == "probe" and body.get("rec") is True:
            record = self._node.record
            reply["name"], reply["txt"] = record.name, encode_txt(record)
        return reply

    def _take_request(self, body: dict[str, Any], address: str | None, key: str | None) -> None:
        """A probe-req: validate it and post the probe to the housekeeping thread."""
        target, nonce, port = body.get("target"), body.get("nonce"), body.get("port")
        if not (isinstance(target, list) and len(target) == 5 and isinstance(nonce, int)
                and isinstance(port, int) and 0 < port < 65536 and address):
            self._node.counters.add("refused_gossip")
            return
        node_id, name, url, target_key, inc = target
        try:
            update = Update.decode([0, node_id, inc, name, url, target_key, ""])
        except RemoteProtocolError:
            self._node.counters.add("refused_gossip")
            return
        if update.url:
            self._post(self._listener.probe_for, update, f"tcp://{address}:{port}", key, nonce)
