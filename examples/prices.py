"""A price feed with subscribers: one publisher, two subscriber processes, each subscribed to the
topics (prefixes) it wants.

    python3 examples/prices.py                     # a feed and two subscribers, then all stop
    python3 examples/prices.py subscribe EUR       # one subscriber, by hand (Ctrl-C to stop)
    zmqfabric sub prices EUR                       # the same from the command line

Publish/subscribe drops what is sent before a subscription reaches the publisher, so the feed
first waits for its subscribers (``wait_subscribers``); everything sent after that reaches them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import zmqfabric as zf

PAIRS = ("EURUSD", "EURGBP", "GBPUSD", "USDJPY")


def subscribe(topics: list[str], count: int | None = None) -> None:
    """Print ``count`` prices of ``topics`` (all with None: until Ctrl-C)."""
    with zf.Node(f"prices-sub-{os.getpid()}") as node:
        feed = node.subscribe("prices", topics=topics)
        feed.wait_ready(timeout=30.0)  # connected to the feed (if it runs already)
        print("ready", flush=True)
        for n, (pair, price) in enumerate(feed, 1):
            print(f"{pair} {price['bid']:.4f}/{price['ask']:.4f}", flush=True)
            if n == count:
                return


def main(ticks: int = 20) -> None:
    watchers = {"EUR": sum(p.startswith("EUR") for p in PAIRS) * ticks,
                "GBP": sum(p.startswith("GBP") for p in PAIRS) * ticks}
    procs = {topic: subprocess.Popen(
        [sys.executable, __file__, "subscribe", topic, "--count", str(count)],
        stdout=subprocess.PIPE, text=True) for topic, count in watchers.items()}
    try:
        with zf.Node("price-feed") as node:
            prices = node.publisher("prices")
            if prices.wait_subscribers(len(procs), timeout=30.0) < len(procs):
                raise SystemExit("the subscribers did not subscribe within 30 s")
            mid = {pair: 1.0 + random.random() for pair in PAIRS}
            for _ in range(ticks):
                for pair in PAIRS:
                    mid[pair] *= 1 + random.gauss(0, 0.0005)
                    prices.send(pair, {"bid": mid[pair] - 0.0001, "ask": mid[pair] + 0.0001})
            for topic, proc in procs.items():
                out, _ = proc.communicate(timeout=30)
                lines = out.splitlines()[1:]  # after "ready"
                print(f"subscriber {topic}: {len(lines)} prices, last {lines[-1]}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


if __name__ == "__main__":
    if sys.argv[1:2] == ["subscribe"]:
        args = sys.argv[2:]
        count = int(args[args.index("--count") + 1]) if "--count" in args else None
        subscribe([a for a in args if not a.startswith("--") and not a.isdigit()], count)
    else:
        main()
