"""What CURVE costs: request/reply latency and push/pull throughput with and without keys.

Two server processes run side by side, one plain and one secured (CURVE, allow-list), each with
a reply service (echo) and a pipeline puller; this process is the client of both, with a plain
node and a secured node. Rounds alternate plain and secured so that drift (CPU frequency, other
load) hits both alike; each figure is the median over the rounds, and the ratio secured/plain is
what CURVE costs through the fabric.

- latency: sequential round trips of a 64-byte body (``--size``); p50/p99 from the sorted
  samples of each round;
- throughput: the puller (another process) times the messages from the first to the last of a
  burst pushed from here.

    python3 perf/curve_cost.py [--rounds 3] [--requests 5000] [--count 200000] [--size 64]
                               [--quick] [--json]

All traffic is on 127.0.0.1; discovery is pinned to loopback like every node.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmqfabric as zf  # noqa: E402
from tests.procs import Child, ProcessGroup  # noqa: E402
from zmqfabric.security import keys  # noqa: E402

WAIT = 20.0

SERVER = r"""
import json, threading, time
import zmqfabric as zf

node = zf.Node(NAME, keys=KEYS)
stop = threading.Event()
pulling = threading.Event()

@node.reply(SVC)
def echo(body):
    return body

def pull():
    # Counts bursts: the parent says how long the next burst is with a request {"burst": n}.
    with node.puller(PIPE) as puller:
        pulling.set()
        while not stop.is_set():
            message = puller.recv_message(timeout=0.1)
            if message is None:
                continue
            n, first, got = message.body, time.perf_counter(), 1   # the burst's header message
            while got < n and not stop.is_set():
                if puller.recv_message(timeout=5.0) is None:
                    break
                got += 1
            print("BURST " + json.dumps({"n": got, "seconds": time.perf_counter() - first}),
                  flush=True)

with node:
    worker = threading.Thread(target=pull, name="perf-puller")
    worker.start()
    try:
        pulling.wait(10)
        print("READY", flush=True)
        node.run()
    finally:
        stop.set()
        worker.join(10)
"""


class Case:
    """One side of the comparison: a server process and this process's client node."""

    def __init__(self, procs: ProcessGroup, label: str, server_keys: Path | None,
                 client_keys: Path | None) -> None:
        suffix = f"{label}-{time.monotonic_ns() % 10**8}"
        self.label = label
        self.svc, self.pipe = f"cc-svc-{suffix}", f"cc-pipe-{suffix}"
        keys_dir = str(server_keys) if server_keys else None
        head = (f"NAME = 'cc-server-{suffix}'\nKEYS = {keys_dir!r}\nSVC = {self.svc!r}\n"
                f"PIPE = {self.pipe!r}\n")
        self.child: Child = procs.python(head + SERVER, timeout=WAIT)
        self.node = zf.Node(f"cc-client-{suffix}", keys=client_keys).start()
        self.pusher: Any = None
        self.body = b"x" * 64

    def warm_up(self) -> None:
        for _ in range(200):
            assert self.node.request(self.svc, self.body, timeout=WAIT) == self.body
        self.pusher = self.node.pusher(self.pipe)
        if not self.pusher.wait_ready(WAIT):
            raise RuntimeError(f"{self.label}: pusher not connected")
        self.throughput(2000)

    def latency(self, requests: int) -> tuple[float, float]:
        """(p50, p99) round trip in microseconds."""
        samples = []
        request, svc, body = self.node.request, self.svc, self.body
        for _ in range(requests):
            start = time.perf_counter()
            request(svc, body, timeout=WAIT)
            samples.append(time.perf_counter() - start)
        samples.sort()
        return samples[len(samples) // 2] * 1e6, samples[min(len(samples) - 1,
                                                             int(len(samples) * 0.99))] * 1e6

    def throughput(self, count: int) -> float:
        """Messages per second as the puller process saw them arrive."""
        send, body = self.pusher.send, self.body
        send(count, timeout=WAIT)  # the burst header carries the count
        for _ in range(count - 1):
            send(body, timeout=WAIT)
        burst = json.loads(self.child.expect("BURST", WAIT + count / 10_000))
        if burst["n"] != count:
            raise RuntimeError(f"{self.label}: {burst['n']} of {count} messages arrived")
        return (count - 1) / burst["seconds"]

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
        self.node.close()


