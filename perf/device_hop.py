"""What a hop through a forwarding device costs, measured between separate processes on 127.0.0.1.

- request/reply round trip, p50 and p99: through the queue device vs. direct to the worker;
- pub/sub one-way latency, p50 and p99: through the forwarder vs. direct from the publisher
  (send and receive times on the host's monotonic clock, which every process shares);
- push/pull throughput, messages/s at the puller: through the streamer vs. direct.

Each measurement runs direct and through the device alternately, ROUNDS times each, in one run;
the table gives the median of the rounds and the ratio device/direct. Processes: the device node
(queue, forwarder and streamer in one node), a worker, a client, a publisher, a subscriber, a
pusher and a puller, driven over their stdin. Discovery and sockets stay on loopback.

    python3 perf/device_hop.py [--requests 2000] [--events 2000] [--messages 100000] [--json]
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3
#: Bound on any one child step (start, warm-up, one round).
STEP_TIMEOUT_S = 60.0
PAYLOAD = 64

PRELUDE = """
import json, sys, time
import zmqfabric as zf

def out(tag, **fields):
    print(tag, json.dumps(fields), flush=True)

def commands():
    for line in sys.stdin:  # ends when the driver closes stdin
        yield line.split()

def percentiles(values):
    values = sorted(values)
    if not values:
        return {"n": 0}
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]
    return {"n": len(values), "p50_us": pick(0.50) / 1e3, "p99_us": pick(0.99) / 1e3}
"""

HUB = """
from zmqfabric.devices import Forwarder, Queue, Streamer
with zf.Node(NAMES["hub"]) as node:
    devices = [Queue(node, NAMES["svc"]).start(), Forwarder(node, NAMES["stream"]).start(),
               Streamer(node, NAMES["pipe"]).start()]
    out("READY")
    for _ in commands():
        pass
    for device in devices:
        device.stop()
"""

WORKER = """
node = zf.Node(NAMES["worker"])

@node.reply(NAMES["svc"])
def echo(body):
    return body

with node:
    node.serve_in_background()
    out("READY")
    for _ in commands():
        pass
"""

CLIENT = """
with zf.Node(NAMES["client"]) as node:
    svc, hub = NAMES["svc"], NAMES["hub"]
    node.wait_for_endpoint("rep", svc, 20.0)
    node.wait_for_endpoint("queue", svc, 20.0)
    body = b"x" * PAYLOAD
    for via in (None, hub):  # warm up both paths (connections, the queue's worker socket)
        for _ in range(200):
            node.request(svc, body, timeout=10.0, via=via)
    out("READY")
    for mode, count in commands():
        via = hub if mode == "device" else None
        times = []
        for _ in range(int(count)):
            start = time.perf_counter_ns()
            node.request(svc, body, timeout=10.0, via=via)
            times.append(time.perf_counter_ns() - start)
        out("DONE", **percentiles(times))
"""

SUBSCRIBER = """
with zf.Node(NAMES["subscriber"]) as node:
    subs = {"direct": node.subscribe(NAMES["stream"], topics=["direct"]),
            "device": node.subscribe(NAMES["stream"], topics=["device"], via=NAMES["hub"])}
    ok = all(sub.wait_ready(20.0) for sub in subs.values())
    out("READY", ok=ok)
    for mode, count, tag in commands():
        sub, count, tag = subs[mode], int(count), int(tag)
        out("ARMED")
        delays, deadline = [], time.monotonic() + 30.0
        while len(delays) < count and time.monotonic() < deadline:
            message = sub.recv_message(timeout=1.0)
            now = time.monotonic_ns()
            if message is None:
                break  # the round is over (or never started): the rest were lost
            if message.body[0] == tag:
                delays.append(now - message.body[1])
        out("DONE", lost=count - len(delays), **percentiles(delays))
"""

PUBLISHER = """
with zf.Node(NAMES["publisher"]) as node:
    pub = node.publisher(NAMES["stream"])
    out("READY")
    for words in commands():
        if words[0] == "ping":  # lets subscriptions arrive (the driver asks until they have)
            pub.send("direct", [-1, time.monotonic_ns()])
            pub.send("device", [-1, time.monotonic_ns()])
            out("DONE")
            continue
        mode, count, tag, rate = words[0], int(words[1]), int(words[2]), float(words[3])
        interval = 1.0 / rate
        next_at = time.monotonic()
        for _ in range(count):
            next_at += interval
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            pub.send(mode, [tag, time.monotonic_ns()])
        out("DONE")
