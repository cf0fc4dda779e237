"""Membership at scale on one host: N nodes on loopback, one process each.

For each N it reports:

- ``converge_s``: from the moment the last node is ready (its ``start()`` returned) until every
  node lists every other (negative: they all did before the last ``start()`` returned);
- ``start_cpu_s``: CPU time all nodes used from their spawn until then, summed;
- idle cost per node once converged, over ``--idle`` seconds: CPU (% of one core, from the
  kernel's per-thread run time), RSS and open file descriptors (p50 and max over the nodes);
- ``drop_s``: K nodes are SIGKILLed at once; the time until every survivor has dropped all K
  (max over the survivors, and p50);
- ``leave_s``: one more node stops cleanly; the time until every survivor has dropped it;
- ``false_deaths``: "left" events about nodes that were neither killed nor stopped, from the
  first start to the end (each is followed by a re-join, counted as ``rejoins``), and the
  liveness counters summed over the nodes.

The nodes run in a network namespace of their own by default (``--netns``; needs root): its
loopback is theirs alone, so other processes' mDNS neither reaches nor loads them, and theirs
does not load the rest of this (shared) machine. They join a fabric of their own.
``--source DIR`` runs the nodes from another checkout (e.g. main's code, for a "before" figure).

    python3 perf/scale.py --nodes 50 --nodes 100 --kill 10 [--idle 30] [--json]
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fleet import Fleet, Member, cpu_ns, fds, rss_mib  # noqa: E402
from zmqfabric.core.timers import Timing  # noqa: E402
from zmqfabric.security import keys  # noqa: E402


@contextlib.contextmanager
def private_loopback(enabled: bool) -> Iterator[str | None]:
    """A network namespace of our own with only ``lo`` up, removed afterwards."""
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


def p50_max(values: list[float], digits: int = 3) -> tuple[float, float]:
    return round(statistics.median(values), digits), round(max(values), digits)


def drop_times(survivors: list[Member], gone: set[str], since: float) -> list[float] | None:
    """Per survivor, how long after ``since`` it had dropped every node of ``gone``."""
    out = []
    for m in survivors:
        times = [m.first("left", name, since) for name in gone]
        if any(t is None for t in times):
            return None
        out.append(max(t for t in times if t is not None) - since)
    return out


def all_ready(members: list[Member]) -> bool:
    """Every one of ``members`` started, or one of them exited without (see started)."""
    return all(m.ready or m.proc.poll() is not None for m in members)


def started(fleet: Fleet, members: list[Member]) -> None:
    """Raise, naming it and quoting its log, if a node exited before it was ready (else the run
    would wait for it until --start-timeout)."""
    for m in members:
        if not m.ready and m.proc.poll() is not None:
            tail = "\n".join(fleet.log(m.name)[-6:]) or "(no log: --logs DIR keeps them)"
            raise click.ClickException(f"node {m.name} exited ({m.proc.returncode}) before it "
                                       f"was ready:\n{tail}")


def rejoins(member: Member) -> int:
    """Nodes ``member`` listed again after they had left its view."""
    count, left = 0, set()
    for kind, _, name in member.events:
        if kind == "left":
            left.add(name)
        elif name in left:
            left.discard(name)
            count += 1
    return count


def run(count: int, kill: int, idle: float, source: Path, batch: int, netns: str | None,
        logs: Path | None, say: Any, start_timeout: float = 600.0,
        keydir: Path | None = None, settle: bool = False,
        timing: dict[str, float] | None = None) -> dict[str, Any]:
    fleet = Fleet(f"scale-{uuid.uuid4().hex[:8]}", netns=netns, logs=logs, source=source,
                  timing=timing)
    row: dict[str, Any] = {"nodes": count, "kill": kill, "source": str(source),
                           "private_loopback": netns is not None, "secured": keydir is not None,
                           "batch": batch, "settle": settle, "timing": timing or {}}

    def spawn(name: str) -> Member:
        if keydir is not None:
            fleet.keys[name] = keydir  # one keypair for the fabric: every node allows it
        return fleet.spawn(name)

    with fleet:
        t0 = time.monotonic()
        for i in range(0, count, batch):
            members = [spawn(f"n{j:03d}") for j in range(i, min(count, i + batch))]
            if not fleet.wait(functools.partial(all_ready, members), start_timeout):
                raise click.ClickException(f"nodes did not start: {[m.name for m in members]}")
            started(fleet, members)
            say(f"{len(fleet.members)} started")
            if settle and not fleet.wait(fleet.full, start_timeout):
                raise click.ClickException(f"{len(fleet.members)} nodes did not converge")
        row["spawn_s"] = round(time.monotonic() - t0, 1)
        members = list(fleet.members.values())
        if not fleet.wait(fleet.full, start_timeout):
            row["not_full"] = sum(1 for m in members if not fleet.full([m]))
        last_ready = max(m.ready or 0.0 for m in members)
        fulls = [t for m in members if (t := fleet.full_at(m)) is not None]
        row["converge_s"] = round(max(fulls) - last_ready, 3) if fulls else None
        # CPU the nodes used from their spawn to now (imports included: ~0.5 s each), steadier
        # than times on a loaded machine: the cost of joining, summed over the fabric.
        row["start_cpu_s"] = round(sum(cpu_ns(m.pid) for m in members) / 1e9, 1)
        say("converged")

        fleet.sleep(5)  # the join traffic settles
        before = {m.name: cpu_ns(m.pid) for m in members}
        t0 = t_idle = time.monotonic()
        fleet.sleep(idle)
        elapsed = time.monotonic() - t0
        cpu = [100 * (cpu_ns(m.pid) - before[m.name]) / 1e9 / elapsed for m in members]
        row["idle_window_s"] = round(elapsed, 1)
        row["cpu_pct_p50"], row["cpu_pct_max"] = p50_max(cpu)
        row["cpu_pct_mean"] = round(statistics.mean(cpu), 3)
        row["rss_mib_p50"], row["rss_mib_max"] = p50_max([rss_mib(m.pid) for m in members], 1)
        row["fds_p50"], row["fds_max"] = p50_max([float(fds(m.pid)) for m in members], 0)
        say("idle measured")

        t_idle_end = time.monotonic()
        if kill:
            victims = random.sample(members, kill)
            gone = {v.name for v in victims}
            t_kill = time.monotonic()
            for victim in victims:
                fleet.kill(victim)
            survivors = fleet.alive()
            fleet.wait(lambda: drop_times(survivors, gone, t_kill) is not None, 60)
            drops = drop_times(survivors, gone, t_kill)
            row["drop_s_max"], row["drop_s_p50"] = (p50_max(drops)[::-1] if drops
                                                    else (None, None))
            leaver = random.choice(survivors)
            t_leave = fleet.terminate(leaver)
            rest = [m for m in survivors if m is not leaver]
            fleet.wait(lambda: drop_times(rest, {leaver.name}, t_leave) is not None, 30)
            leaves = drop_times(rest, {leaver.name}, t_leave)
            row["leave_s_max"] = round(max(leaves), 3) if leaves else None
            fleet.wait(lambda: leaver.closed is not None, 30)
            fleet.sleep(5)  # anything that the deaths set off
        fleet.collect()
    gone = {m.name for m in fleet.members.values() if m.killed or m.closed}
    alive = [m for m in fleet.members.values() if m.name not in gone]
    false = [(m.name, n) for m in alive for k, t, n in m.events if k == "left" and n not in gone]
    row["false_deaths"] = len(false)
    phases = {"start": 0, "idle": 0, "after_kill": 0}
    for m in alive:
        for k, t, n in m.events:
            if k == "left" and n not in gone:
                phases["start" if t < t_idle else "idle" if t < t_idle_end else "after_kill"] += 1
    row["false_deaths_by_phase"] = phases
    row["rejoins"] = sum(rejoins(m) for m in alive)
    if false:
        row["false_death_examples"] = false[:5]
    totals: dict[str, int] = {}
    for m in alive:
        for key, value in m.counters.items():
            totals[key] = totals.get(key, 0) + value
    row["counters"] = {k: v for k, v in sorted(totals.items())
                       if k.startswith(("peers", "refut", "probes", "refused", "housekeeping"))}
    everyone = {m.name for m in alive}
    missing = {m.name: sorted(everyone - set(m.sees or [])) for m in alive
               if not everyone <= set(m.sees or [])}
    if missing:
        row["missing_at_end"] = dict(list(missing.items())[:5])
    return row


@click.command()
@click.option("--nodes", "counts", type=click.IntRange(2, 1000), multiple=True,
              default=(50,), show_default=True, help="Nodes in the fabric (repeatable).")
@click.option("--kill", type=int, default=10, show_default=True,
              help="Nodes SIGKILLed at once after the idle window (at most N-2).")
@click.option("--idle", type=float, default=30.0, show_default=True,
              help="Seconds of idle measurement once converged.")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=ROOT, show_default=True, help="Checkout whose zmqfabric the nodes run.")
@click.option("--batch", type=int, default=25, show_default=True,
              help="Nodes started at a time (each batch waits until its nodes are ready).")
@click.option("--start-timeout", type=float, default=600.0, show_default=True,
              help="Seconds a batch may take to start, and the fabric to converge.")
@click.option("--settle", is_flag=True,
              help="Start each batch once the nodes before it all see each other (a rollout), "
                   "not as soon as they are ready.")
@click.option("--netns/--shared-loopback", default=True, show_default=True,
              help="Run the nodes in a network namespace of their own (needs root).")
@click.option("--keys", "secured", is_flag=True,
              help="A secured fabric: every node has keys (one keypair, made for the run).")
@click.option("--logs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write each node's log (liveness at DEBUG) to DIR/NAME.log.")
@click.option("--timing", "timings", multiple=True, metavar="NAME=SECONDS",
              help="A liveness timer of every node (zmqfabric.core.timers.Timing), e.g. "
                   "gossip_batch_s=0.3 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of text.")
@click.option("--verbose", is_flag=True, help="Say how far each run got, on stderr.")
def main(counts: tuple[int, ...], kill: int, idle: float, source: Path, batch: int,
         start_timeout: float, settle: bool, netns: bool, secured: bool, logs: Path | None,
         timings: tuple[str, ...], as_json: bool, verbose: bool) -> None:
    timing: dict[str, float] = {}
    for item in timings:
        name, _, value = item.partition("=")
        if name not in Timing.__dataclass_fields__:
            raise click.BadParameter(f"{name!r} is not a liveness timer (see Timing)",
                                     param_hint="--timing")
        try:
            kind = int if Timing.__dataclass_fields__[name].type in (int, "int") else float
            timing[name] = kind(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: the value must be a number",
                                     param_hint="--timing") from None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C: the fleet's nodes are stopped and the namespace removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    def say(text: str) -> None:
        if verbose:
            click.echo(f"[scale] {text}", err=True)

    for count in counts:
        with private_loopback(netns) as ns, tempfile.TemporaryDirectory() as tmp:
            keydir = Path(tmp) / "keys" if secured else None
            if keydir is not None:
                keys.generate(keydir)
            row = run(count, max(0, min(kill, count - 2)), idle, source.resolve(), batch, ns,
                      logs, say, start_timeout, keydir, settle, timing)
        row["loadavg_1m"] = round(os.getloadavg()[0], 1)
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(" ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
