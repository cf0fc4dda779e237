"""Watching zeroconf's cache for the fabric's records, without a querying browser.

python-zeroconf's ServiceBrowser sends four queries when it starts (after 20-120 ms, then 1, 4 and
9 s later), each listing every record it holds as a known answer, and every responder that is
not in that list answers by multicast (python-zeroconf multicasts its answer even to a legacy
unicast query). On a LAN each host parses each packet once. On one host every node parses every
packet, so a join cost O(N) packets times N parsers: 300 nodes starting on one host never
converged. A node that advertises does not need to ask: every node that hears its announcement
verifies it with a call that introduces the caller (:mod:`.verify`, PROTOCOL.md 6.2), so the
newcomer learns the fabric from those calls; :class:`Watch` only listens, and the owner sends
one query of its own later (:func:`mdns._requery`, known answers included) for any node that did
not call.

:class:`Watch` turns cache updates into the browser's three changes: a PTR record new to the
cache is "added", an expired one (a goodbye, or its TTL ran out) "removed", a new SRV, TXT or
address record of a known instance "updated". Changes are handed to ``handler`` in the watch's
own thread, in order, so the handler may take locks and call other threads but never runs in
zeroconf's loop. The functions at the end write the cache: a peer verified from its call put
there as if its announcement had been heard, a dead one forgotten.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from typing import Any, Callable

from zeroconf import (
    DNSQuestion,
    RecordUpdate,
    RecordUpdateListener,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)

from ..constants import SERVICE_TYPE, THREAD_JOIN_TIMEOUT_S
from ..core.records import NodeRecord, encode_txt, instance_name, server_name

log = logging.getLogger(__name__)
#: DNS record types PTR, SRV, TXT, A, AAAA and class IN (RFC 1035, 2782, 3596).
_PTR, _SRV, _TXT, _A, _AAAA, _IN = 12, 33, 16, 1, 28, 1
_PRECEDENCE = {ServiceStateChange.Added: 0, ServiceStateChange.Removed: 1,
               ServiceStateChange.Updated: 2}

Handler = Callable[[ServiceStateChange, str], None]


class Watch(RecordUpdateListener):
    """Changes to ``service_type``'s instances in ``zc``'s cache, handed to ``handler(change,
    instance)`` in a thread of the watch's own. ``start()`` and ``close()`` from any thread but
    zeroconf's; ``close()`` is idempotent and waits for the handler to return."""

    def __init__(self, zc: Zeroconf, service_type: str, handler: Handler) -> None:
        super().__init__()
        self._zc = zc
        self._type = service_type.lower()
        self._suffix = "." + self._type
        self._handler = handler
        self._pending: dict[str, ServiceStateChange] = {}  # zeroconf's loop only
        self._changes: queue.SimpleQueue[tuple[ServiceStateChange, str] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name="zf-watch", daemon=True)
        self._closed = False

    def start(self) -> None:
        """Listen (records already cached count as added). Thread-safe."""
        loop = self._zc.loop
        assert loop is not None, "zeroconf is not running"
        self._thread.start()
        loop.call_soon_threadsafe(
            self._zc.async_add_listener, self, DNSQuestion(self._type, _PTR, _IN))

    def close(self) -> None:
        """Stop listening and end the handler thread (its queued changes are dropped)."""
        if self._closed:
            return
        self._closed = True
        loop = self._zc.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._zc.async_remove_listener, self)
        if self._thread.is_alive():
            self._changes.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join(THREAD_JOIN_TIMEOUT_S)

    # --- zeroconf's loop -------------------------------------------------------------------

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            record = update.new
            kind = record.type
            if kind == _PTR:
                if record.name.lower() != self._type:
                    continue
                alias = record.alias  # type: ignore[attr-defined]
                if update.old is None and not record.is_expired(now):
                    self._note(ServiceStateChange.Added, alias)
                elif record.is_expired(now):
                    self._note(ServiceStateChange.Removed, alias)
                continue
            if update.old is not None or record.is_expired(now):
                continue  # nothing new
            if kind in (_SRV, _TXT):
                if record.name.lower().endswith(self._suffix):
                    self._note(ServiceStateChange.Updated, record.name)
            elif kind in (_A, _AAAA):
                for service in zc.cache.async_entries_with_server(record.name):
                    if service.name.lower().endswith(self._suffix):
                        self._note(ServiceStateChange.Updated, service.name)

    def async_update_records_complete(self) -> None:
        for name, change in self._pending.items():
            self._changes.put((change, name))
        self._pending.clear()

    def _note(self, change: ServiceStateChange, name: str) -> None:
        """One change per instance and batch: added, then removed, then updated."""
        held = self._pending.get(name)
        if held is None or _PRECEDENCE[change] < _PRECEDENCE[held]:
            self._pending[name] = change

    # --- the watch's thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._changes.get()
            if item is None or self._closed:
                return
            try:
                self._handler(*item)
            except Exception:  # the handler counts its own errors; a bug must not end the watch
                log.exception("error handling discovery change %s of %r", item[0], item[1][:120])


# --- zeroconf's cache, written (zeroconf's loop unless said) -----------------------------


def service_info(record: NodeRecord, ttl: int) -> ServiceInfo:
    """``record`` as DNS-SD records (PTR, SRV, TXT, A), each with ``ttl``."""
    return ServiceInfo(
        SERVICE_TYPE,
        instance_name(record.name, record.node_id),
        port=record.control.port if record.control else 0,
        properties=encode_txt(record),
        server=server_name(record.node_id),
        host_ttl=ttl,
        other_ttl=ttl,
        addresses=[socket.inet_aton(record.address)],
    )


def cache_record(zc: Zeroconf, record: NodeRecord, ttl: int) -> None:
    """Zeroconf's loop: cache ``record``'s PTR, SRV, TXT and A (no listener hears of it), unless
    its announcement did (a newcomer's, at every node there: the PTR came with the SRV)."""
    if zc.done or cached(zc.cache.async_entries_with_name(instance_name(record.name,
                                                                        record.node_id))):
        return
    info = service_info(record, ttl)
    zc.cache.async_add_records(
        [info.dns_pointer(), info.dns_service(), info.dns_text(), *info.dns_addresses()])


def cached(entries: list[Any]) -> bool:
    """Whether an instance's cached ``entries`` hold its SRV record, unexpired (read from any
    thread too, as zeroconf's ``load_from_cache`` does: a copy of a dict's values)."""
    now = current_time_millis()
    return any(r.type == _SRV and not r.is_expired(now) for r in entries)


def forget_instance(zc: Zeroconf, names: tuple[str, str]) -> None:
    """Zeroconf's loop: remove the PTR, SRV, TXT and address records of one instance."""
    cache = zc.cache
    instance, server = names
    stale = [r for r in cache.async_all_by_details(SERVICE_TYPE, _PTR, _IN)
             if getattr(r, "alias", None) == instance]
    stale += cache.async_entries_with_name(instance) + cache.async_entries_with_name(server)
    cache.async_remove_records(stale)

