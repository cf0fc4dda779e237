"""Zeroconf advertise + browse, feeding a :class:`~zmqfabric.directory.Directory`.

Runs in python-zeroconf's threads and never touches a ZeroMQ socket. Records from the network are
untrusted hints: each is validated by :func:`zmqfabric.core.records.decode_txt`, then passes the
node's :class:`~.intake.Intake` (scope, fabric, keys; then the node it names must confirm it,
:mod:`.verify`) before anything of it is used; refused records are counted and logged
(rate-limited), never fatal, and listed by :meth:`Discovery.refused`. This module is the mDNS
side: advertising, browsing, resolving, the goodbye and zeroconf's cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from typing import Any, Callable

from zeroconf import (
    IPVersion,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceInfo

from ..config import NodeConfig
from ..constants import (
    ANNOUNCE_INTERVAL_S,
    ANNOUNCEMENTS,
    JOIN_QUERY_DELAY_S,
    JOIN_QUERY_MAX_WAIT_S,
    JOIN_QUERY_QUIET_S,
    JOIN_QUERY_RECHECK_S,
    MAX_RESOLVING,
    REGISTER_TIMEOUT_MAX_S,
    REGISTER_TIMEOUT_S,
    RESOLVE_TIMEOUT_S,
    SERVICE_TYPE,
)
from ..core.records import (
    NodeRecord,
    decode_txt,
    instance_name,
    parse_instance,
    server_name,
)
from ..errors import FabricError, FabricTimeoutError, RemoteProtocolError
from ..stats import Counters, RateLimitedLog
from ..transport.sockets import SocketFactory, peer_capacity
from .directory import Directory
from .intake import Intake
from .quickquery import QuickQuery, ask_now, pointers, requery
from .watch import Watch, cache_record, cached, forget_instance, service_info

log = logging.getLogger(__name__)


class Discovery:
    """Advertises one node's record and keeps ``directory`` in step with the fabric.

    ``start()`` opens zeroconf pinned to the scope's address only (IPv4). ``close()`` sends the
    goodbye, stops browsing and closes zeroconf; it is idempotent. ``advertise()`` is thread-safe.
    """

    def __init__(
        self,
        config: NodeConfig,
        directory: Directory,
        counters: Counters,
        on_conflict: Callable[[NodeRecord], None],
        sockets: SocketFactory | None = None,
    ) -> None:
        """``sockets``: the node's socket factory, for verifying hints with their advertisers
        (:mod:`.verify`). Without it (tests of discovery alone) hints are taken unverified."""
        self._config = config
        self._intake = Intake(config, directory, counters, on_conflict, sockets, self._remember)
        self._broadcast: Any = None  # zeroconf's task repeating our latest announcement
        self._closing = False
        self._directory = directory
        self._counters = counters
        self._rlog = RateLimitedLog(log)
        self._zc: Zeroconf | None = None
        self._watch: Watch | None = None
        self._join_query: asyncio.TimerHandle | None = None  # zeroconf's loop
        self._quick: QuickQuery | None = None
        self._info: ServiceInfo | None = None
        self._lock = threading.Lock()
        #: Instances whose SRV/TXT/A were not cached, being asked for in zeroconf's loop.
        self._resolving: dict[str, concurrent.futures.Future[None]] = {}

    def start(self, owner: str = "") -> None:
        """Open zeroconf and start the verifier thread. Raises FabricError."""
        address = self._config.scope.address
        self._directory.limit = peer_capacity()
        self._intake.start(owner)
        try:
            # use_asyncio=False: zeroconf runs its own thread even when called from an asyncio loop,
            # so the sync and asyncio nodes share one discovery path.
            self._zc = Zeroconf(
                interfaces=[address], ip_version=IPVersion.V4Only, use_asyncio=False
            )
        except OSError as exc:
            raise FabricError(f"cannot start discovery on {address}: {exc}") from exc

    def browse(self, advertising: bool) -> None:
        """Start watching for peers (after our own record is out, so peers see us first).

        No querying browser (see :mod:`.watch`): a node that ``advertising`` hears of the fabric
        from the nodes that verify it, and sends one query of its own JOIN_QUERY_DELAY_S later,
        once its verifier has settled (no new caller for JOIN_QUERY_QUIET_S and every first call
        back done; at most JOIN_QUERY_MAX_WAIT_S), listing what it learned
        and the nodes it is still checking as known answers, so only the nodes that did not call
        answer. An observer, which nobody calls, asks at once (:mod:`.quickquery`) and again
        after the delay."""
        zc = self._zc
        assert zc is not None and zc.loop is not None, "start() first"
        self._watch = Watch(zc, SERVICE_TYPE, self._on_change)
        self._watch.start()
        if not advertising:
            try:
                scope = self._config.scope
                self._quick = ask_now(zc, scope.address, scope.networks, SERVICE_TYPE)
            except OSError as exc:
                log.debug("no quick query on %s: %s", self._config.scope.address, exc)
        delay = JOIN_QUERY_DELAY_S * (1.0 + random.random())  # spread a rush of joins
        loop, until = zc.loop, time.monotonic() + JOIN_QUERY_MAX_WAIT_S

        def join_query() -> None:  # zeroconf's loop: once the calls we got are checked
            if self._closing:
                return
            if not self._intake.settled(JOIN_QUERY_QUIET_S) and time.monotonic() < until:
                self._join_query = loop.call_later(JOIN_QUERY_RECHECK_S, join_query)
                return
            hinted = pointers(self._intake.hinted(), self._config.record_ttl_s)
            requery(zc, hinted)
            self._counters.add("join_queries")

        def schedule() -> None:
            if not self._closing:
                self._join_query = loop.call_later(delay, join_query)

        loop.call_soon_threadsafe(schedule)

    def advertise(self, record: NodeRecord) -> None:
        """Register or update our record. Skips mDNS probing: our own ids detect conflicts.
        Once closing, does nothing: the node has said goodbye (an endpoint made as it closes,
        such as a task's dead-letter stream, is never advertised)."""
        info = service_info(record, self._config.record_ttl_s)
        with self._lock:
            if self._closing:
                return
            zc = self._zc
            assert zc is not None, "start() first"
            loop = zc.loop
            assert loop is not None
            if self._broadcast is not None:
                # Repeat announcements of the previous version would re-announce stale endpoints.
                loop.call_soon_threadsafe(self._broadcast.cancel)
            # Wait until the record is registered and its first announcement is queued, not for
            # the repeat announcements (zeroconf's blocking call waits ~450 ms for those).
            self._broadcast = _wait_registered(asyncio.run_coroutine_threadsafe(
                _register(zc, info, self._info is None), loop), record.name)
            self._info = info
            self._intake.advertised(record)
        # Our own record goes straight into our directory: no need to hear our own multicast.
        self._directory.put(record)

    def withdraw(self) -> None:
        """Unregister our record (goodbye) but keep browsing. Thread-safe."""
        with self._lock:
            info, self._info = self._info, None
            zc = self._zc
        if info is not None and zc is not None:
            zc.unregister_service(info)

    def forget(self, record: NodeRecord) -> None:
        """Drop ``record``'s node from zeroconf's cache (liveness found it dead long ago and
        stopped looking for it; a killed node sends no goodbye), so that its next announcement
        or answer is news (a new "added") if it comes back. Thread-safe."""
        zc = self._zc
        if zc is not None and zc.loop is not None:
            names = (instance_name(record.name, record.node_id), server_name(record.node_id))
            zc.loop.call_soon_threadsafe(forget_instance, zc, names)

    def _remember(self, record: NodeRecord) -> None:
        """A verified peer goes into zeroconf's cache as if its announcement had been heard (a
        newcomer learns most peers from their calls): its goodbye then removes it at once, and
        our queries list it as a known answer. Any thread."""
        zc = self._zc
        if zc is None or zc.loop is None or self._closing or not record.control:
            return
        if not cached(zc.cache.entries_with_name(instance_name(record.name, record.node_id))):
            zc.loop.call_soon_threadsafe(cache_record, zc, record, self._config.record_ttl_s)

    def reverify(self, record: NodeRecord) -> None:
        """Liveness dropped ``record``'s node: forget that its record was verified, so that it
        is verified again when heard again (back after a partition). Thread-safe."""
        self._intake.forget(record.name, record.node_id)

    def requery(self) -> None:
        """Ask the subnet for every node, listing the ones cached here as known answers: only
        nodes missing here answer (those we lost and forgot, back after a partition). Thread-safe.
        """
        zc = self._zc
        if zc is not None and zc.loop is not None:
            zc.loop.call_soon_threadsafe(requery, zc)

    def close(self) -> None:
        with self._lock:
            # The watch's thread may still be handling a change: it sees _closing and skips.
            self._closing = True
            zc, self._zc = self._zc, None
            info, self._info = self._info, None
            watch, self._watch = self._watch, None
            join_query, self._join_query = self._join_query, None
            quick, self._quick = self._quick, None
            announcing, self._broadcast = self._broadcast, None
            resolving, self._resolving = list(self._resolving.values()), {}
        for future in resolving:
            future.cancel()
        try:
            if zc is None:
                return
            if quick is not None:
                quick.close()
            if join_query is not None and zc.loop is not None:
                zc.loop.call_soon_threadsafe(join_query.cancel)
            try:
                if watch is not None:
                    watch.close()
                if info is not None:
                    _say_goodbye(zc, info, announcing)
            finally:
                zc.close()
        finally:
            self._intake.stop()

    # --- zeroconf's thread -----------------------------------------------------------------

    def _on_change(self, state_change: ServiceStateChange, name: str) -> None:
        """The watch's thread: instance ``name`` was added, updated or removed."""
        if self._closing:
            return
        try:
            node, node_id = parse_instance(name)
            if state_change is ServiceStateChange.Removed:
                self._stop_resolving(name)
                self._intake.forget(node, node_id)
                self._directory.remove(node, node_id, "its mDNS record was withdrawn")
                return
            record = self._from_cache(name, node)
            if record is not None:
                if record.node_id != node_id:
                    raise RemoteProtocolError(f"record {node!r}: id differs from its instance name")
                self._intake.accept(record)
        except RemoteProtocolError as exc:
            self._counters.add("refused_records")
            self._rlog.warning("record", "refused discovery record %r: %s", name[:120], exc)
        except Exception:  # a bug here must not kill zeroconf's thread
            self._counters.add("discovery_errors")
            self._rlog.exception("bug", "error handling discovery record %r", name[:120])

    def _from_cache(self, name: str, node: str) -> NodeRecord | None:
        """The record of instance ``name`` if zeroconf's cache holds all of it; else None, and
        it is asked for in zeroconf's loop (:meth:`_resolve`): this thread never waits on the
        network, so a record nobody answers for does not hold up the others. Its answer lands
        in the cache, and the watch calls us again (an update) with the record complete."""
        zeroconf = self._zc
        if zeroconf is None:
            return None
        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.load_from_cache(zeroconf):
            self._start_resolving(zeroconf, SERVICE_TYPE, name)
            return None
        addresses = info.parsed_addresses(IPVersion.V4Only)
        record = decode_txt(node, addresses, info.properties)
        if info.port != (record.control.port if record.control else 0):
            raise RemoteProtocolError(f"record {node!r}: SRV port does not match its ctl endpoint")
        return record

    def _start_resolving(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        loop = zeroconf.loop
        with self._lock:
            if self._closing or loop is None or name in self._resolving:
                return
            if len(self._resolving) >= MAX_RESOLVING:  # a flood of bare names: drop the rest
                self._counters.add("unresolved_records")
                return
            self._resolving[name] = asyncio.run_coroutine_threadsafe(
                self._resolve(zeroconf, service_type, name), loop)

    def _stop_resolving(self, name: str) -> None:
        with self._lock:
            future = self._resolving.pop(name, None)
        if future is not None:
            future.cancel()

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        """Zeroconf's loop: ask for instance ``name``'s records, up to RESOLVE_TIMEOUT_S."""
        try:
            info = AsyncServiceInfo(service_type, name)
            if not await info.async_request(zeroconf, int(RESOLVE_TIMEOUT_S * 1000)):
                self._counters.add("unresolved_records")
                log.debug("record %s did not resolve within %s s", name, RESOLVE_TIMEOUT_S)
        finally:
            with self._lock:
                self._resolving.pop(name, None)

    # --- the intake (thread-safe; see intake.py) --------------------------------------------

    def accept(self, record: NodeRecord, *, direct: bool = False, proven: bool = False) -> None:
        """See :meth:`.intake.Intake.accept`: scope, fabric, keys, our own, then verification.
        Raises RemoteProtocolError for an mDNS record outside the scope. Thread-safe."""
        self._intake.accept(record, direct=direct, proven=proven)

    def introduced(self, node_id: str) -> None:
        """Node ``node_id`` sent us its record in a call verifying ours: it knows us, no hello
        of ours is needed (until it leaves our view). Thread-safe."""
        self._intake.introduced(node_id)

    def knows_us(self, node_id: str) -> bool:
        """Whether node ``node_id`` has our record: it verified ours, or answered a call of ours
        that carried it. Thread-safe."""
        return self._intake.knows_us(node_id)

    def returning(self, node_id: str) -> bool:
        """See :meth:`Intake.returning`. Thread-safe."""
        return self._intake.returning(node_id)

    def checking(self, node_id: str) -> bool:
        """A hint about node ``node_id`` is being verified, waits to be, or waits for a retry
        (liveness need not call it as well). Thread-safe."""
        return self._intake.checking(node_id)

    def verifying(self, name: str) -> bool:
        """A hint claiming node name ``name`` is being verified (or waits to be). Thread-safe."""
        return self._intake.verifying(name)

    def settle(self, name: str, timeout: float) -> bool:
        """Wait until no hint claiming node name ``name`` is being verified (claiming a name:
        only a verified node can hold it). False on timeout. Thread-safe."""
        return self._intake.settle(name, timeout)

    def refused(self) -> list[tuple[NodeRecord, str]]:
        """Peers seen but refused for security reasons (most recent last). Thread-safe."""
        return self._intake.refused()


def _wait_registered(call: concurrent.futures.Future[asyncio.Future[None]],
                     name: str) -> asyncio.Future[None]:
    """The result of :func:`_register` run in zeroconf's loop. That is local work, but on a host
    so busy that the loop gets no CPU for seconds (hundreds of nodes starting on two cores, each
    loop parsing every announcement) it takes longer: past REGISTER_TIMEOUT_S we say so and
    wait up to REGISTER_TIMEOUT_MAX_S in all, then give up with a clear error. (A node that gave
    up at 5 s died in its start() with a bare TimeoutError, at a load average of 775.)"""
    try:
        return call.result(REGISTER_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        log.warning("node %s: registering its mDNS record has taken %.0f s so far (zeroconf's "
                    "thread gets no CPU: is this host overloaded?); waiting up to %.0f s",
                    name, REGISTER_TIMEOUT_S, REGISTER_TIMEOUT_MAX_S)
    try:
        return call.result(REGISTER_TIMEOUT_MAX_S - REGISTER_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        call.cancel()
        raise FabricTimeoutError(
            f"node {name} could not register its mDNS record within {REGISTER_TIMEOUT_MAX_S:.0f}"
            " s: zeroconf's thread is stuck, or this host is too busy to run it",
            timeout=REGISTER_TIMEOUT_MAX_S) from None


async def _register(zc: Zeroconf, info: ServiceInfo, first: bool) -> asyncio.Future[None]:
    """Zeroconf's loop: register (``first``) or update ``info``, and announce it ANNOUNCEMENTS
    times, not zeroconf's three: every node of a host parses each copy. Returns the task."""
    if first:
        theirs = await zc.async_register_service(info, cooperating_responders=True)
    else:
        theirs = await zc.async_update_service(info)
    theirs.cancel()  # type: ignore[attr-defined]  # (not started yet: it sends nothing)

    async def announce() -> None:
        for i in range(ANNOUNCEMENTS):
            if i:
                await asyncio.sleep(ANNOUNCE_INTERVAL_S)
            zc.async_send(zc.generate_service_broadcast(info, None))

    return asyncio.ensure_future(announce())


def _say_goodbye(zc: Zeroconf, info: ServiceInfo, announcing: Any) -> None:
    """Unregister ``info`` and return once its first goodbye is sent. zeroconf repeats it twice,
    125 ms apart, and its close() waits for that (and for repeats of the announcement still to
    come); peers also see the node's control connection close, within milliseconds, so the
    repeats are cancelled."""

    async def goodbye() -> None:
        if announcing is not None:
            announcing.cancel()
        broadcasts = await zc.async_unregister_service(info)  # schedules the goodbyes' task
        await asyncio.sleep(0)  # that task's first step sends the first goodbye
        broadcasts.cancel()  # type: ignore[attr-defined]

    assert zc.loop is not None
    call = asyncio.run_coroutine_threadsafe(goodbye(), zc.loop)
    try:
        call.result(REGISTER_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        # A close must end: peers see our control port close, and drop us, without it.
        call.cancel()
        log.warning("mDNS goodbye for %s not sent within %.0f s (zeroconf's thread gets no "
                    "CPU): closing without it", info.name, REGISTER_TIMEOUT_S)
