"""The child's side of ``zmqfabric demo``: what a role function gets, and how it reports.

A role (:mod:`.roles`) runs in a spawned child and talks to the parent (:mod:`.run`) through a
:class:`Child`: reports go over its own pipe (msgpack, never pickle: :func:`encode_report`), and
three events shared with every child (:class:`Controls`) steer it. :class:`Names` names the
nodes and endpoints of one run, :class:`RoleSpec` is everything a child is told. A child also
stops when its parent disappears, so no child outlives the demo.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

import msgpack

from ...config import Scope

#: Children report counts this often (s) while traffic runs ...
PROGRESS_S = 0.25
#: ... and this often while the parent waits for the last messages to arrive.
DRAIN_PROGRESS_S = 0.05
#: Granularity (s) of every wait in a child: how fast it notices stop or a vanished parent.
TICK_S = 0.05


class Stopped(Exception):
    """The parent asked this child to stop (or vanished) before its work was done."""


class RoleError(Exception):
    """A child could not play its role; the parent shows the message."""


@dataclass(frozen=True, slots=True)
class Names:
    """Node and endpoint names of one demo run; ``run_id`` keeps runs apart."""

    run_id: str

    def node(self, role_id: str) -> str:
        return f"demo-{self.run_id}-{role_id}"

    @property
    def service(self) -> str:
        return f"demo-{self.run_id}.square"

    @property
    def stream(self) -> str:
        return f"demo-{self.run_id}.ticks"

    @property
    def jobs(self) -> str:
        return f"demo-{self.run_id}.jobs"

    @property
    def results(self) -> str:
        return f"demo-{self.run_id}.results"


@dataclass(frozen=True, slots=True)
class RoleSpec:
    role: str
    index: int
    names: Names
    scope: Scope
    providers: int
    workers: int
    pub_rate: int
    startup_timeout: float
    #: Level of the child's log lines on stderr (the parent's level; warnings only with -v).
    log_level: int = logging.ERROR
    #: The port this role's node serves Prometheus metrics on (None: it does not).
    metrics_port: int | None = None

    @property
    def role_id(self) -> str:
        return f"{self.role}-{self.index}" if self.index else self.role


@dataclass(frozen=True, slots=True)
class Controls:
    """The parent's three events (multiprocessing events, shared with every child)."""

    go: Any
    stop_sources: Any
    stop: Any


class Child:
    """What a role function gets: its spec, the report pipe and the parent's events."""

    def __init__(self, spec: RoleSpec, conn: Connection, controls: Controls) -> None:
        self.spec = spec
        self._conn = conn
        self._controls = controls
        self._parent = os.getppid()
        self._next_progress = 0.0

    def send(self, kind: str, data: dict[str, Any]) -> None:
        self._conn.send_bytes(encode_report(kind, data))

    def ready(self) -> None:
        self.send("ready", {})

    def progress(self, counts: Callable[[], dict[str, Any]]) -> None:
        """Send ``counts()`` if the last report is old enough (cheap to call per message)."""
        now = time.monotonic()
        if now >= self._next_progress:
            every = DRAIN_PROGRESS_S if self._controls.stop_sources.is_set() else PROGRESS_S
            self._next_progress = now + every
            self.send("progress", counts())

    def stopping(self) -> bool:
        """True once the parent says stop or is gone."""
        return self._controls.stop.is_set() or os.getppid() != self._parent

    def sources_stopping(self) -> bool:
        return self._controls.stop_sources.is_set() or self.stopping()

    def wait_go(self) -> None:
        """Wait for the parent's go; raises Stopped if it says stop instead."""
        deadline = time.monotonic() + self.spec.startup_timeout * 2
        while not self._controls.go.wait(TICK_S):
            if self.stopping() or time.monotonic() > deadline:
                raise Stopped
        if self.stopping():
            raise Stopped

    def wait_stop(self) -> None:
        while not self._controls.stop.wait(TICK_S):
            if self.stopping():
                return

    def go_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the parent's go; True once it came."""
        return bool(self._controls.go.wait(seconds))

    def pace(self, seconds: float) -> None:
        """Wait ``seconds`` (pacing a rate), returning early when sources stop."""
        self._controls.stop_sources.wait(seconds)

    def until(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll ``ready()`` (each call waits at most about TICK_S) until true, bounded. Tells
        the parent what it waits for, so a start-up that times out says why."""
        if ready():
            return
        self.send("waiting", {"for": what})
        deadline = time.monotonic() + self.spec.startup_timeout
        while not ready():
            if self.stopping():
                raise Stopped
            if time.monotonic() > deadline:
                raise RoleError(f"{what} not within {self.spec.startup_timeout:g} s")


def encode_report(kind: str, data: dict[str, Any]) -> bytes:
    """A report on the pipe: msgpack ``[kind, data]`` (reports are never pickled)."""
    return msgpack.packb([kind, data])


def decode_report(frame: bytes) -> tuple[str, dict[str, Any]]:
    """Inverse of :func:`encode_report`. Raises ValueError for anything else."""
    try:
        kind, data = msgpack.unpackb(frame, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed demo report: {exc}") from exc
    if not isinstance(kind, str) or not isinstance(data, dict):
        raise ValueError("malformed demo report")
    return kind, data
