"""Hostile traffic at a live node: random and mutated multipart messages to every kind of endpoint
it reads from, then proof that it still works and that it counted exactly what it refused.

A node runs in a child process with a reply service (ROUTER), its control endpoint (ROUTER), a
pipeline puller (PULL) and a stream subscription (SUB). A subscriber only ever hears from
publishers it connects to, so this script binds a raw PUB (the hostile publisher) and the child
puts a record for it into its own directory, as discovery would. Raw pyzmq sockets here then
send ``--count`` messages to each endpoint: random frames (random counts and bytes) and mutations
of valid messages (flipped bytes, truncated/dropped/duplicated/swapped frames, wrong kinds and
versions, broken bodies, headers around the 4096-byte limit, a few large frames), plus a few valid
ones. A reference decoder (``zmqfabric.core.wire``, i.e. the spec) classifies every message as it
is sent, so the node's counters can be compared exactly:

- service/control: ``refused_request`` must grow by the refused ones, and this DEALER must get
  exactly one reply per message that had a routing envelope (error replies included);
- pipeline: ``refused_message`` by the refused ones, and the child's count of good messages by
  the rest;
- stream: ``refused_event`` likewise (the raw PUB is paced in batches, since PUB drops instead of
  blocking when a subscriber's queue is full).

Afterwards the node must answer a correct request correctly; its resident memory before and after
is read from /proc/<pid>/status. Everything runs on 127.0.0.1 and every loop is bounded.

    python3 perf/fuzz_network.py [--count 100000] [--rounds 1] [--quick] [--seed N] [--json]
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import msgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmqfabric as zf  # noqa: E402
from tests.procs import Child, ProcessGroup  # noqa: E402
from zmqfabric.constants import MAX_HEADER_SIZE  # noqa: E402
from zmqfabric.core import wire  # noqa: E402
from zmqfabric.errors import RemoteProtocolError  # noqa: E402

WAIT = 30.0
#: Messages between two checks that the subscriber has read everything sent so far.
PUB_BATCH = 1000

VICTIM = r"""
import json, os, secrets, threading
import zmqfabric as zf
from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord

node = zf.Node(NAME)
stop = threading.Event()
started = [threading.Event(), threading.Event()]

@node.reply(SVC)
def echo(body):
    return {"echo": body}

def pull():
    with node.puller(PIPE) as puller:
        started[0].set()
        while not stop.is_set():
            if puller.recv_message(timeout=0.1) is not None:
                node.counters.add("fuzz_good_messages")

def subscribe():
    with node.subscribe(STREAM) as sub:
        started[1].set()
        while not stop.is_set():
            if sub.recv_message(timeout=0.1) is not None:
                node.counters.add("fuzz_good_events")

