"""``zmqfabric demo``: a small fabric of real processes on this host, measured.

The parent spawns one process per role (see :mod:`zmqfabric.cli.demo.roles`): a service with two
providers and a client, a publisher with two subscribers, and a pipeline producer -> workers ->
sink. The children find each other by discovery only. The parent waits until every child reports
ready (a handshake, not a sleep), lets traffic run for ``duration`` seconds, stops the sources,
waits until every message sent has arrived, then stops and reaps everyone and proves the counts:
every request answered, every event delivered to every subscriber, every job exactly once at the
sink (by id).

:func:`run_demo` reports through a callback and returns a :class:`DemoSummary`
(:mod:`.report`: the events and the summary); it never prints.
Children are always joined, then terminated, then killed, each with a timeout; a child also exits
by itself when its parent disappears.
"""

from __future__ import annotations

import logging
import multiprocessing
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, Callable

from ...config import Scope
from ...errors import FabricError
from .child import Controls, Names, RoleSpec, decode_report
from .report import (
    DemoSummary,
    PatternResult,
    Progress,
    Ready,
    Started,
    Waiting,
    summarize,
    summary_lines,
)
from .roles import child_main

# The CLI and tests take the summary from here too.
__all__ = ["DemoError", "DemoSettings", "DemoSummary", "PatternResult", "run_demo",
           "summary_lines"]

log = logging.getLogger(__name__)

#: The parent reports progress this often (s) while traffic runs.
REPORT_EVERY_S = 1.0
#: After the sources stop, messages in flight arrive: the parent waits while the receivers'
#: counts still grow, at most DRAIN_STALL_S (s) without growth and DRAIN_MAX_S (s) in all. The
#: queues hold more than their high-water marks (the kernel's socket buffers too), so on a loaded
#: host the backlog can take seconds to drain; late is not lost.
DRAIN_STALL_S = 5.0
DRAIN_MAX_S = 60.0
#: Children send their final counts within this (s) of being told to stop.
FINAL_TIMEOUT_S = 5.0
#: Joining children: a clean exit (goodbye on discovery, sockets closed) within JOIN, then
#: SIGTERM and SIGKILL, each followed by a join of KILL_JOIN seconds.
JOIN_TIMEOUT_S = 5.0
KILL_JOIN_S = 2.0

SOURCES = ("client", "publisher", "producer")
#: Reports are a few counters; the largest (a final with per-node counts) is well under this.
MAX_REPORT_BYTES = 64 * 1024


class DemoError(FabricError):
    """The demo could not run: a child failed, or a handshake did not complete in time."""


@dataclass(frozen=True, slots=True)
class DemoSettings:
    duration: float = 6.0
    workers: int = 3
    scope: Scope = field(default_factory=Scope)
    providers: int = 2
    subscribers: int = 2
    #: Events per second the publisher sends (pub/sub has no backpressure: it drops at HWM).
    pub_rate: int = 5000
    startup_timeout: float = 20.0
    #: The first of the consecutive ports the nodes serve Prometheus metrics on (None: none do).
    metrics_port: int | None = None

    @property
    def node_count(self) -> int:
        """Processes (one node each): sink, producer, client, publisher and the rest."""
        return 4 + self.workers + self.providers + self.subscribers


# --- the processes -----------------------------------------------------------------------------


