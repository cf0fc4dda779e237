"""A fleet of node processes on loopback, one node each, watched through one selector.

Each child runs one node of a fabric of its own (other nodes on this host's loopback, such as
other test suites, are invisible to it) and prints JSON arrays: ``["ready", t]`` once started,
``["threads", {native id: thread name}]`` after that, ``["joined" | "left", t, name]`` for every
change of its directory (t: the monotonic clock, which
is system-wide on Linux, so children's times compare with ours), ``["stats", counters, names]``
on SIGUSR1. SIGTERM closes the node cleanly (its goodbye); SIGKILL is a crash.

Used by tests/test_scale.py and perf/scale.py. ``netns`` runs the children in a network namespace
(``ip netns exec``, which execs Python: the pid is the node's).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent

NODE = r"""
import json, logging, os, signal, sys, threading, time
import zmqfabric as zf
if os.environ.get("ZF_FLEET_LOG"):
    logging.basicConfig(level=logging.INFO, format="%(created).3f %(threadName)s %(message)s")
    logging.getLogger("zmqfabric.discovery.liveness").setLevel(logging.DEBUG)

name, fabric, timing, keys = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
lock = threading.Lock()

def emit(*fields):
    with lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

if timing:  # (main's code before SWIM has no liveness timers: perf/scale.py --source)
    from zmqfabric.core.swim import Timing
    config = zf.NodeConfig(fabric=fabric, liveness=Timing(**timing))
else:
    config = zf.NodeConfig(fabric=fabric)
node = zf.Node(name, config=config, keys=keys or None)
node.directory.listen(lambda e: emit(e.change.value, time.monotonic(), e.record.name))
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=lambda: emit(
    "stats", node.counters.snapshot(), [r.name for r in node.directory.records()])).start())
node.start()
emit("ready", time.monotonic(), node.node_id)
emit("threads", {str(t.native_id): t.name for t in threading.enumerate()})
while not stop.wait(1.0):
    pass
