"""Verification: mDNS is a hint; the peer itself is the truth.

A discovery record, a hello and a peer introduction only say "there may be a node here". Before
anything of such a hint is used, the verifier asks the advertiser itself: one short-lived DEALER
connects to the control endpoint the hint names, at the hint's address, as a CURVE client of the
hint's key when the fabric is secured (so only the holder of that key's secret can complete the
handshake), and sends the control op ``record``. The answer (the node's own name and TXT map) is
the truth: a hint whose node answers under another name or id, from another port, with another
key or of another fabric is refused; a hint whose sequence number or endpoints differ from the
answer is replaced by the answer. A hint whose advertiser does not complete the call within
VERIFY_TIMEOUT_S (nothing listening, no handshake) is tried again after VERIFY_RETRY_S,
VERIFY_ATTEMPTS times in all, then refused (at once if it refused our key): none of its endpoints
is connected, it is not listed as a node, it cannot claim a name. One that took the connection
but did not answer in time (a node busy starting: dozens starting at once on one host) is called
VERIFY_BUSY_ATTEMPTS times in all, each call waiting longer and the pauses doubling, before it is
refused (a handshake that fails is a failure, not a busy node; on loopback, where the kernel
answers every connect at once, a silent call is a busy node too).

Bounded everywhere: at most MAX_PENDING_VERIFICATIONS calls in flight, MAX_QUEUED_HINTS waiting
(the oldest dropped, counted), VERIFY_BURST then VERIFY_RATE_PER_S calls per advertised address,
one call per distinct hint per VERIFY_CACHE_S (outcomes cached, MAX_VERIFY_CACHE of them). A
probe connects to the hint's control port only, never to another port, and is closed at its
first failure, so an unreachable address costs one connection attempt.

The verifier owns a thread and the sockets of its calls (never a standing connection to a peer);
its other methods are thread-safe and never block (but ``wait_idle``)."""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import NodeConfig
from ..constants import (
    MAX_PENDING_VERIFICATIONS,
    MAX_QUEUED_HINTS,
    MAX_VERIFY_CACHE,
    THREAD_JOIN_TIMEOUT_S,
    VERIFY_ATTEMPTS,
    VERIFY_BURST,
    VERIFY_BUSY_ATTEMPTS,
    VERIFY_CACHE_S,
    VERIFY_LOCAL_FACTOR,
    VERIFY_RATE_PER_S,
    VERIFY_RETRY_MAX_S,
    VERIFY_RETRY_S,
    VERIFY_TICK_MS,
    VERIFY_TIMEOUT_MAX_S,
    VERIFY_TIMEOUT_S,
)
from ..core.buckets import AddressBuckets
from ..core.records import NodeRecord
from ..errors import ClosedError, FabricError, RemoteProtocolError
from ..stats import Counters, RateLimitedLog
from ..transport.inbox import Inbox
from ..transport.sockets import SocketFactory
from .hints import (
    REACHED,
    WHY,
    Decided,
    HintKey,
    Probe,
    close_call,
    hint_key,
    on_loopback,
    open_call,
    read_answer,
    send_call,
)

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)

