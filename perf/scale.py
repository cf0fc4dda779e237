"""Membership at scale on one host: N nodes on loopback, one process each.

For each N it reports:

- ``converge_s``: from the moment the last node is ready (``start()`` returned) until every node
  lists every other (its directory holds N records);
- idle cost per node once converged, over ``--idle`` seconds: CPU (% of one core, from the
  kernel's per-thread run time), RSS and open file descriptors (p50 and max over the nodes);
- ``drop_s``: K nodes are SIGKILLed at once; the time until every survivor has dropped all K
  (max over survivors; p50 too);
- ``false_deaths``: "left" events about nodes that were neither killed nor stopped, from the
  first node ready to the end (each also re-joins, counted as ``rejoins``).

All nodes join a fabric of their own (``--fabric``, a fresh name by default), so other nodes on
this host's loopback (other test suites) are invisible to them, though they share mDNS traffic.
``--source DIR`` runs the nodes from another checkout (e.g. main's code, for a "before" figure).

    python3 perf/scale.py --nodes 50 --nodes 100 --kill 10 [--idle 30] [--json]
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import click

ROOT = Path(__file__).resolve().parent.parent

#: One node. Prints JSON arrays: ["ready", t], ["full", t] once it lists all N nodes, then
#: ["joined"|"left", t, name] for every later change; runs until SIGTERM (clean close).
NODE = r"""
import json, signal, sys, threading, time
import zmqfabric as zf

total, name, fabric = int(sys.argv[1]), sys.argv[2], sys.argv[3]
lock = threading.Lock()
full = []

def emit(*fields):
    with lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

node = zf.Node(name, fabric=fabric)

def check_full():
    with lock:
        if full or len(node.directory.records()) < total:
            return
        full.append(time.monotonic())
    emit("full", full[0])

def on_event(event):
    t = time.monotonic()
    if full:
        emit(event.change.value, t, event.record.name)
    elif event.change.value == "joined":
        check_full()
    elif event.change.value == "left":
        emit("left", t, event.record.name)

node.directory.listen(on_event)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
node.start()
emit("ready", time.monotonic())
check_full()
while not stop.wait(1.0):
    pass