node.close()
emit("closed", time.monotonic())
"""


@dataclass
class Member:
    """One child and what it reported."""

    name: str
    proc: subprocess.Popen[bytes]
    buf: bytes = b""
    ready: float | None = None
    node_id: str = ""
    closed: float | None = None
    killed: float | None = None
    view: set[str] = field(default_factory=set)
    events: list[tuple[str, float, str]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    sees: list[str] | None = None
    threads: dict[str, str] = field(default_factory=dict)  # native id -> Python thread name

    @property
    def pid(self) -> int:
        return self.proc.pid

    def first(self, change: str, name: str, since: float = 0.0) -> float | None:
        """When this node first reported ``change`` about ``name`` at or after ``since``."""
        return next((t for k, t, n in self.events if k == change and n == name and t >= since),
                    None)


class Fleet:
    """Children spawned with :meth:`spawn`, read with :meth:`pump`; ``close()`` (or ``with``)
    stops and reaps them all."""

    def __init__(self, fabric: str, *, timing: dict[str, float] | None = None,
                 netns: str | None = None, logs: Path | None = None,
                 source: Path = ROOT) -> None:
        self.fabric = fabric
        self.timing = timing or {}
        self.netns = netns
        self.logs = logs
        self.source = source
        self.members: dict[str, Member] = {}
        #: Node name -> its key directory (secured nodes).
        self.keys: dict[str, Path] = {}
        self._sel = selectors.DefaultSelector()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, name: str) -> Member:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.source)
        env.pop("ZMQFABRIC_INTERFACE", None)
        stderr: Any = subprocess.DEVNULL
        if self.logs is not None:
            env["ZF_FLEET_LOG"] = "1"
            stderr = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - the child's now
        argv = [sys.executable, "-c", NODE, name, self.fabric, json.dumps(self.timing),
                str(self.keys.get(name, ""))]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, cwd=str(self.source), env=env)
        if stderr is not subprocess.DEVNULL:
            stderr.close()
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        member = self.members[name] = Member(name, proc)
        self._sel.register(proc.stdout, selectors.EVENT_READ, member)
        return member

    def pump(self, timeout: float) -> None:
        """Read what the children printed, waiting up to ``timeout`` s for something."""
        for key, _ in self._sel.select(timeout):
            member: Member = key.data
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                self._sel.unregister(key.fileobj)
                continue
            member.buf += chunk
            *lines, member.buf = member.buf.split(b"\n")
            for line in lines:
                self._take(member, json.loads(line))

    def _take(self, member: Member, fields: list[Any]) -> None:
        kind = fields[0]
        if kind == "ready":
            member.ready = fields[1]
            member.node_id = fields[2] if len(fields) > 2 else ""
        elif kind == "closed":
            member.closed = fields[1]
        elif kind in ("joined", "left"):
            member.events.append((kind, fields[1], fields[2]))
            (member.view.add if kind == "joined" else member.view.discard)(fields[2])
        elif kind == "stats":
            member.counters, member.sees = fields[1], fields[2]
        elif kind == "threads":
            member.threads = fields[1]

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Pump until ``predicate()``; False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.2))
        return True

    def sleep(self, seconds: float) -> None:
        """Keep reading for ``seconds`` (children must not block on a full pipe)."""
        until = time.monotonic() + seconds
        self.wait(lambda: time.monotonic() >= until, seconds + 1)

    def log(self, name: str) -> list[str]:
        """The log lines of node ``name`` (with ``logs``; liveness at DEBUG)."""
        if self.logs is None:
            return []
        return (self.logs / f"{name}.log").read_text(errors="replace").splitlines()

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.killed is None and m.closed is None]

    def full(self, members: list[Member] | None = None) -> bool:
        """Whether every live node lists every live node."""
        names = {m.name for m in self.alive()}
        return all(names <= m.view for m in (members or self.alive()))

    def full_at(self, member: Member) -> float | None:
        """When ``member`` first listed every other live node (from its events)."""
        names = {m.name for m in self.alive()}
        view: set[str] = set()
        for kind, t, name in member.events:
            (view.add if kind == "joined" else view.discard)(name)
            if names <= view:
                return t
        return None

    def kill(self, member: Member) -> float:
        """SIGKILL ``member``; returns when (taken before the signal: the child's reactions
        come after it)."""
        member.killed = time.monotonic()
        member.proc.kill()
        return member.killed

    def terminate(self, member: Member) -> float:
        """SIGTERM ``member`` (a clean close); returns when, taken before the signal."""
        now = time.monotonic()
        member.proc.send_signal(signal.SIGTERM)
        return now

    def collect(self) -> None:
        """Ask every live node for its counters and directory (SIGUSR1) and read them."""
        alive = self.alive()
        for member in alive:
            member.sees = None
            member.proc.send_signal(signal.SIGUSR1)
        self.wait(lambda: all(m.sees is not None for m in alive), 30)

    def close(self) -> None:
        for member in self.members.values():
            if member.proc.poll() is None:
                member.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for member in self.members.values():
            try:
                member.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.proc.kill()
                member.proc.wait(5)
            if member.proc.stdout is not None:
                member.proc.stdout.close()
        self._sel.close()


def thread_run_ns(pid: int) -> dict[str, tuple[str, int]]:
    """Run time (ns) of each thread of ``pid`` so far, from /proc/PID/task/*/schedstat:
    ``{tid: (kernel thread name, ns)}``; threads that end meanwhile are left out."""
    out: dict[str, tuple[str, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="ascii") as f:
                comm = f.read().strip()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        out[tid] = (comm, ns)
    return out


def cpu_ns(pid: int) -> int:
    """Run time of every thread of ``pid`` so far (ns)."""
    return sum(ns for _, ns in thread_run_ns(pid).values())


def thread_cpu_ns(member: Member) -> dict[str, int]:
    """Run time (ns) of each thread of ``member`` so far, by kind: its Python thread name
    without the node's name (``zmqfabric-verify``), or the kernel's (``ZMQbg/IO/0``)."""
    out: dict[str, int] = {}
    for tid, (comm, ns) in thread_run_ns(member.pid).items():
        name = member.threads.get(tid, comm)
        if name.endswith("-" + member.name):
            name = name[: -len(member.name) - 1]
        out[name] = out.get(name, 0) + ns
    return out


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
