"""Membership: how a node claims its name and meets its peers.

- Claiming: after advertising, a node listens for ``claim_window_s`` for another live node of its
  name (records carry a node id); on a conflict it withdraws and fails, or takes a suffix.
- Meeting: when the directory reports a newcomer, the node watches its liveness and introduces
  itself over the newcomer's control endpoint (a ``hello``, validated like an mDNS record), so both
  know each other in milliseconds; across subnets it also shares whom else it knows.

Runs in discovery's thread (directory events, name conflicts), the control thread (hellos) and the
caller's (``claim_name``); it touches no socket, and only posts to the housekeeping thread
(:class:`~.housekeeping.Housekeeping`), which does the socket work of liveness and gossip.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..constants import MAX_ENDPOINTS, MAX_NAME_SUFFIX, VERIFY_TIMEOUT_S
from ..core.records import NodeRecord, address_in_scope, decode_txt, validate_node_name
from ..errors import (
    InvalidNameError,
    LocalProtocolError,
    NameConflictError,
    RemoteProtocolError,
)
from ..stats import RateLimitedLog
from .directory import Change, DirectoryEvent

if TYPE_CHECKING:
    from .local import LocalNode
    from .mdns import Discovery


class Introducer(Protocol):
    """What membership asks of the housekeeping thread (all thread-safe, returning at once)."""

    def introduce(self, url: str, key: str | None = None) -> None: ...
    def watch(self, record: NodeRecord) -> None: ...
    def unwatch(self, record: NodeRecord) -> None: ...
    def greet(self, record: NodeRecord, known: Callable[[], bool] | None = None) -> None: ...
    def share(self, record: NodeRecord) -> None: ...


log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)


class Membership:
    """Claims the node's name and meets peers. ``attach`` gives it the housekeeping thread."""

    def __init__(self, runtime: LocalNode, discovery: Discovery, on_conflict: str) -> None:
        if on_conflict not in ("fail", "suffix"):
            raise LocalProtocolError("on_conflict must be 'fail' or 'suffix'")
        self._node = runtime
        self._discovery = discovery
        self._control: Introducer | None = None
        self._mode = on_conflict
        self._claiming = False
        self._conflict: NodeRecord | None = None
        self._conflict_seen = threading.Event()

    def attach(self, control: Introducer | None) -> None:
        """The housekeeping thread that introduces and watches peers (None while closed)."""
        self._control = control

    def claim_name(self) -> None:
        """Advertise, then listen for ``claim_window_s`` (CONFLICT_WINDOW_S by default) for
        another live node of our name (it introduces itself at once when it sees us). On a
        conflict, withdraw and fail, or try ``name-2``, ``name-3``... with
        ``on_conflict="suffix"``. A window of 0 returns once advertised."""
        node = self._node
        base = node.name
        for attempt in range(2, 2 + MAX_NAME_SUFFIX):
            self._conflict = None
            self._conflict_seen.clear()
            self._claiming = True
            try:
                self._discovery.advertise(node.record)
                window = node.config.claim_window_s
                if window == 0:
                    return  # a name unique by construction: nobody else can hold it
                self._conflict_seen.wait(window)
                if self._conflict is None:
                    # A record of our name heard in the window is only a hint: it claims the
                    # name once its node confirms it (at most VERIFY_TIMEOUT_S more).
                    self._discovery.settle(node.name, VERIFY_TIMEOUT_S)
            finally:
                self._claiming = False
            other = self._conflict
            if other is None:
                return
            self._discovery.withdraw()
            node.directory.remove(node.name, node.node_id)
            if self._mode != "suffix":
                raise NameConflictError(node.name, other.host, other.node_id, other.address)
            log.warning("node name %r is taken by %s on %s; trying %s-%d",
                        node.name, other.node_id, other.host, base, attempt)
            suffix = f"-{attempt}"
            node.rename(f"{base[: 46 - len(suffix)]}{suffix}")
        assert other is not None  # every turn of the loop that did not return saw a conflict
        raise NameConflictError(node.name, other.host, other.node_id, other.address)

    def on_name_conflict(self, other: NodeRecord) -> None:
        """Another node advertises our name (discovery's or the control thread)."""
        node = self._node
        if self._claiming:
            self._conflict = other
            self._conflict_seen.set()
            return
        _rlog.warning("conflict", "node %s on host %s (%s) claims this node's name %r; it "
                      "should yield", other.node_id, other.host, other.address, node.name)
        control = other.control
        if control is not None and self._control is not None:
            self._control.introduce(other.url(control), other.curve_key)  # tell it we exist

    def on_directory_event(self, event: DirectoryEvent) -> None:
        """Watch each peer's liveness and introduce ourselves to newcomers (runs in discovery's
        or the control thread: only posts to the housekeeping thread)."""
        node = self._node
        record, control = event.record, self._control
        if record.node_id == node.node_id or control is None:
            return
        if event.change is Change.LEFT:
            control.unwatch(record)
            return
        control.watch(record)
        if event.change is Change.JOINED and node.advertised and record.control is not None:
            returning = self._discovery.returning(record.node_id)
            if self._discovery.knows_us(record.node_id):
                pass  # it verified us: it has our record
            elif returning:
                control.greet(record)  # back after we dropped it: it has likely dropped us too
            else:  # not before it had time to call us back (then it has our record: no hello)
                control.greet(record, functools.partial(self._discovery.knows_us, record.node_id))
            if node.config.peers or not address_in_scope(
                record.address, node.config.scope.networks
            ):
                control.share(record)  # across subnets: tell it whom else we know

    def accept_hello(self, body: dict[str, Any], peer_address: str | None,
                     peer_key: str | None = None, verifying: bool = False) -> None:
        """Take a peer's introduction (a hello, or the ``me`` of a verification call):
        validated like an mDNS record, its address is the one it came from. It is the node's
        own word when it came over CURVE with the record's key: a node not listed yet is then
        admitted without a call of ours (discovery's ``proven``); otherwise (and always in a
        fabric without keys, where nothing proves the control port it claims) it is a hint,
        verified with the node. ``verifying``: it came in a call verifying our record, so its
        node has ours and needs no hello back. Runs in the control thread."""
        node = self._node
        try:
            name, txt = body.get("name"), body.get("txt")
            if not isinstance(txt, dict) or len(txt) > 2 * MAX_ENDPOINTS or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in txt.items()
            ):
                raise RemoteProtocolError("hello must carry a TXT map of strings")
            if peer_address is None:
                raise RemoteProtocolError("hello has no peer address")
            held = node.directory.get(name) if isinstance(name, str) else None
            if (held is not None and held.address == peer_address
                    and txt.get("id") == held.node_id and txt.get("seq") == str(held.seq)):
                # The record we hold, from its address: no news (a reader ignores a record of
                # an id at a seq it holds, PROTOCOL.md 4.7). Every node there gets one such in
                # the call that verifies it back when a newcomer joins: not decoded again.
                node.counters.add("hellos_known")
                if verifying:
                    self._discovery.introduced(held.node_id)
                return
            try:
                peer = validate_node_name(name)
            except InvalidNameError as exc:
                raise RemoteProtocolError(f"hello has a bad node name: {exc}") from exc
            props = {k.encode(): v.encode() for k, v in txt.items()}
            record = decode_txt(peer, [peer_address], props)
            if verifying:
                self._discovery.introduced(record.node_id)  # it has our record: no hello back
            proven = node.config.keys is not None and peer_key == record.curve_key
            self._discovery.accept(record, direct=True, proven=proven)
        except RemoteProtocolError as exc:
            node.counters.add("refused_hellos")
            _rlog.warning("hello", "refused an introduction from %s: %s", peer_address, exc)