"""

PUSHER = """
with zf.Node(NAMES["pusher"]) as node:
    pushers = {"direct": node.pusher(NAMES["pipe"]),
               "device": node.pusher(NAMES["pipe"], via=NAMES["hub"])}
    ok = all(p.wait_ready(20.0) for p in pushers.values())
    out("READY", ok=ok)
    pad = b"x" * (PAYLOAD - 16)
    for mode, count, tag in commands():
        pusher, tag = pushers[mode], int(tag)
        start = time.perf_counter()
        for seq in range(int(count)):
            pusher.send([tag, seq, pad], timeout=10.0)
        out("DONE", seconds=time.perf_counter() - start)
"""

PULLER = """
with zf.Node(NAMES["puller"]) as node:
    inp = node.puller(NAMES["pipe"])
    out("READY")
    for count, tag in commands():
        count, tag = int(count), int(tag)
        out("ARMED")
        got, first, last, deadline = 0, 0.0, 0.0, time.monotonic() + 60.0
        while got < count and time.monotonic() < deadline:
            message = inp.recv_message(timeout=2.0)
            if message is None:
                break
            if message.body[0] != tag:
                continue
            last = time.perf_counter()
            if got == 0:
                first = last
            got += 1
        rate = (got - 1) / (last - first) if got > 1 and last > first else 0.0
        out("DONE", got=got, msgs_per_s=rate)
"""


class Proc:
    """A child Python process driven over stdin; its stdout lines arrive on a queue."""

    def __init__(self, role: str, body: str, names: dict[str, str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        code = (PRELUDE + f"NAMES = {names!r}\nPAYLOAD = {PAYLOAD}\n" + textwrap.dedent(body))
        self.role = role
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=str(ROOT))
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._readers = [threading.Thread(target=self._pump, args=(self.proc.stdout, True)),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, False))]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: Any, out: bool) -> None:
        for line in stream:
            (self.lines.put if out else self.stderr.append)(line.rstrip("\n"))
        if out:
            self.lines.put(None)

    def send(self, *words: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()

    def expect(self, tag: str, timeout: float = STEP_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.role}: no {tag} within {timeout} s\n"
                                   + "\n".join(self.stderr[-20:])) from None
            if line is None:
                raise RuntimeError(f"{self.role} exited ({self.proc.poll()})\n"
                                   + "\n".join(self.stderr[-20:]))
            if line.startswith(tag):
                rest = line[len(tag):].strip()
                return json.loads(rest) if rest else {}

    def close(self) -> None:
        """Close stdin (the child finishes), then terminate and kill if it does not."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        for reader in self._readers:
            reader.join(5.0)


def measure(requests: int, events: int, rate: float, messages: int) -> dict[str, Any]:
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    names = {role: f"hop-{role}-{tag}" for role in (
        "hub", "worker", "client", "publisher", "subscriber", "pusher", "puller")}
    names.update(svc=f"echo-{tag}", stream=f"ticks-{tag}", pipe=f"jobs-{tag}")
    procs: dict[str, Proc] = {}
    try:
        # The device node first, so that its devices are up before anyone needs them.
        procs["hub"] = Proc("hub", HUB, names)
        procs["hub"].expect("READY")
        for role, body in (("worker", WORKER), ("publisher", PUBLISHER), ("puller", PULLER)):
            procs[role] = Proc(role, body, names)
        for role in ("worker", "publisher", "puller"):
            procs[role].expect("READY")
        for role, body in (("client", CLIENT), ("subscriber", SUBSCRIBER), ("pusher", PUSHER)):
            procs[role] = Proc(role, body, names)
        for role in ("client", "subscriber", "pusher"):
            ready = procs[role].expect("READY")
            if ready.get("ok") is False:
                raise RuntimeError(f"{role} did not connect")
        client, sub, pub = procs["client"], procs["subscriber"], procs["publisher"]
        pusher, puller = procs["pusher"], procs["puller"]

        # Subscriptions reach the publisher (through the forwarder too) before the first round.
        for mode in ("direct", "device"):
            for _ in range(200):
                sub.send(mode, 1, -1)
                sub.expect("ARMED")
                pub.send("ping")
                pub.expect("DONE")
                if sub.expect("DONE")["n"]:
                    break
            else:
                raise RuntimeError(f"no event reached the {mode} subscription")

        rounds: dict[str, list[dict[str, Any]]] = {}
        modes = ("direct", "device")
        for n in range(ROUNDS):
            for mode in modes if n % 2 == 0 else modes[::-1]:  # alternate, ABBA
                client.send(mode, requests)
                rounds.setdefault(f"rtt_{mode}", []).append(client.expect("DONE"))

                round_tag = 2 * n + modes.index(mode)
                sub.send(mode, events, round_tag)
                sub.expect("ARMED")
                pub.send(mode, events, round_tag, rate)
                pub.expect("DONE")
                rounds.setdefault(f"pubsub_{mode}", []).append(sub.expect("DONE"))

                puller.send(messages, round_tag)
                puller.expect("ARMED")
                pusher.send(mode, messages, round_tag)
                pusher.expect("DONE")
                rounds.setdefault(f"push_{mode}", []).append(puller.expect("DONE"))
    finally:
        for proc in procs.values():
            proc.close()
    return summarize(rounds, requests, events, rate, messages)