class Verifier:
    """Checks hints with their advertisers; calls ``admit(record)`` with the answer of each
    verified one and ``refuse(hint, reason)`` for the others, both in the verifier's thread.

    Allocates only; ``start()`` starts the thread, ``stop()`` (idempotent) joins it and closes
    its sockets.
    """

    def __init__(
        self,
        config: NodeConfig,
        sockets: SocketFactory,
        counters: Counters,
        admit: Callable[[NodeRecord], None],
        refuse: Callable[[NodeRecord, str], None],
        me: Callable[[], dict[str, object] | None] = lambda: None,
        knows_us: Callable[[str], None] = lambda node_id: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._sockets = sockets
        self._counters = counters
        self._admit = admit
        self._refuse = refuse
        self._me = me
        self._knows_us = knows_us
        self._clock = clock
        self._lock = threading.Lock()
        self._queued: collections.OrderedDict[HintKey, NodeRecord] = collections.OrderedDict()
        self._cache = Decided()
        self._buckets = AddressBuckets(VERIFY_BURST, VERIFY_RATE_PER_S, VERIFY_LOCAL_FACTOR,
                                       MAX_VERIFY_CACHE)
        self._pending: dict[HintKey, Probe] = {}
        #: Hints whose node did not answer, to try again (submit() may take one out, under the
        #: lock): key -> (due, hint); and the calls made so far for each (thread-owned).
        self._retries: dict[HintKey, tuple[float, NodeRecord]] = {}
        self._tries: dict[HintKey, int] = {}
        self._unreached: set[HintKey] = set()  # retries after a failed connect (under the lock)
        self._last_hint = -math.inf  # when a new hint was last queued
        #: When the thread wakes by itself (its poll's timeout; under the lock): submit() wakes it
        #: only for a hint due before. inf until it first computes one, and while it has none.
        self._wake_at = math.inf
        self._by_sock: dict[Any, Probe] = {}
        self._settled = threading.Condition(self._lock)
        self._ids = int(clock() * 1e6) & 0xFFFFFFFF
        self._inbox = Inbox()
        self._poller = zmq.Poller()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifetime ------------------------------------------------------------------------------

    def start(self, owner: str) -> None:
        self._poller.register(self._inbox.open(), zmq.POLLIN)
        self._thread = threading.Thread(target=self._run, name=f"zmqfabric-verify-{owner}")
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close its sockets. Idempotent; also if never started."""
        self._stopping = True
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._inbox.wake()
        thread.join(THREAD_JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.error("verifier thread %s did not stop within %s s", thread.name,
                      THREAD_JOIN_TIMEOUT_S)
            return
        self._inbox.close()
        with self._lock:
            self._queued.clear()
            self._settled.notify_all()

    # --- any thread ------------------------------------------------------------------------------

    def submit(self, hint: NodeRecord) -> None:
        """Verify ``hint`` soon (unless the same claim was decided within VERIFY_CACHE_S or is
        under way). Never blocks; a full queue drops its oldest hint (counted)."""
        if self._stopping:
            return
        key = hint_key(hint)
        now = self._clock()
        with self._lock:
            expiry = self._cache.until(key)
            if expiry is not None and expiry > now:
                self._counters.add("hints_known")
                return
            if key in self._retries and key in self._unreached:
                # Heard again after a failed connect (back after a cut, the first connect can
                # fail): try now. (One that timed out is busy: it waits VERIFY_RETRY_S.)
                del self._retries[key]
                self._unreached.discard(key)
            elif key in self._pending or key in self._queued or key in self._retries:
                return
            if len(self._queued) >= MAX_QUEUED_HINTS:
                self._queued.popitem(last=False)
                self._counters.add("hints_dropped")
                _rlog.warning("hints", "too many discovery hints waiting for verification: "
                              "dropping the oldest (a flood of records or hellos?)")
            self._queued[key] = hint
            self._last_hint = now
            # Wake the thread if it can call now, or would wake later than this hint's token
            # (it sleeps a tick at least): not once per hint, which in a flood from one address
            # out of tokens woke it (and its look at every queued hint) for nothing.
            wait = self._buckets.wait(hint.address, now)
            wake = wait == 0.0 or now + max(wait, VERIFY_TICK_MS / 1000) < self._wake_at
        if wake:
            self._inbox.nudge()

    def vouch(self, record: NodeRecord) -> bool:
        """Take ``record`` as verified without a call (its node sent it itself, over a
        connection that proves its address, and its key when secured: Intake.accept) if its
        address has a token left; the same claim is then known for VERIFY_CACHE_S. False if a
        call about it is under way or the address is out of tokens: verify it as a hint."""
        key, now = hint_key(record), self._clock()
        with self._lock:
            if key in self._pending or not self._buckets.has(record.address, now):
                return False
            self._buckets.take(record.address, now)
            self._queued.pop(key, None)
            self._retries.pop(key, None)
            self._unreached.discard(key)
            self._remember(key, now + VERIFY_CACHE_S)
        return True

    def forget(self, name: str, node_id: str) -> None:
        """Drop the cached outcomes for node ``name`` with ``node_id`` (it said goodbye: if it
        comes back with the same record, verify it again)."""
        with self._lock:
            self._cache.forget(name, node_id)

    def claims(self, retries: bool = True) -> list[HintKey]:
        """The hints waiting, being verified and (``retries``) waiting to be called again."""
        with self._lock:  # (tuple(): the thread adds calls without the lock)
            return [*self._queued, *tuple(self._pending), *(self._retries if retries else ())]

    def settled(self, quiet: float) -> bool:
        """No new hint for ``quiet`` s, none waiting for its first call or in it (retries are
        not waited for: their node did not answer)."""
        return (self._clock() - self._last_hint >= quiet
                and all(k in self._tries for k in self.claims(retries=False)))

    def wait_idle(self, name: str, timeout: float) -> bool:
        """Wait until no hint claiming ``name`` is waiting or under way; False on timeout."""
        deadline = self._clock() + timeout
        with self._lock:
            while any(k[0] == name for k in (*self._queued, *self._pending)):
                left = deadline - self._clock()
                if left <= 0 or self._stopping:
                    return False
                self._settled.wait(min(left, 0.05))
        return True

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        inbox, fd = self._inbox, self._inbox.fd
        try:
            while not self._stopping:
                try:
                    events = inbox.poll(self._poller, self._timeout_ms())
                except zmq.ContextTerminated:
                    return
                try:
                    for sock in events:
                        if sock != fd:
                            self._on_event(sock)
                    self._expire()
                    self._launch()
                except (zmq.ContextTerminated, ClosedError):
                    return  # the node is closing: its sockets are going away
                except Exception:  # a bug here must not end verification for the node
                    self._counters.add("verify_errors")
                    _rlog.exception("verify", "error in the verifier thread")
        finally:
            for probe in {id(p): p for p in self._by_sock.values()}.values():
                self._close(probe)
            self._pending.clear()

    def _timeout_ms(self) -> int | None:
        """How long the thread may sleep: until the first call's deadline, retry or token for a
        queued hint (None: nothing to wait for). Not a fixed tick: hundreds of nodes on one host
        woke each other's cores for nothing."""
        now = self._clock()
        due = [p.deadline for p in self._pending.values()]
        with self._lock:
            due.extend(when for when, _ in self._retries.values())
            if self._queued and len(self._pending) < MAX_PENDING_VERIFICATIONS:
                # Per address, not per hint: a flood queues hundreds from one address.
                due.append(now + min(self._buckets.wait(address, now)
                                     for address in {h.address for h in self._queued.values()}))
            timeout = max(VERIFY_TICK_MS, math.ceil((min(due) - now) * 1000)) if due else None
            self._wake_at = math.inf if timeout is None else now + timeout / 1000
        return timeout

    def _launch(self) -> None:
        """Start probes for queued hints while slots are free and their address has tokens."""
        now = self._clock()
        if self._retries:
            with self._lock:  # submit() may take a retry out
                for key in [k for k, (when, _) in self._retries.items() if when <= now]:
                    _, retry = self._retries.pop(key)
                    self._unreached.discard(key)
                    if key in self._pending or key in self._queued:
                        continue  # heard again meanwhile: being checked already
                    if len(self._queued) < MAX_QUEUED_HINTS:
                        self._queued[key] = retry
                    else:
                        self._tries.pop(key, None)  # no room: dropped like a new hint
        spent: set[str] = set()  # addresses out of tokens: skip their hints without asking again
        while len(self._pending) < MAX_PENDING_VERIFICATIONS:
            with self._lock:
                hint = self._next_hint(spent, now)
                if hint is None:
                    return
                key = hint_key(hint)
                del self._queued[key]
                if key in self._pending:
                    continue  # already being checked: one probe per claim at a time
                self._buckets.take(hint.address, now)
            self._probe(hint, key, now)

    def _next_hint(self, spent: set[str], now: float) -> NodeRecord | None:
        """The oldest queued hint whose address has a token (under the lock); adds the addresses
        found without one to ``spent``."""
        for hint in self._queued.values():
            address = hint.address
            if address in spent:
                continue
            if self._buckets.has(address, now):
                return hint
            spent.add(address)
        return None

    def _probe(self, hint: NodeRecord, key: HintKey, now: float) -> None:
        if hint.control is None:
            self._decide(hint, key, None, "it has no control endpoint")
            return
        # One connection attempt per call: the first failure ends it (no reconnection first).
        timeout = min(VERIFY_TIMEOUT_S * (1 + self._tries.get(key, 0)), VERIFY_TIMEOUT_MAX_S)
        self._ids = (self._ids + 1) & 0xFFFFFFFF
        probe = open_call(self._sockets, hint, key, self._ids, now, timeout)
        self._pending[key] = probe
        self._by_sock[probe.sock] = probe
        self._by_sock[probe.monitor] = probe
        self._poller.register(probe.sock, zmq.POLLIN)
        self._poller.register(probe.monitor, zmq.POLLIN)
        self._counters.add("verifications")
        try:
            send_call(self._sockets, probe, self._me())  # with our record: no call back
        except (zmq.ZMQError, FabricError) as exc:
            self._decide(hint, key, None, f"cannot reach its control endpoint: {exc}",
                         transient=True)

    def _on_event(self, sock: Any) -> None:
        probe = self._by_sock.get(sock)
        if probe is None:
            return
        if sock is probe.monitor:
            try:
                event = recv_monitor_message(probe.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind & REACHED:
                probe.reached = True
            elif self._pending.get(probe.key) is probe:  # a refusal of our key: no second try
                self._decide(probe.hint, probe.key, None, WHY.get(kind, "its connection failed"),
                             transient=True, retry=kind != zmq.EVENT_HANDSHAKE_FAILED_AUTH)
                if probe.key in self._retries:
                    with self._lock:
                        self._unreached.add(probe.key)
            return
        try:
            answer = read_answer(probe)
        except RemoteProtocolError as exc:
            self._decide(probe.hint, probe.key, None, str(exc))
            return
        if answer is not None:
            if answer.seq != probe.hint.seq or answer.endpoints != probe.hint.endpoints:
                self._counters.add("hints_corrected")
            self._decide(probe.hint, probe.key, answer, "")

    def _expire(self) -> None:
        now = self._clock()
        for probe in [p for p in self._pending.values() if p.deadline <= now]:
            what = "took the connection but " if probe.reached else ""
            self._decide(probe.hint, probe.key, None,
                         f"its control endpoint {what}did not answer within {probe.timeout:g} s",
                         transient=True, busy=probe.reached or on_loopback(probe.hint.address))

    def _decide(self, hint: NodeRecord, key: HintKey, answer: NodeRecord | None, why: str,
                transient: bool = False, retry: bool = True, busy: bool = False) -> None:
        """Record the outcome: remembered VERIFY_CACHE_S, or VERIFY_RETRY_S for a failure that
        may pass (no answer, a dropped connection: a node busy or still starting; tried again
        first unless ``retry`` is False; up to VERIFY_BUSY_ATTEMPTS times if ``busy``: it took
        the connection)."""
        probe = self._pending.pop(key, None)
        if probe is not None:
            self._close(probe)
        tries = self._tries.pop(key, 0) + 1
        attempts = VERIFY_BUSY_ATTEMPTS if busy else VERIFY_ATTEMPTS
        if answer is None and transient and retry and tries < attempts:
            if len(self._retries) < MAX_QUEUED_HINTS:  # try again soon: a busy or starting node
                pause = min(VERIFY_RETRY_S * 2 ** (tries - 1), VERIFY_RETRY_MAX_S)
                self._retries[key] = (self._clock() + pause, hint)
                self._tries[key] = tries
                while len(self._tries) > 2 * MAX_QUEUED_HINTS:  # hints dropped from the queue
                    del self._tries[next(iter(self._tries))]
                self._counters.add("hints_retried")
                return
        with self._lock:
            self._remember(key, self._clock() + (VERIFY_RETRY_S if transient else VERIFY_CACHE_S))
        if answer is None:
            self._counters.add("hints_refused")
            self._refuse(hint, f"unverified: {why}")
        else:
            self._counters.add("hints_verified")
            if probe is not None:
                # The node the hint named answered at its address: the call was no abuse of that
                # address, and a host of many nodes (one loopback) is not slowed by its count.
                with self._lock:
                    self._buckets.give(hint.address, self._clock())
            if probe is not None and probe.introduced and answer.curve_key:
                # Before the admission, whose listeners greet a newcomer that does not know us:
                # over CURVE our 'me' is our proven word, taken without a call back. (Without
                # keys the newcomer's call back proves it: Membership waits for it.)
                self._knows_us(answer.node_id)
            self._admit(answer)

    def _remember(self, key: HintKey, until: float) -> None:
        """A claim decided, not checked again until ``until`` (under the lock)."""
        self._cache.remember(key, until)
        self._settled.notify_all()

    def _close(self, probe: Probe) -> None:
        self._by_sock.pop(probe.sock, None)
        self._by_sock.pop(probe.monitor, None)
        self._poller.unregister(probe.sock)
        self._poller.unregister(probe.monitor)
        close_call(probe)