def measure(rounds: int, requests: int, count: int, size: int = 64) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="curve-cost-") as tmp:
        a, b = Path(tmp, "a"), Path(tmp, "b")
        keys.allow(a, keys.generate(b), "b")
        keys.allow(b, keys.generate(a), "a")
        procs = ProcessGroup()
        cases: list[Case] = []
        try:
            cases = [Case(procs, "plain", None, None), Case(procs, "curve", a, b)]
            for case in cases:
                case.body = b"x" * size
                case.warm_up()
            results: dict[str, dict[str, list[float]]] = {
                c.label: {"p50_us": [], "p99_us": [], "msgs_per_s": []} for c in cases
            }
            for _ in range(rounds):
                for case in cases:  # alternate: plain, curve, plain, curve...
                    p50, p99 = case.latency(requests)
                    rate = case.throughput(count)
                    row = results[case.label]
                    row["p50_us"].append(p50)
                    row["p99_us"].append(p99)
                    row["msgs_per_s"].append(rate)
        finally:
            for case in cases:
                case.close()
            procs.close()
    medians = {label: {k: statistics.median(v) for k, v in row.items()}
               for label, row in results.items()}
    ratios = {k: medians["curve"][k] / medians["plain"][k] for k in medians["plain"]}
    return {"rounds": rounds, "requests": requests, "count": count, "size": size,
            "samples": results,
            "median": medians, "ratio_curve_over_plain": ratios}


@click.command()
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Alternating rounds; figures are medians over them.")
@click.option("--requests", type=click.IntRange(100, 10**6), default=5000, show_default=True,
              help="Round trips per latency measurement.")
@click.option("--count", type=click.IntRange(1000, 10**8), default=200_000, show_default=True,
              help="Messages per throughput burst.")
@click.option("--size", type=click.IntRange(0, 64 * 1024 * 1024), default=64, show_default=True,
              help="Body size in bytes (bytes bodies from 64 KiB on go raw, without a copy).")
@click.option("--quick", is_flag=True, help="Small sizes (1000 requests, 20,000 messages).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def main(rounds: int, requests: int, count: int, size: int, quick: bool, as_json: bool) -> None:
    logging.basicConfig(level=logging.ERROR)  # the nodes' warnings about other nodes on lo
    if quick:
        requests, count = 1000, 20_000
    result = measure(rounds, requests, count, size)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"CURVE cost: {rounds} alternating rounds, {requests} round trips and "
               f"{count} pushed messages per round, {size}-byte bodies, 127.0.0.1")
    click.echo(f"{'case':<16}{'p50 µs':>10}{'p99 µs':>10}{'msgs/s':>12}")
    for label, row in result["median"].items():
        click.echo(f"{label:<16}{row['p50_us']:>10.1f}{row['p99_us']:>10.1f}"
                   f"{row['msgs_per_s']:>12,.0f}")
    r = result["ratio_curve_over_plain"]
    click.echo(f"{'curve / plain':<16}{r['p50_us']:>10.2f}{r['p99_us']:>10.2f}"
               f"{r['msgs_per_s']:>12.2f}")
    click.echo("per round (p50 µs / msgs/s): " + "; ".join(
        f"{label}: " + ", ".join(f"{p:.0f}/{m:,.0f}"
                                 for p, m in zip(row["p50_us"], row["msgs_per_s"], strict=True))
        for label, row in result["samples"].items()))


if __name__ == "__main__":
    main()