node.close()
emit("closed", time.monotonic())
"""


@dataclass
class Member:
    name: str
    proc: subprocess.Popen[bytes]
    buf: bytes = b""
    ready: float | None = None
    full: float | None = None
    killed: float | None = None
    events: list[tuple[str, float, str]] = field(default_factory=list)


class Fabric:
    """N child processes and a selector over their stdout."""

    def __init__(self, count: int, source: Path, fabric: str, netns: str | None) -> None:
        self.count = count
        self.netns = netns
        self.source = source
        self.fabric = fabric
        self.members: dict[str, Member] = {}
        self.sel = selectors.DefaultSelector()

    def spawn(self, name: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.source)
        env.pop("ZMQFABRIC_INTERFACE", None)
        argv = [sys.executable, "-c", NODE, str(self.count), name, self.fabric]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]  # execs python: same pid
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=str(self.source), env=env,
        )
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        member = Member(name, proc)
        self.members[name] = member
        self.sel.register(proc.stdout, selectors.EVENT_READ, member)

    def pump(self, timeout: float) -> None:
        """Read whatever the children printed within ``timeout`` s."""
        for key, _ in self.sel.select(timeout):
            member: Member = key.data
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                self.sel.unregister(key.fileobj)
                continue
            member.buf += chunk
            *lines, member.buf = member.buf.split(b"\n")
            for line in lines:
                self._take(member, json.loads(line))

    def _take(self, member: Member, fields: list[Any]) -> None:
        kind = fields[0]
        if kind == "ready":
            member.ready = fields[1]
        elif kind == "full":
            member.full = fields[1]
        elif kind in ("joined", "left"):
            member.events.append((kind, fields[1], fields[2]))

    def wait(self, what: str, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"[scale] timed out waiting for {what}", file=sys.stderr)
                return False
            self.pump(min(left, 0.5))
        return True

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.killed is None]

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
        self.sel.close()


def cpu_ns(pid: int) -> int:
    """Run time of every thread of ``pid`` so far (ns), from /proc/PID/task/*/schedstat."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def p50_max(values: list[float], digits: int = 3) -> tuple[float, float]:
    return round(statistics.median(values), digits), round(max(values), digits)


@contextlib.contextmanager
def private_loopback(enabled: bool) -> Iterator[str | None]:
    """A network namespace of our own with only ``lo`` up (its loopback is private: no other
    process on this host sees our mDNS, and we see none of theirs), removed afterwards."""
    if not enabled:
        yield None
        return
    ns = f"zfscale{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def run(count: int, kill: int, idle: float, source: Path, spawn_batch: int,
        netns: str | None) -> dict[str, Any]:
    fabric = f"scale-{uuid.uuid4().hex[:8]}"
    fab = Fabric(count, source, fabric, netns)
    row: dict[str, Any] = {"nodes": count, "kill": kill, "source": str(source),
                           "private_loopback": netns is not None}
    try:
        names = [f"n{i:03d}" for i in range(count)]
        t_spawn = time.monotonic()
        for i in range(0, count, spawn_batch):
            for name in names[i:i + spawn_batch]:
                fab.spawn(name)
            batch = [fab.members[n] for n in names[i:i + spawn_batch]]
            fab.wait("a batch to start", lambda b=batch: all(m.ready for m in b), 300)
        row["spawn_s"] = round(time.monotonic() - t_spawn, 1)
        members = list(fab.members.values())
        if not fab.wait("every node to see every other",
                        lambda: all(m.full for m in members), 120):
            row["not_full"] = sum(1 for m in members if not m.full)
        last_ready = max(m.ready or 0 for m in members)
        fulls = [m.full for m in members if m.full]
        row["converge_s"] = round(max(fulls) - last_ready, 3) if fulls else None

        # Idle: let the join traffic settle, then measure.
        settle_until = time.monotonic() + 5
        fab.wait("settling", lambda: time.monotonic() >= settle_until, 10)
        before = {m.name: cpu_ns(m.proc.pid) for m in members}
        t0 = time.monotonic()
        until = t0 + idle
        fab.wait("the idle window", lambda: time.monotonic() >= until, idle + 5)
        elapsed = time.monotonic() - t0
        cpu = [100 * (cpu_ns(m.proc.pid) - before[m.name]) / 1e9 / elapsed for m in members]
        row["idle_window_s"] = round(elapsed, 1)
        row["cpu_pct_p50"], row["cpu_pct_max"] = p50_max(cpu)
        row["cpu_pct_mean"] = round(statistics.mean(cpu), 3)
        row["rss_mib_p50"], row["rss_mib_max"] = p50_max([rss_mib(m.proc.pid) for m in members], 1)
        row["fds_p50"], row["fds_max"] = p50_max([float(fds(m.proc.pid)) for m in members], 0)

        if kill:
            victims = random.sample(members, kill)
            killed_names = {v.name for v in victims}
            t_kill = time.monotonic()
            for victim in victims:
                victim.proc.kill()
                victim.killed = t_kill
            survivors = fab.alive()

            def dropped(m: Member) -> bool:
                gone = {n for k, t, n in m.events if k == "left" and t >= t_kill}
                return killed_names <= gone

            fab.wait("survivors to drop the killed nodes",
                     lambda: all(dropped(m) for m in survivors), 30)
            drops = []
            for m in survivors:
                firsts: dict[str, float] = {}
                for k, t, n in m.events:
                    if k == "left" and n in killed_names and t >= t_kill:
                        firsts.setdefault(n, t)
                if len(firsts) == kill:
                    drops.append(max(firsts.values()) - t_kill)
            row["drop_s_max"] = round(max(drops), 3) if len(drops) == len(survivors) else None
            row["drop_s_p50"] = round(statistics.median(drops), 3) if drops else None
            row["survivors_not_dropped"] = len(survivors) - len(drops)
            # Anything else that happens shortly after (false deaths triggered by the kill).
            after = time.monotonic() + 5
            fab.wait("aftermath", lambda: time.monotonic() >= after, 10)
        killed = {m.name for m in members if m.killed is not None}
        false = [(m.name, n) for m in fab.alive() for k, t, n in m.events
                 if k == "left" and n not in killed]
        row["false_deaths"] = len(false)
        row["rejoins"] = sum(1 for m in fab.alive() for k, _, n in m.events
                             if k == "joined" and n not in killed)
        if false:
            row["false_death_examples"] = false[:5]
    finally:
        fab.close()
    return row


@click.command()
@click.option("--nodes", "counts", type=click.IntRange(2, 1000), multiple=True,
              default=(50,), show_default=True, help="Nodes in the fabric (repeatable).")
@click.option("--kill", type=int, default=10, show_default=True,
              help="Nodes SIGKILLed at once after the idle window (at most N-1).")
@click.option("--idle", type=float, default=30.0, show_default=True,
              help="Seconds of idle measurement once converged.")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=ROOT, show_default=True, help="Checkout whose zmqfabric the nodes run.")
@click.option("--spawn-batch", type=int, default=25, show_default=True,
              help="Children started at a time (each batch waits for READY).")
@click.option("--netns/--shared-loopback", default=True, show_default=True,
              help="Run the nodes in a network namespace of their own (needs root), so that "
                   "other processes' mDNS on this host's loopback neither reaches nor loads them.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of text.")
def main(counts: tuple[int, ...], kill: int, idle: float, source: Path, spawn_batch: int,
         netns: bool, as_json: bool) -> None:
    for count in counts:
        with private_loopback(netns) as ns:
            row = run(count, min(kill, count - 1), idle, source.resolve(), spawn_batch, ns)
        row["loadavg"] = os.getloadavg()[0]
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(" ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