with node:
    # The hostile publisher enters the directory as discovery would put it there.
    node.directory.put(NodeRecord(NAME[:38] + "-rawpub", secrets.token_hex(8), "raw-host",
                                  os.getpid(), "127.0.0.1",
                                  (Endpoint(EndpointKind.STREAM, STREAM, PUB_PORT),), 1))
    workers = [threading.Thread(target=pull, name="fuzz-puller"),
               threading.Thread(target=subscribe, name="fuzz-subscriber")]
    for worker in workers:
        worker.start()
    try:
        assert all(event.wait(10) for event in started)
        ports = {ep.kind.value: ep.port for ep in node.record.endpoints}
        print("READY", flush=True)
        print("INFO " + json.dumps({"name": node.name, "pid": os.getpid(), "ports": ports}),
              flush=True)
        node.run()
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
"""

# --- messages ---------------------------------------------------------------------------------


def header(kind: int, msg_id: int = 1, *, version: int = 1, extra: Any = None,
           fields: int = 4) -> bytes:
    items: list[Any] = [version, kind, msg_id, time.time()][:fields]
    if extra is not None:
        items.append(extra)
    return msgpack.packb(items)


class Generator:
    """Random and mutated messages around one valid template."""

    def __init__(self, rng: random.Random, kind: int,
                 template: Callable[[random.Random], list[bytes]], header_at: int) -> None:
        self.rng = rng
        self.kind = kind
        self.template = template
        self.header_at = header_at  # index of the header frame in the template
        self.mutations: list[tuple[str, Callable[[], list[bytes]]]] = [
            ("random frames", self.random_frames),
            ("random frames", self.random_frames),
            ("flipped bytes", self.flipped),
            ("flipped bytes", self.flipped),
            ("truncated frame", self.truncated),
            ("dropped frame", self.dropped),
            ("duplicated frame", self.duplicated),
            ("swapped frames", self.swapped),
            ("extra random frame", self.extra_frame),
            ("wrong kind", self.wrong_kind),
            ("wrong version", self.wrong_version),
            ("odd header fields", self.odd_header),
            ("header near the size limit", self.huge_header),
            ("broken body", self.broken_body),
            ("raw body", self.raw_body),
            ("large frame", self.large_frame),
            ("valid", self.valid),
        ]

    def next(self) -> tuple[str, list[bytes]]:
        rng = self.rng
        if rng.random() < 0.002:
            return "large frame", self.large_frame()
        name, make = rng.choice(self.mutations[:-2] + self.mutations[-1:])
        return name, make()

    def valid(self) -> list[bytes]:
        return self.template(self.rng)

    def random_frames(self) -> list[bytes]:
        rng = self.rng
        count = rng.choice((1, 1, 2, 2, 3, 3, 3, 4, 5, 8, 16))
        return [rng.randbytes(rng.choice((0, 0, 1, 2, 5, 16, 21, 64, 300))) for _ in range(count)]

    def flipped(self) -> list[bytes]:
        frames = self.valid()
        for _ in range(self.rng.randint(1, 3)):
            i = self.rng.randrange(len(frames))
            if frames[i]:
                b = bytearray(frames[i])
                j = self.rng.randrange(len(b))
                b[j] ^= self.rng.randint(1, 255)
                frames[i] = bytes(b)
        return frames

    def truncated(self) -> list[bytes]:
        frames = self.valid()
        i = self.rng.randrange(len(frames))
        frames[i] = frames[i][: self.rng.randrange(len(frames[i]) + 1)]
        return frames

    def dropped(self) -> list[bytes]:
        frames = self.valid()
        del frames[self.rng.randrange(len(frames))]
        return frames or [b""]

    def duplicated(self) -> list[bytes]:
        frames = self.valid()
        i = self.rng.randrange(len(frames))
        frames.insert(i, frames[i])
        return frames

    def swapped(self) -> list[bytes]:
        frames = self.valid()
        i, j = self.rng.randrange(len(frames)), self.rng.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
        return frames

    def extra_frame(self) -> list[bytes]:
        frames = self.valid()
        junk = self.rng.randbytes(self.rng.randrange(40))
        frames.insert(self.rng.randrange(len(frames) + 1), junk)
        return frames

    def _with_header(self, head: bytes) -> list[bytes]:
        frames = self.valid()
        frames[self.header_at] = head
        return frames

    def wrong_kind(self) -> list[bytes]:
        kind = self.rng.choice([k for k in (0, 1, 2, 3, 4, 5, 6, 9, 127, 255) if k != self.kind])
        return self._with_header(header(kind, self.rng.getrandbits(64)))

    def wrong_version(self) -> list[bytes]:
        return self._with_header(header(self.kind, version=self.rng.choice((0, 2, 3, 255, -1))))

    def odd_header(self) -> list[bytes]:
        rng = self.rng
        head = rng.choice([
            header(self.kind, fields=3),
            header(self.kind, extra=5),
            header(self.kind, extra={1: 2}),
            header(self.kind, -1),
            msgpack.packb([1, self.kind, 1, "yesterday"]),
            msgpack.packb([1.0, self.kind, 1, 0.0]),
            msgpack.packb({"v": 1}),
            msgpack.packb([1, self.kind, 1, 0.0, {}, 6]),
            b"\x94\x01" + bytes([self.kind]) + b"\xcf" + rng.randbytes(rng.randrange(17)),
        ])
        return self._with_header(head)

    def huge_header(self) -> list[bytes]:
        size = self.rng.randint(MAX_HEADER_SIZE - 200, MAX_HEADER_SIZE + 200)
        base = len(header(self.kind, extra={"pad": ""}))
        pad = "x" * max(0, size - base - 2)  # str8/str16 length prefix: within a few bytes
        return self._with_header(header(self.kind, extra={"pad": pad}))

    def broken_body(self) -> list[bytes]:
        frames = self.valid()
        frames[-1] = self.rng.choice([b"\xc1", b"\x92\x01", b"\xa5ab", b"\xa2\xff\xfe",
                                      b"\xdd\xff\xff\xff\xff", msgpack.packb(1) + b"\x00",
                                      self.rng.randbytes(self.rng.randrange(1, 50))])
        return frames

    def raw_body(self) -> list[bytes]:
        frames = self._with_header(header(self.kind, extra={"enc": "raw"}))
        frames[-1] = self.rng.randbytes(self.rng.randrange(200))
        return frames

    def large_frame(self) -> list[bytes]:
        frames = self.valid()
        frames[self.rng.randrange(len(frames))] = self.rng.randbytes(
            self.rng.choice((65_536, 300_000)))
        return frames


def _body(rng: random.Random) -> bytes:
    return msgpack.packb(rng.choice([None, 1, "text", {"k": [1, 2.5]}, rng.randbytes(8)]))


def request_template(rng: random.Random) -> list[bytes]:
    return [b"", header(1, rng.getrandbits(63)), _body(rng)]


def control_template(rng: random.Random) -> list[bytes]:
    op = rng.choice(["ping", "ping", "info", "stats", "nope"])
    return [b"", header(1, rng.getrandbits(63)), msgpack.packb({"op": op})]


def message_template(rng: random.Random) -> list[bytes]:
    return [header(5, rng.getrandbits(63)), _body(rng)]


def event_template(rng: random.Random) -> list[bytes]:
    return [rng.choice([b"t", b"", b"prices.EUR"]), header(4, rng.getrandbits(63)), _body(rng)]


# --- what the spec says should happen ---------------------------------------------------------


@dataclass
class Expect:
    sent: int = 0
    refused: int = 0
    valid: int = 0
    replies: int = 0
    silent: int = 0  # valid control messages answered by no reply (hello, peers)
    by_mutation: dict[str, int] = field(default_factory=dict)

    def classify_request(self, frames: list[bytes], control: bool) -> None:
        try:
            _, payload = wire.split_route([b"\x00id"] + frames)  # the ROUTER adds an identity
        except RemoteProtocolError:
            self.refused += 1  # no envelope: nobody to answer
            return
        try:
            _, body = wire.parse_request(payload)
        except RemoteProtocolError:
            self.refused += 1
            self.replies += 1  # error reply
            return
        self.valid += 1
        op = body.get("op") if control and isinstance(body, dict) else None
        if op in ("hello", "peers"):
            self.silent += 1
        else:
            self.replies += 1

    def classify(self, frames: list[bytes], parse: Callable[[list[bytes]], Any]) -> None:
        try:
            parse(frames)
        except RemoteProtocolError:
            self.refused += 1
        else:
            self.valid += 1


# --- driving the node ---------------------------------------------------------------------------


class Victim:
    def __init__(self, procs: ProcessGroup, pub_port: int, tag: str) -> None:
        self.svc, self.stream, self.pipe = f"fz-svc-{tag}", f"fz-ticks-{tag}", f"fz-jobs-{tag}"
        head = (f"NAME = 'fz-victim-{tag}'\nSVC = {self.svc!r}\nSTREAM = {self.stream!r}\n"
                f"PIPE = {self.pipe!r}\nPUB_PORT = {pub_port}\n")
        self.child: Child = procs.python(head + VICTIM, timeout=WAIT)
        info = json.loads(self.child.expect("INFO", WAIT))
        self.name: str = info["name"]
        self.pid: int = info["pid"]
        self.ports: dict[str, int] = info["ports"]

    def memory_kib(self) -> dict[str, int]:
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            fields = dict(line.split(":", 1) for line in status)
        return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}

    def alive(self) -> bool:
        return self.child.proc.poll() is None


def counters(observer: zf.Node, victim: Victim) -> dict[str, int]:
    return observer.stats(victim.name, timeout=WAIT)["counters"]


def wait_counters(observer: zf.Node, victim: Victim, done: Callable[[dict[str, int]], bool],
                  what: str, timeout: float = WAIT) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        now = counters(observer, victim)
        if done(now):
            return now
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; counters: {now}")
        time.sleep(0.005)


def grew(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def raw_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(WAIT * 1000))
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    return sock


def fuzz_router(ctx: zmq.Context, observer: zf.Node, victim: Victim, port: int, gen: Generator,
                count: int, control: bool) -> dict[str, Any]:
    """A DEALER sends ``count`` messages to a ROUTER endpoint and collects every reply."""
    dealer = raw_socket(ctx, zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    expect = Expect()
    received = 0
    try:
        before = counters(observer, victim)
        for _ in range(count):
            name, frames = gen.next()
            expect.by_mutation[name] = expect.by_mutation.get(name, 0) + 1
            expect.classify_request(frames, control)
            expect.sent += 1
            dealer.send_multipart(frames)
            while dealer.poll(0):
                dealer.recv_multipart()
                received += 1
        deadline = time.monotonic() + WAIT
        while received < expect.replies and dealer.poll(
                max(1, int((deadline - time.monotonic()) * 1000))):
            dealer.recv_multipart()
            received += 1
        after = wait_counters(observer, victim,
                              lambda c: grew(before, c, "refused_request") >= expect.refused,
                              "the refusals to be counted")
        extra = 0
        while dealer.poll(200):  # anything beyond the expected replies would be a bug
            dealer.recv_multipart()
            extra += 1
    finally:
        dealer.close(0)
    return {"expect": expect, "counted_refused": grew(before, after, "refused_request"),
            "replies": received + extra, "counters": {k: grew(before, after, k) for k in after
                                                      if grew(before, after, k)}}


def fuzz_pipeline(ctx: zmq.Context, observer: zf.Node, victim: Victim, gen: Generator,
                  count: int) -> dict[str, Any]:
    push = raw_socket(ctx, zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{victim.ports['pull']}")
    expect = Expect()
    try:
        before = counters(observer, victim)
        for _ in range(count):
            name, frames = gen.next()
            expect.by_mutation[name] = expect.by_mutation.get(name, 0) + 1
            expect.classify(frames, wire.parse_message)
            expect.sent += 1
            push.send_multipart(frames)
        after = wait_counters(
            observer, victim,
            lambda c: grew(before, c, "refused_message") + grew(before, c, "fuzz_good_messages")
            >= expect.sent, "the puller to read every message", timeout=WAIT * 4)
    finally:
        push.close(0)
    return {"expect": expect, "counted_refused": grew(before, after, "refused_message"),
            "good": grew(before, after, "fuzz_good_messages"),
            "counters": {k: grew(before, after, k) for k in after if grew(before, after, k)}}


def fuzz_stream(pub: zmq.Socket, observer: zf.Node, victim: Victim, gen: Generator,
                count: int) -> dict[str, Any]:
    expect = Expect()
    before = counters(observer, victim)

    def seen(c: dict[str, int]) -> int:
        return grew(before, c, "refused_event") + grew(before, c, "fuzz_good_events")

    after = before
    for start in range(0, count, PUB_BATCH):
        for _ in range(min(PUB_BATCH, count - start)):
            name, frames = gen.next()
            expect.by_mutation[name] = expect.by_mutation.get(name, 0) + 1
            expect.classify(frames, wire.parse_event)
            expect.sent += 1
            pub.send_multipart(frames)
        sent = expect.sent
        after = wait_counters(observer, victim, lambda c, sent=sent: seen(c) >= sent,
                              f"the subscriber to read {sent} events")
    return {"expect": expect, "counted_refused": grew(before, after, "refused_event"),
            "good": grew(before, after, "fuzz_good_events"),
            "counters": {k: grew(before, after, k) for k in after if grew(before, after, k)}}


def subscribe_through(pub: zmq.Socket, observer: zf.Node, victim: Victim) -> None:
    """Publish probes until the child's subscription is through (PUB drops what came before)."""
    deadline = time.monotonic() + WAIT
    while counters(observer, victim).get("fuzz_good_events", 0) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the child's subscription never reached the raw PUB")
        pub.send_multipart([b"probe", header(4), msgpack.packb("probe")])
        time.sleep(0.02)


