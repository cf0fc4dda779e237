"""What one join costs: N nodes on loopback (one process each) have settled; newcomers join one at
a time, and the CPU each spends is read from the kernel's per-thread run time.

For each build (``--source NAME=DIR``, alternated join by join) it reports, medians over the
joins:

- ``old_ms``: CPU a node already there spends on one join (the window's CPU minus its idle CPU
  over the same time), and the same split by thread (``old_by_thread_ms``: the verifier, the
  control endpoint, liveness's housekeeping, zeroconf's loop, ZeroMQ's I/O thread, ...);
- ``new_ms``: the newcomer's CPU from its spawn until it and every node list each other, and
  ``new_per_peer_ms``: that minus ``--import-ms`` (what a process that only imports zmqfabric and
  starts a node alone costs, measured first), per node there;
- ``calls_per_old``: verification calls per node already there per join (one per pair: the
  newcomer takes the introduction in the call, and with keys needs no call back).

The nodes run in a network namespace of their own (root), in a fabric of their own.

    python3 perf/joincost.py --nodes 60 --joins 3 [--source old=DIR --source new=.] [--json]
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

from scale import private_loopback  # noqa: E402

from tests.fleet import Fleet, Member, cpu_ns, thread_cpu_ns  # noqa: E402

COUNTERS = ("verifications", "admission_calls", "peers_introduced")


def counters(fleet: Fleet, members: list[Member]) -> dict[str, int]:
    """The counters in ``COUNTERS``, summed over ``members`` (asked with SIGUSR1)."""
    for m in members:
        m.sees = None
        os.kill(m.pid, signal.SIGUSR1)
    fleet.wait(lambda: all(m.sees is not None for m in members), 30)
    return {k: sum(m.counters.get(k, 0) for m in members) for k in COUNTERS}


def threads_ms(members: list[Member]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in members:
        for name, ns in thread_cpu_ns(m).items():
            out[name] = out.get(name, 0.0) + ns / 1e6
    return out


def all_ready(members: list[Member]) -> bool:
    return all(m.ready for m in members)


def settle(fleet: Fleet, count: int, batch: int, timeout: float) -> None:
    for i in range(0, count, batch):
        started = [fleet.spawn(f"n{j:03d}") for j in range(i, min(count, i + batch))]
        if not fleet.wait(functools.partial(all_ready, started), timeout):
            raise click.ClickException("nodes did not start")
        if not fleet.wait(fleet.full, timeout):
            raise click.ClickException(f"{len(fleet.members)} nodes did not converge")


def alone_ms(source: Path, netns: str | None) -> float:
    """CPU of a node started alone (imports included) until it is ready, plus 3 s of it."""
    with Fleet(f"jc-{uuid.uuid4().hex[:8]}", netns=netns, source=source) as fleet:
        m = fleet.spawn("alone")
        fleet.wait(lambda: m.ready is not None, 60)
        fleet.sleep(3)
        return cpu_ns(m.pid) / 1e6


def join(fleet: Fleet, name: str, settle_s: float) -> dict[str, Any]:
    olds = fleet.alive()
    sample = olds[:10]
    before_c, before_t = counters(fleet, sample), threads_ms(olds)
    before = {m.name: cpu_ns(m.pid) for m in olds}
    t0 = time.monotonic()
    new = fleet.spawn(name)
    ok = fleet.wait(lambda: new.ready is not None, 60) and fleet.wait(fleet.full, 60)
    converged = time.monotonic() - (new.ready or t0)
    fleet.sleep(settle_s)  # what the join sets off (gossip, the newcomer's query) settles
    window = time.monotonic() - t0
    after_t = threads_ms(olds)
    spent = sum(cpu_ns(m.pid) - before[m.name] for m in olds) / 1e6
    after_c = counters(fleet, sample)
    return {"ok": ok, "olds": len(olds), "converge_s": converged, "window_s": window,
            "old_total_ms": spent,
            "old_threads_ms": {k: after_t[k] - before_t.get(k, 0.0) for k in after_t},
            "new_ms": cpu_ns(new.pid) / 1e6,
            "calls_per_old": (after_c["verifications"] + after_c["admission_calls"]
                              - before_c["verifications"] - before_c["admission_calls"])
            / len(sample)}


def idle_rates(fleet: Fleet, seconds: float) -> tuple[float, dict[str, float]]:
    """CPU per second of all nodes now, in total and by thread (ms/s)."""
    olds = fleet.alive()
    b_total, b_threads = sum(cpu_ns(m.pid) for m in olds) / 1e6, threads_ms(olds)
    t0 = time.monotonic()
    fleet.sleep(seconds)
    elapsed = time.monotonic() - t0
    a_threads = threads_ms(olds)
    total = (sum(cpu_ns(m.pid) for m in olds) / 1e6 - b_total) / elapsed
    return total, {k: (a_threads[k] - b_threads.get(k, 0.0)) / elapsed for k in a_threads}


@click.command()
@click.option("--nodes", type=click.IntRange(2, 400), default=60, show_default=True)
@click.option("--joins", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--source", "sources", multiple=True, default=(f"new={ROOT}",),
              show_default=True, help="NAME=DIR: a checkout whose zmqfabric the nodes run.")
@click.option("--settle", "settle_s", type=float, default=4.0, show_default=True,
              help="Seconds measured after the fabric converged on a newcomer.")
@click.option("--netns/--shared-loopback", default=True, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(nodes: int, joins: int, sources: tuple[str, ...], settle_s: float, netns: bool,
         as_json: bool) -> None:
    builds = dict(s.split("=", 1) for s in sources)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in builds}
    alone: dict[str, float] = {}
    fleets: dict[str, Fleet] = {}
    with contextlib.ExitStack() as stack:
        for name, src in builds.items():  # a loopback each: no build hears the other's mDNS
            ns = stack.enter_context(private_loopback(netns))
            alone[name] = alone_ms(Path(src), ns)
            fleets[name] = stack.enter_context(
                Fleet(f"jc-{uuid.uuid4().hex[:8]}", netns=ns, source=Path(src)))
            settle(fleets[name], nodes, 10, 300)
        for k in range(joins):
            for name, fleet in fleets.items():
                total, threads = idle_rates(fleet, 5.0)
                row = join(fleet, f"x{k:02d}", settle_s)
                olds = row["olds"]
                row["old_ms"] = (row["old_total_ms"] - total * row["window_s"]) / olds
                row["old_by_thread_ms"] = {
                    t: round((v - threads.get(t, 0.0) * row["window_s"]) / olds, 3)
                    for t, v in row["old_threads_ms"].items()}
                row["new_per_peer_ms"] = (row["new_ms"] - alone[name]) / olds
                rows[name].append(row)
    for name, got in rows.items():
        med = {key: round(statistics.median(r[key] for r in got), 3)
               for key in ("old_ms", "new_ms", "new_per_peer_ms", "calls_per_old", "converge_s")}
        threads = {t: round(statistics.median(r["old_by_thread_ms"].get(t, 0.0) for r in got), 3)
                   for t in got[0]["old_by_thread_ms"]}
        out = {"build": name, "nodes": nodes, "joins": joins, "alone_ms": round(alone[name], 1),
               **med, "old_by_thread_ms": threads, "loadavg_1m": round(os.getloadavg()[0], 1)}
        click.echo(json.dumps(out) if as_json else "  ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
