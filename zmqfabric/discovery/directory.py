"""The live directory: every node this node knows, and who wants to hear about changes.

Discovery (zeroconf's thread) writes it; socket owners read it and *watch* endpoint names. A
watcher is a callback that must not touch sockets: it posts "connect/disconnect URL" to the
socket's owner (see :mod:`zmqfabric.patterns.base`). All methods are thread-safe.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..constants import MAX_PEERS
from ..core.records import EndpointKind, NodeRecord

log = logging.getLogger(__name__)
#: Nodes held back under one name in use (a conflict, a restart): a few, not a flood.
_MAX_CANDIDATES = 4


class Change(str, enum.Enum):
    JOINED = "joined"
    UPDATED = "updated"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class DirectoryEvent:
    change: Change
    record: NodeRecord


#: A watcher receives ("connect" | "disconnect", url).
Watcher = Callable[[str, str], None]
Listener = Callable[[DirectoryEvent], None]
_Key = tuple[EndpointKind, str]


class Directory:
    def __init__(self, owner: str = "") -> None:
        self._who = f"{owner}: " if owner else ""
        self._cond = threading.Condition()
        self._records: dict[str, NodeRecord] = {}
        self._candidates: dict[str, dict[str, NodeRecord]] = {}
        self._watchers: dict[_Key, list[tuple[Watcher, str | None]]] = {}
        self._listeners: list[Listener] = []
        #: Most nodes held (a node's own record included); the node sets it from its file
        #: descriptors at start. Updates of known nodes always go through.
        self.limit = MAX_PEERS

    # --- writes (discovery) ----------------------------------------------------------------

    def put(self, record: NodeRecord) -> bool:
        """Add or update the record of ``record.name`` and tell watchers what moved. False (and
        nothing changes) when it is a new node and the directory holds ``limit`` already.

        A record of a *different* node id under a name already in use is held back as a
        candidate (two live nodes claim one name, or a restart before the old record expired):
        it becomes the node's record when the current one leaves or is found dead."""
        events: list[DirectoryEvent] = []
        with self._cond:
            old = self._records.get(record.name)
            if old is None and len(self._records) >= self.limit:
                return False
            if old is not None and old.node_id != record.node_id:
                candidates = self._candidates.setdefault(record.name, {})
                if record.node_id not in candidates and len(candidates) >= _MAX_CANDIDATES:
                    return False
                if record.node_id not in candidates:
                    log.warning(
                        "two nodes claim the name %r: %s on %s (in use) and %s on %s (held back)",
                        record.name, old.node_id, old.host, record.node_id, record.host,
                    )
                held = candidates.get(record.node_id)
                if held is None or record.seq > held.seq:
                    candidates[record.node_id] = record
                return True
            if old is not None and (old == record or record.seq <= old.seq):
                return True  # the same, or an older version that arrived late
            self._activate(old, record, events)
        self._emit(events)
        return True

    def remove(self, name: str, node_id: str | None = None, why: str = "") -> NodeRecord | None:
        """Drop node ``name`` (only the node with id ``node_id``, when given); a held-back
        candidate of the same name, if any, takes its place. ``why`` ends the "left" log line."""
        events: list[DirectoryEvent] = []
        with self._cond:
            old = self._records.get(name)
            if old is None or (node_id is not None and old.node_id != node_id):
                held = self._candidates.get(name)
                if node_id is not None and held is not None:
                    held.pop(node_id, None)
                    if not held:
                        del self._candidates[name]
                return None
            del self._records[name]
            self._notify(name, _urls(old), {})
            events.append(DirectoryEvent(Change.LEFT, old))
            candidates = self._candidates.pop(name, {})
            if candidates:
                _, successor = candidates.popitem()
                if candidates:
                    self._candidates[name] = candidates
                self._activate(None, successor, events)
            self._cond.notify_all()
        self._emit(events, why)
        return old

    def _activate(
        self, old: NodeRecord | None, record: NodeRecord, events: list[DirectoryEvent]
    ) -> None:
        self._records[record.name] = record
        self._notify(record.name, _urls(old), _urls(record))
        events.append(DirectoryEvent(Change.JOINED if old is None else Change.UPDATED, record))
        self._cond.notify_all()

    def _emit(self, events: list[DirectoryEvent], why: str = "") -> None:
        with self._cond:
            listeners = list(self._listeners)
        for event in events:
            if event.change is Change.JOINED:
                log.info("%snode %s joined at %s (id %s)", self._who, event.record.name,
                         event.record.address, event.record.node_id)
            elif event.change is Change.LEFT:
                log.info("%snode %s left (id %s)%s", self._who, event.record.name,
                         event.record.node_id, f": {why}" if why else "")
            for listener in listeners:
                listener(event)

    def _notify(self, node: str, before: dict[_Key, str], after: dict[_Key, str]) -> None:
        for key, url in before.items():
            if after.get(key) != url:
                for watcher, only in self._watchers.get(key, ()):
                    if only is None or only == node:
                        watcher("disconnect", url)
        for key, url in after.items():
            if before.get(key) != url:
                for watcher, only in self._watchers.get(key, ()):
                    if only is None or only == node:
                        watcher("connect", url)

    # --- reads -----------------------------------------------------------------------------

    def watch(
        self, kind: EndpointKind, name: str, watcher: Watcher, node: str | None = None
    ) -> Callable[[], None]:
        """Call ``watcher('connect', url)`` for every current provider of (kind, name) now (only
        node ``node``'s, if given), and connect/disconnect later as providers come and go.
        Returns the function that stops it."""
        key = (kind, name)
        entry = (watcher, node)
        with self._cond:
            self._watchers.setdefault(key, []).append(entry)
            for url in self._urls_of(key, node):
                watcher("connect", url)

        def unwatch() -> None:
            with self._cond:
                watchers = self._watchers.get(key, [])
                if entry in watchers:
                    watchers.remove(entry)
                if not watchers:
                    self._watchers.pop(key, None)

        return unwatch

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for each join/update/leave (in discovery's thread; keep it short)."""
        with self._cond:
            self._listeners.append(listener)

        def unlisten() -> None:
            with self._cond:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unlisten

    def providers(self, kind: EndpointKind, name: str, node: str | None = None) -> list[str]:
        with self._cond:
            return self._urls_of((kind, name), node)

    def _urls_of(self, key: _Key, node: str | None = None) -> list[str]:
        urls = []
        for record in self._records.values():
            if node is not None and record.name != node:
                continue
            ep = record.find(*key)
            if ep is not None:
                urls.append(record.url(ep))
        return urls

    def key_for(self, url: str) -> str | None:
        """The CURVE key of the node that offers an endpoint at ``url`` (None: unsecured or
        unknown)."""
        with self._cond:
            for record in self._records.values():
                if any(record.url(ep) == url for ep in record.endpoints):
                    return record.curve_key
        return None

    def get(self, name: str) -> NodeRecord | None:
        with self._cond:
            return self._records.get(name)

    def records(self) -> list[NodeRecord]:
        with self._cond:
            return sorted(self._records.values(), key=lambda r: r.name)

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``predicate()`` (called under the lock) is true; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def clear(self) -> None:
        with self._cond:
            self._candidates.clear()
            for name in list(self._records):
                old = self._records.pop(name)
                self._notify(name, _urls(old), {})
            self._cond.notify_all()


def _urls(record: NodeRecord | None) -> dict[_Key, str]:
    if record is None:
        return {}
    return {(ep.kind, ep.name): record.url(ep) for ep in record.endpoints}