def merge(total: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    """Add one round's result of an endpoint to the totals of the earlier rounds."""
    if total is None:
        return more
    e, m = total["expect"], more["expect"]
    for key in ("sent", "refused", "valid", "replies", "silent"):
        setattr(e, key, getattr(e, key) + getattr(m, key))
    for key, n in m.by_mutation.items():
        e.by_mutation[key] = e.by_mutation.get(key, 0) + n
    out = {**total, "expect": e}
    for key in ("counted_refused", "replies", "good"):
        if key in more:
            out[key] = total[key] + more[key]
    out["counters"] = {k: total["counters"].get(k, 0) + more["counters"].get(k, 0)
                       for k in {*total["counters"], *more["counters"]}}
    return out


def run(count: int, seed: int, rounds: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    tag = f"{seed % 10000}-{time.monotonic_ns() % 10**6}"
    ctx = zmq.Context()
    pub = raw_socket(ctx, zmq.PUB)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    procs = ProcessGroup()
    observer: zf.Node | None = None
    try:
        victim = Victim(procs, pub_port, tag)
        observer = zf.Node(f"fz-observer-{tag}").start()
        observer.wait_for_node(victim.name, WAIT)
        assert observer.request(victim.svc, "warm-up", timeout=WAIT) == {"echo": "warm-up"}
        subscribe_through(pub, observer, victim)
        memory_before = victim.memory_kib()
        memory_rounds: list[dict[str, int]] = []
        start = time.monotonic()
        results: dict[str, dict[str, Any]] = {}
        timing: dict[str, float] = {}
        for _ in range(rounds):
            phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                ("service (ROUTER)", lambda: fuzz_router(
                    ctx, observer, victim, victim.ports["rep"],
                    Generator(rng, 1, request_template, 1), count, control=False)),
                ("control (ROUTER)", lambda: fuzz_router(
                    ctx, observer, victim, victim.ports["ctl"],
                    Generator(rng, 1, control_template, 1), count, control=True)),
                ("pipeline (PULL)", lambda: fuzz_pipeline(
                    ctx, observer, victim, Generator(rng, 5, message_template, 0), count)),
                ("stream (SUB)", lambda: fuzz_stream(
                    pub, observer, victim, Generator(rng, 4, event_template, 1), count)),
            ]
            for label, phase in phases:
                t = time.monotonic()
                results[label] = merge(results.get(label), phase())
                timing[label] = timing.get(label, 0.0) + time.monotonic() - t
                if not victim.alive():
                    raise RuntimeError(f"the node died during {label}: {victim.child.err_tail()}")
            memory_rounds.append(victim.memory_kib())
        elapsed = time.monotonic() - start
        memory_after = memory_rounds[-1]
        # Still serving, correctly, on every kind of endpoint:
        check = {"after": "the storm", "n": [1, 2, 3]}
        still = {
            "request": observer.request(victim.svc, check, timeout=WAIT) == {"echo": check},
            "ping": observer.ping(victim.name, timeout=WAIT)["node"] == victim.name,
        }
        before = counters(observer, victim)
        push = raw_socket(ctx, zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{victim.ports['pull']}")
        push.send_multipart(message_template(rng))
        pub.send_multipart(event_template(rng))
        wait_counters(observer, victim,
                      lambda c: grew(before, c, "fuzz_good_messages") == 1
                      and grew(before, c, "fuzz_good_events") == 1, "the last good messages")
        push.close(0)
        still["pipeline"] = still["stream"] = True
        final = counters(observer, victim)
        stderr = victim.child.err_tail(5)
    finally:
        if observer is not None:
            observer.close()
        procs.close()
        pub.close(0)
        ctx.term()
    return {"count": count, "seed": seed, "rounds": rounds, "elapsed_s": elapsed,
            "phase_s": timing, "memory_kib_rounds": memory_rounds,
            "results": results, "still_serving": still, "memory_kib_before": memory_before,
            "memory_kib_after": memory_after, "final_counters": final, "stderr_tail": stderr}


def verdicts(result: dict[str, Any]) -> dict[str, list[str]]:
    """What matched the spec exactly, per endpoint; explains any difference."""
    out: dict[str, list[str]] = {}
    for label, r in result["results"].items():
        e: Expect = r["expect"]
        notes = []
        if r["counted_refused"] != e.refused:
            notes.append(f"refused counted {r['counted_refused']} != expected {e.refused}")
        if "replies" in r and r["replies"] != e.replies:
            notes.append(f"replies {r['replies']} != expected {e.replies}")
        if "good" in r and r["good"] != e.valid:
            notes.append(f"good {r['good']} != expected {e.valid}")
        out[label] = notes
    return out


@click.command()
@click.option("--count", type=click.IntRange(1, 10**7), default=100_000, show_default=True,
              help="Messages sent to each endpoint kind.")
@click.option("--quick", is_flag=True, help="5,000 messages per endpoint kind.")
@click.option("--seed", type=int, default=None, help="Random seed (default: random, printed).")
@click.option("--rounds", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Repeat the whole storm; RSS after each round shows whether memory levels off.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def main(count: int, quick: bool, seed: int | None, rounds: int, as_json: bool) -> None:
    logging.basicConfig(level=logging.ERROR)  # the nodes' warnings about other nodes on lo
    if quick:
        count = 5_000
    seed = random.randrange(2**32) if seed is None else seed
    result = run(count, seed, rounds)
    checks = verdicts(result)
    ok = all(result["still_serving"].values()) and not any(checks.values())
    if as_json:
        result["results"] = {k: {**v, "expect": vars(v["expect"])}
                             for k, v in result["results"].items()}
        click.echo(json.dumps({**result, "mismatches": checks, "ok": ok}))
        sys.exit(0 if ok else 1)
    click.echo(f"fuzz_network: {count * rounds} messages per endpoint kind ({rounds} round"
               f"{'s' if rounds != 1 else ''}), seed {seed}, {result['elapsed_s']:.1f} s")
    click.echo(f"{'endpoint':<18}{'sent':>9}{'refused':>9}{'counted':>9}{'valid':>8}"
               f"{'handled':>9}{'replies':>15}{'msgs/s':>9}  match")
    for label, r in result["results"].items():
        e: Expect = r["expect"]
        handled = r.get("good", e.valid if "replies" in r else "")
        replies = f"{r['replies']}/{e.replies}" if "replies" in r else "-"
        rate = e.sent / result["phase_s"][label]
        click.echo(f"{label:<18}{e.sent:>9}{e.refused:>9}{r['counted_refused']:>9}{e.valid:>8}"
                   f"{handled!s:>9}{replies:>15}{rate:>9,.0f}  "
                   f"{'exact' if not checks[label] else '; '.join(checks[label])}")
    for label, r in result["results"].items():
        click.echo(f"  {label} counter deltas: {r['counters']}")
        click.echo(f"  {label} mutations: {r['expect'].by_mutation}")
    mb, ma = result["memory_kib_before"], result["memory_kib_after"]
    click.echo(f"RSS before {mb['VmRSS'] / 1024:.1f} MiB, after {ma['VmRSS'] / 1024:.1f} MiB "
               f"(growth {(ma['VmRSS'] - mb['VmRSS']) / 1024:+.1f} MiB; "
               f"peak {ma['VmHWM'] / 1024:.1f} MiB)")
    if rounds > 1:
        click.echo("RSS after each round (MiB): " + ", ".join(
            f"{m['VmRSS'] / 1024:.1f}" for m in result["memory_kib_rounds"]))
    click.echo(f"still serving: {result['still_serving']}")
    if result["stderr_tail"]:
        click.echo(f"child stderr (last lines):\n{result['stderr_tail']}")
    click.echo("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