class Fleet:
    """The demo's child processes and the pipes they report on. Not thread-safe."""

    def __init__(self, mp: SpawnContext, specs: list[RoleSpec], controls: Controls) -> None:
        self._mp = mp
        self._specs = specs
        self._controls = controls
        self._procs: dict[str, SpawnProcess] = {}
        self._conns: dict[Connection, str] = {}
        self._stopping = False
        self.ready: set[str] = set()
        self.waiting: dict[str, str] = {}
        self.latest: dict[str, dict[str, Any]] = {}
        self.finals: dict[str, dict[str, Any]] = {}
        self.failures: list[str] = []

    def start(self) -> None:
        # Children are born with SIGINT ignored: Ctrl-C reaches the whole process group, and the
        # parent, not each child, decides how to stop.
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for spec in self._specs:
                reader, writer = self._mp.Pipe(duplex=False)
                proc = self._mp.Process(target=child_main, args=(spec, writer, self._controls),
                                        name=f"zmqfabric-demo-{spec.role_id}")
                try:
                    proc.start()
                except BaseException:
                    reader.close()
                    raise
                finally:
                    writer.close()  # only the child writes: EOF here means it has exited
                self._procs[spec.role_id] = proc
                self._conns[reader] = spec.role_id
        finally:
            if main:
                signal.signal(signal.SIGINT, old)

    def pump(self, timeout: float) -> None:
        """Take every report that arrives within ``timeout`` seconds."""
        alive = [p.sentinel for p in self._procs.values() if p.is_alive()]
        ready = wait([*self._conns, *alive], max(0.0, timeout))
        for conn in ready:
            if isinstance(conn, Connection) and conn in self._conns:
                self._receive(conn)

    def _receive(self, conn: Connection) -> None:
        role_id = self._conns[conn]
        try:
            kind, data = decode_report(conn.recv_bytes(MAX_REPORT_BYTES))
        except ValueError as exc:
            self.failures.append(f"{role_id}: {exc}")
            return
        except (EOFError, OSError):
            del self._conns[conn]
            conn.close()
            if role_id not in self.finals and not self._stopping:
                proc = self._procs[role_id]
                proc.join(0.5)
                self.failures.append(f"{role_id} exited early (exit code {proc.exitcode})")
            return
        if kind == "ready":
            self.ready.add(role_id)
            self.waiting.pop(role_id, None)
        elif kind == "waiting":
            self.waiting[role_id] = str(data.get("for", "?"))
        elif kind == "progress":
            self.latest[role_id] = data
        elif kind == "final":
            self.latest[role_id] = self.finals[role_id] = data
        elif kind == "error":
            self.failures.append(f"{role_id}: {data['error']}")

    def pump_until(self, done: Callable[[], bool], timeout: float,
                   what: Callable[[], str] | None, tick: Callable[[], None] | None = None) -> bool:
        """Pump until ``done()``; at ``timeout`` raise DemoError saying ``what()`` was awaited
        (or return False when ``what`` is None). Raises DemoError as soon as a child fails."""
        deadline = time.monotonic() + timeout
        next_tick = time.monotonic() + REPORT_EVERY_S
        while not done():
            self.check()
            now = time.monotonic()
            if now >= deadline:
                if what is None:
                    return False
                raise DemoError(f"timed out after {timeout:g} s waiting for {what()}")
            if tick is not None and now >= next_tick:
                tick()
                next_tick += REPORT_EVERY_S
            self.pump(min(deadline, next_tick) - now)
        self.check()
        return True

    def check(self) -> None:
        if self.failures and not self._stopping:
            raise DemoError("demo process failed: " + "; ".join(self.failures))

    def missing(self, have: set[str] | dict[str, Any], explain: bool = False) -> str:
        """The role ids not in ``have`` (``explain``: with what each waits for), for messages."""
        return ", ".join(
            f"{role_id} ({self.waiting.get(role_id, 'still starting')})" if explain else role_id
            for role_id in sorted(set(self._procs) - set(have))
        ) or "none"

    def shutdown(self) -> None:
        """Join every child (still reading its reports), then terminate, then kill. Idempotent."""
        self._stopping = True
        self._controls.stop_sources.set()
        self._controls.stop.set()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while any(p.is_alive() for p in self._procs.values()) and time.monotonic() < deadline:
            self.pump(min(0.1, max(0.0, deadline - time.monotonic())))
        for role_id, proc in self._procs.items():
            if proc.is_alive():
                log.warning("demo process %s did not exit; terminating it", role_id)
                proc.terminate()
                proc.join(KILL_JOIN_S)
            if proc.is_alive():
                log.warning("demo process %s ignored SIGTERM; killing it", role_id)
                proc.kill()
                proc.join(KILL_JOIN_S)
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()

    # --- counts for progress ------------------------------------------------------------------

    def count(self, role_id: str, key: str) -> int:
        return int(self.latest.get(role_id, {}).get(key, 0))

    def progress(self, elapsed: float, phase: str = "traffic") -> Progress:
        # Reports arrive up to PROGRESS_S apart, so a sender's last report can lag its
        # receivers'; what was received was sent, so show the larger count as sent.
        subs = sorted(r for r in self._procs if r.startswith("subscriber"))
        delivered = tuple(self.count(s, "received") for s in subs)
        completed = self.count("sink", "unique")
        return Progress(elapsed, self.count("client", "replies"),
                        max(self.count("publisher", "sent"), *delivered), delivered,
                        max(self.count("producer", "sent"), completed), completed, phase)

    def drain(self) -> None:
        """Pump until :meth:`drained`, while the receivers' counts still grow (see
        DRAIN_STALL_S); what has not arrived then is reported as missing."""
        end = time.monotonic() + DRAIN_MAX_S
        seen: list[tuple[int, ...]] = [()]
        moved = lambda: self.drained() or self.arrived() != seen[0]  # noqa: E731
        while not self.drained():
            seen[0] = self.arrived()
            wait = min(DRAIN_STALL_S, end - time.monotonic())
            if wait <= 0 or not self.pump_until(moved, wait, None):
                return

    def arrived(self) -> tuple[int, ...]:
        """What the receivers have counted so far."""
        return (self.count("sink", "unique"),
                *(self.count(r, "received") for r in self._procs if r.startswith("subscriber")))

    def drained(self) -> bool:
        """Everything the (finished) sources sent has arrived."""
        sent = self.finals["publisher"]["sent"]
        subs = [r for r in self._procs if r.startswith("subscriber")]
        return (all(self.count(s, "received") >= sent for s in subs)
                and self.count("sink", "unique") >= self.finals["producer"]["sent"])