def summarize(rounds: dict[str, list[dict[str, Any]]], requests: int, events: int,
              rate: float, messages: int) -> dict[str, Any]:
    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in rounds[key])

    result: dict[str, Any] = {
        "rounds": ROUNDS, "payload_bytes": PAYLOAD, "requests_per_round": requests,
        "events_per_round": events, "event_rate_per_s": rate, "messages_per_round": messages,
    }
    for kind in ("rtt", "pubsub"):
        for field in ("p50_us", "p99_us"):
            direct, device = med(f"{kind}_direct", field), med(f"{kind}_device", field)
            result[f"{kind}_{field}"] = {"direct": round(direct, 1), "device": round(device, 1),
                                         "extra": round(device - direct, 1),
                                         "ratio": round(device / direct, 2)}
    result["pubsub_lost"] = {m: sum(r["lost"] for r in rounds[f"pubsub_{m}"])
                             for m in ("direct", "device")}
    direct, device = med("push_direct", "msgs_per_s"), med("push_device", "msgs_per_s")
    result["push_msgs_per_s"] = {"direct": round(direct), "device": round(device),
                                 "ratio": round(device / direct, 2) if direct else None}
    result["push_incomplete_rounds"] = sum(r["got"] < messages for key in (
        "push_direct", "push_device") for r in rounds[key])
    result["raw_rounds"] = rounds
    return result


def table(result: dict[str, Any]) -> str:
    rows = [("request/reply round trip p50 (µs)", result["rtt_p50_us"]),
            ("request/reply round trip p99 (µs)", result["rtt_p99_us"]),
            ("pub/sub one-way p50 (µs)", result["pubsub_p50_us"]),
            ("pub/sub one-way p99 (µs)", result["pubsub_p99_us"]),
            ("push/pull throughput (msgs/s)", result["push_msgs_per_s"])]
    head = f"{'measure':36} {'direct':>10} {'device':>10} {'extra':>9} {'device/direct':>14}"
    lines = [head, "-" * len(head)]
    for label, row in rows:
        extra = f"{row['extra']:>9}" if "extra" in row else f"{'':>9}"
        lines.append(f"{label:36} {row['direct']:>10} {row['device']:>10} {extra} "
                     f"{row['ratio']:>14}")
    lines.append("")
    lines.append(
        f"medians of {result['rounds']} alternating rounds; {result['payload_bytes']} B bodies; "
        f"{result['requests_per_round']} requests, {result['events_per_round']} events at "
        f"{result['event_rate_per_s']:g}/s, {result['messages_per_round']} messages per round; "
        f"events lost direct/device: {result['pubsub_lost']['direct']}/"
        f"{result['pubsub_lost']['device']}; incomplete push rounds: "
        f"{result['push_incomplete_rounds']}")
    return "\n".join(lines)


@click.command()
@click.option("--requests", type=click.IntRange(10), default=2000, show_default=True,
              help="Request/reply round trips per round.")
@click.option("--events", type=click.IntRange(10), default=2000, show_default=True,
              help="Events per pub/sub round.")
@click.option("--rate", type=click.FloatRange(1), default=2000.0, show_default=True,
              help="Events per second (paced, so latency is not queueing).")
@click.option("--messages", type=click.IntRange(100), default=100_000, show_default=True,
              help="Messages per push/pull round (sent as fast as possible).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def main(requests: int, events: int, rate: float, messages: int, as_json: bool) -> None:
    result = measure(requests, events, rate, messages)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(table(result))


if __name__ == "__main__":
    main()