def _specs(settings: DemoSettings, names: Names) -> list[RoleSpec]:
    level = logging.getLogger().getEffectiveLevel()
    child_level = logging.ERROR if level >= logging.WARNING else level
    counts = [("sink", 1), ("worker", settings.workers), ("producer", 1),
              ("provider", settings.providers), ("client", 1),
              ("subscriber", settings.subscribers), ("publisher", 1)]
    roles = [(role, index if n > 1 else 0) for role, n in counts for index in range(1, n + 1)]
    first = settings.metrics_port
    return [
        RoleSpec(role, index, names, settings.scope, settings.providers, settings.workers,
                 settings.pub_rate, settings.startup_timeout, child_level,
                 None if first is None else first + position)
        for position, (role, index) in enumerate(roles)
    ]


def run_demo(settings: DemoSettings, on_event: Callable[[Any], None]) -> DemoSummary:
    """Run the demo; report Started/Waiting/Ready/Progress events to ``on_event`` (in this
    thread) and return the summary. Raises DemoError; KeyboardInterrupt stops every child first.
    """
    names = Names(secrets.token_hex(3))
    specs = _specs(settings, names)
    mp = multiprocessing.get_context("spawn")
    controls = Controls(mp.Event(), mp.Event(), mp.Event())
    fleet = Fleet(mp, specs, controls)
    began = time.monotonic()
    try:
        fleet.start()
        on_event(Started(names.run_id, len(specs), tuple(s.role_id for s in specs)))
        not_ready = lambda: fleet.missing(fleet.ready, explain=True)  # noqa: E731
        fleet.pump_until(
            lambda: len(fleet.ready) == len(specs), settings.startup_timeout,
            lambda: f"the processes to find their peers; not ready: {not_ready()}",
            tick=lambda: on_event(Waiting(time.monotonic() - began, len(fleet.ready), len(specs))))
        startup_s = time.monotonic() - began
        on_event(Ready(startup_s, settings.duration))
        controls.go.set()
        go = time.monotonic()
        fleet.pump_until(lambda: time.monotonic() - go >= settings.duration, settings.duration + 1,
                         None, tick=lambda: on_event(fleet.progress(time.monotonic() - go)))
        controls.stop_sources.set()
        traffic_s = time.monotonic() - go
        fleet.pump_until(lambda: all(s in fleet.finals for s in SOURCES), FINAL_TIMEOUT_S,
                         lambda: f"the sources' counts (missing: {fleet.missing(fleet.finals)})")
        fleet.drain()
        on_event(fleet.progress(time.monotonic() - go, "drained"))
        controls.stop.set()
        fleet.pump_until(lambda: len(fleet.finals) == len(specs), FINAL_TIMEOUT_S,
                         lambda: f"the final counts (missing: {fleet.missing(fleet.finals)})")
        return summarize(fleet.finals, names.run_id, len(specs), traffic_s, startup_s)
    finally:
        fleet.shutdown()
