"""Hostile traffic at a live node, in protocol 2: random and mutated messages to every kind of
endpoint it reads from, then proof that it still works, that it counted exactly what it
refused, and that its memory and file descriptors stay bounded.

A node runs in a child process (``fuzz_drive.VICTIM``) with a reply service and a task worker
(ROUTERs), its control endpoint (ROUTER), two pipeline pullers (PULL), two stream subscriptions
(SUB) and a task producer (DEALER); one puller and one subscription read with ``recv_message``,
the others with the ``recv`` hot path. Raw pyzmq sockets here send ``--count`` messages to each:
valid protocol-2 messages of the endpoint's kind (one frame, header and raw body frames,
batches, canonical and compact msgpack; ``fuzz_frames.py``) and mutations of them (random
frames, flipped and truncated bytes, dropped, duplicated, swapped and extra frames, wrong
versions 0, 1, 3 and 255, the version 1 layout, wrong kinds and flags, odd fields, header maps
around 4096 bytes, broken, bomb and too deep bodies, odd batches, wrong services, bad topics,
bad task items, a few large frames). The reference decoders (``zmqfabric.core.wire`` and
``task_frames``, i.e. docs/PROTOCOL.md in code) classify every message as it is sent
(``fuzz_expect.py``), so the node's counters are compared exactly:

- service and control: ``refused_request`` grows by the refused ones, and this DEALER gets
  exactly one reply per message that had a routing envelope, except one-way control ops;
- pipelines: ``refused_message`` by the refused ones, the child's count of good messages by the
  messages the rest carry (a batch carries several);
- streams: ``refused_event`` likewise (a raw PUB, paced in batches of 1000: a PUB drops instead
  of blocking when a subscriber's queue is full);
- tasks: ``refused_task`` by the refused ones, one grant per credit request and one result per
  task item;
- task results: the child submits a task to a raw ROUTER it holds as a worker; what that ROUTER
  sends its producer must grow ``refused_task_results`` by the refused ones and the producer's
  ``late`` count (results for tasks it never gave out) by the items of the rest.

Then a few frames over each endpoint's size limit go out on sockets of their own (ZeroMQ
disconnects such a peer), and the node must still answer a request, a ping, a task, and receive
a pipeline message and an event on each reader. Its resident memory and open descriptors are
read from /proc before and after each round. Everything runs on 127.0.0.1 (run it in a network
namespace of its own, e.g. ``/work/tools/innetns.sh``, to keep it away from other nodes on
the host); every loop is bounded.

    python3 perf/fuzz_network.py [--count 100000] [--rounds 1] [--quick] [--seed N]
                                 [--endpoints service,control,pipeline,pipeline-hot,stream,
                                  stream-hot,tasks,results] [--json]
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fuzz_expect  # noqa: E402
import fuzz_frames  # noqa: E402
from fuzz_drive import WAIT, Fire, Outcome, grew  # noqa: E402
from fuzz_expect import worker_answer  # noqa: E402
from fuzz_frames import Spec, render  # noqa: E402
from fuzz_mutations import Generator  # noqa: E402
from fuzz_victim import Victim  # noqa: E402

import zmqfabric as zf  # noqa: E402
from tests.procs import ProcessGroup  # noqa: E402
from zmqfabric.constants import MAX_CONTROL_MESSAGE, MAX_MESSAGE_SIZE  # noqa: E402


def phases(fire: Fire, pubs: list[zmq.Socket], worker: zmq.Socket, rng: random.Random,
           count: int, hot_events: fuzz_expect.EventHot
           ) -> list[tuple[str, Callable[[], Outcome]]]:
    """Each endpoint's storm, in order: (label, run it). ``hot_events`` models the hot-path
    subscription over the whole run."""
    v = fire.victim

    def gen(what: str, template: Callable[[random.Random], Spec]) -> Generator:
        return Generator(rng, what, template)

    return [
        ("service", lambda: fire.requests(
            v.port("rep", v.svc), gen("request", lambda r: fuzz_frames.request(r, v.svc)),
            count, v.svc, control=False)),
        ("control", lambda: fire.requests(
            v.port("ctl", "control"), gen("control", fuzz_frames.control), count, "control",
            control=True)),
        ("pipeline", lambda: fire.pipeline(
            v.port("pull", v.pipes[0]), gen("message", fuzz_frames.message), count,
            f"fuzz_good_{v.pipes[0]}", hot=False)),
        ("pipeline recv()", lambda: fire.pipeline(
            v.port("pull", v.pipes[1]), gen("message", fuzz_frames.message), count,
            f"fuzz_good_{v.pipes[1]}", hot=True)),
        ("stream", lambda: fire.stream(
            pubs[0], gen("event", fuzz_frames.event), count, f"fuzz_good_{v.streams[0]}",
            fuzz_expect.event_whole)),
        ("stream recv()", lambda: fire.stream(
            pubs[1], gen("event", fuzz_frames.event), count, f"fuzz_good_{v.streams[1]}",
            hot_events)),
        ("tasks", lambda: fire.tasks(v.port("task", v.task), gen("task", fuzz_frames.task),
                                     count)),
        ("task results", lambda: fire.results(worker, gen("result", fuzz_frames.result), count)),
    ]


#: The topic of the events that wait for a subscription to reach a raw PUB.
PROBE_TOPIC = b"probe"


def subscribe_through(fire: Fire, pub: zmq.Socket, key: str) -> None:
    """Publish probes until the child's subscription is through (a PUB drops what came
    before)."""
    deadline = time.monotonic() + WAIT
    while fire.counters().get(key, 0) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the child's subscription ({key}) never reached the raw PUB")
        pub.send_multipart(render(Spec(4, "probe", topic=PROBE_TOPIC)))
        time.sleep(0.02)  # a probe interval; the loop ends on the counter


def oversized(fire: Fire) -> int:
    """Frames over each endpoint's size limit, each on a socket of its own: ZeroMQ drops the
    connection before the node reads anything. Returns how many connections the node dropped.

    Each socket is closed only after the node has dropped it (a monitor event, bounded):
    closing a socket with linger 0 while its connection is being dropped mid-message aborted
    this process in libzmq 4.3.5 (``session_base.cpp:233``, the family of libzmq #3442)."""
    v, dropped = fire.victim, 0
    big = b"\x00" * (MAX_MESSAGE_SIZE + 128 * 1024)
    for kind, port, frames in [
        (zmq.DEALER, v.port("ctl", "control"), [b"", b"\x95" * (MAX_CONTROL_MESSAGE + 1)]),
        (zmq.DEALER, v.port("rep", v.svc), [b"", big]),
        (zmq.DEALER, v.port("task", v.task), [b"", big, b"\x90"]),
        (zmq.PUSH, v.port("pull", v.pipes[0]), [big]),
        (zmq.PUSH, v.port("pull", v.pipes[1]), [big]),
    ]:
        sock = fire.socket(kind)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            sock.setsockopt(zmq.RECONNECT_IVL, -1)  # one connection: the one that is dropped
            sock.connect(f"tcp://127.0.0.1:{port}")
            sock.send_multipart(frames)
            if monitor.poll(int(WAIT * 1000)):
                dropped += 1
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
    return dropped


def still_serving(fire: Fire, pubs: list[zmq.Socket], rng: random.Random) -> dict[str, bool]:
    """One correct use of every endpoint after the storm."""
    v, observer = fire.victim, fire.observer
    check = {"after": "the storm", "n": [1, 2, 3]}
    out = {
        "request": observer.request(v.svc, check, timeout=WAIT) == {"echo": check},
        "ping": observer.ping(v.name, timeout=WAIT)["node"] == v.name,
    }
    before = fire.counters()
    keys = [f"fuzz_good_{name}" for name in (*v.pipes, *v.streams)]
    for pipe in v.pipes:
        push = fire.socket(zmq.PUSH, v.port("pull", pipe))
        push.send_multipart(render(Spec(5, "last")))
        push.close(int(WAIT * 1000))  # linger until it has left
    for pub in pubs:
        pub.send_multipart(render(Spec(4, "last", topic=b"t")))
    fire.wait_counters(lambda c: all(grew(before, c, k) >= 1 for k in keys),
                       "the last good messages")
    out["pipelines"] = out["streams"] = True
    dealer = fire.socket(zmq.DEALER, v.port("task", v.task))
    try:
        task = Spec(6, [["t-last", 1, "last", None]], 0, form="two", envelope=[b""])
        dealer.send_multipart(render(task))
        out["task"] = bool(dealer.poll(int(WAIT * 1000))) and (
            worker_answer(dealer.recv_multipart())[1] == 1)
    finally:
        dealer.close(0)
    return out


#: The endpoints ``--endpoints`` can pick, by the labels of the table.
ENDPOINTS = {"service": "service", "control": "control", "pipeline": "pipeline",
             "pipeline-hot": "pipeline recv()", "stream": "stream", "stream-hot": "stream recv()",
             "tasks": "tasks", "results": "task results"}


def run(count: int, seed: int, rounds: int = 1,
        endpoints: tuple[str, ...] = tuple(ENDPOINTS)) -> dict[str, Any]:
    rng = random.Random(seed)
    tag = f"{seed % 10000}-{time.monotonic_ns() % 10**6}"
    ctx = zmq.Context()
    pubs = [ctx.socket(zmq.PUB) for _ in range(2)]
    worker = ctx.socket(zmq.ROUTER)
    procs = ProcessGroup()
    observer: zf.Node | None = None
    try:
        for pub in pubs:
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, 100_000)
        pub_ports = [pub.bind_to_random_port("tcp://127.0.0.1") for pub in pubs]
        for option, value in ((zmq.LINGER, 0), (zmq.ROUTER_MANDATORY, 1),
                              (zmq.SNDHWM, 100_000), (zmq.SNDTIMEO, int(WAIT * 1000))):
            worker.setsockopt(option, value)
        worker_port = worker.bind_to_random_port("tcp://127.0.0.1")
        victim = Victim(procs, pub_ports, worker_port, tag)
        observer = zf.Node(f"fz-observer-{tag}").start()
        observer.wait_for_node(victim.name, WAIT)
        fire = Fire(ctx, observer, victim)
        assert observer.request(victim.svc, "warm-up", timeout=WAIT) == {"echo": "warm-up"}
        for pub, stream in zip(pubs, victim.streams, strict=True):
            subscribe_through(fire, pub, f"fuzz_good_{stream}")
        # The hot-path subscription has decoded the probes' topic (and caches it).
        hot_events = fuzz_expect.EventHot(learnt=(PROBE_TOPIC,))
        resources = [victim.resources()]
        results: dict[str, Outcome] = {}
        timing: dict[str, float] = {}
        start = time.monotonic()
        for _ in range(rounds):
            chosen = {ENDPOINTS[e] for e in endpoints}
            for label, phase in phases(fire, pubs, worker, rng, count, hot_events):
                if label not in chosen:
                    continue
                t = time.monotonic()
                outcome = phase()
                results.setdefault(label, Outcome()).add(outcome)
                timing[label] = timing.get(label, 0.0) + time.monotonic() - t
                if not victim.alive():
                    raise RuntimeError(f"the node died during {label}: {victim.child.err_tail()}")
            resources.append(victim.resources())
        elapsed = time.monotonic() - start
        over = oversized(fire)
        still = still_serving(fire, pubs, rng)
        spec = {"one-frame task message refused (PROTOCOL.md 7.4)": not fire.one_frame_credit(
            victim.port("task", victim.task))}
        resources.append(victim.resources())
        final = fire.counters()
        stderr = victim.child.err_tail(5)
    finally:
        if observer is not None:
            observer.close()
        procs.close()
        for pub in pubs:
            pub.close(0)
        worker.close(0)
        ctx.term()
    return {"count": count, "seed": seed, "rounds": rounds, "elapsed_s": elapsed,
            "phase_s": timing, "results": results, "resources": resources,
            "oversized_dropped": over, "still_serving": still, "spec_checks": spec,
            "final_counters": final, "stderr_tail": stderr}


#: Growth over a run that still counts as bounded: the first round warms caches and pools.
RSS_GROWTH_KIB = 64 * 1024
FD_GROWTH = 16


def bounded(result: dict[str, Any]) -> list[str]:
    """Resources that grew beyond the allowance (after the first round, when there are more)."""
    res = result["resources"]
    base = res[1] if len(res) > 3 else res[0]
    last, notes = res[-1], []
    if last["VmRSS"] - base["VmRSS"] > RSS_GROWTH_KIB:
        notes.append(f"RSS grew {(last['VmRSS'] - base['VmRSS']) / 1024:.1f} MiB")
    if last["fds"] - base["fds"] > FD_GROWTH:
        notes.append(f"open fds grew from {base['fds']} to {last['fds']}")
    return notes


def report(result: dict[str, Any]) -> None:
    count, rounds = result["count"], result["rounds"]
    click.echo(f"fuzz_network (protocol 2): {count * rounds} messages per endpoint "
               f"({rounds} round{'s' if rounds != 1 else ''}), seed {result['seed']}, "
               f"{result['elapsed_s']:.1f} s")
    click.echo(f"{'endpoint':<17}{'sent':>8}{'refused':>9}{'counted':>9}{'valid':>8}"
               f"{'handled':>9}{'replies':>15}{'msgs/s':>8}  match")
    for label, r in result["results"].items():
        e = r.expect
        handled = "" if r.handled is None else r.handled
        if r.grants is not None:
            answers = f"{r.grants}/{e.grants} gr"
        elif r.replies is not None:
            answers = f"{r.replies}/{e.replies}"
        else:
            answers = "-"
        rate = e.sent / result["phase_s"][label]
        notes = r.mismatches()
        click.echo(f"{label:<17}{e.sent:>8}{e.refused:>9}{r.counted_refused:>9}{e.valid:>8}"
                   f"{handled!s:>9}{answers:>15}{rate:>8,.0f}  "
                   f"{'exact' if not notes else '; '.join(notes)}")
    for label, r in result["results"].items():
        shown = {k: v for k, v in r.counters.items() if not k.startswith("fuzz_")}
        click.echo(f"  {label}: counter deltas {shown}")
        if r.expect.dropped:
            click.echo(f"  {label}: {r.expect.dropped} messages over 64 KiB dropped unanswered")
    by: dict[str, int] = {}
    for r in result["results"].values():
        for k, n in r.expect.by_mutation.items():
            by[k] = by.get(k, 0) + n
    click.echo("  mutations sent: " + ", ".join(f"{k} {n}" for k, n in sorted(by.items())))
    res = result["resources"]
    click.echo("RSS (MiB) start, after each round, at the end: " + ", ".join(
        f"{m['VmRSS'] / 1024:.1f}" for m in res) + f"; peak {res[-1]['VmHWM'] / 1024:.1f}")
    click.echo("open fds: " + ", ".join(str(m["fds"]) for m in res))
    click.echo(f"oversized frames: {result['oversized_dropped']} of 5 senders dropped; "
               f"still serving: {result['still_serving']}")
    click.echo(f"spec checks: {result['spec_checks']}")
    if result["stderr_tail"]:
        click.echo(f"child stderr (last lines):\n{result['stderr_tail']}")


@click.command()
@click.option("--count", type=click.IntRange(1, 10**7), default=100_000, show_default=True,
              help="Messages sent to each endpoint.")
@click.option("--quick", is_flag=True, help="5,000 messages per endpoint.")
@click.option("--seed", type=int, default=None, help="Random seed (default: random, printed).")
@click.option("--rounds", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Repeat the whole storm; RSS after each round shows whether memory levels off.")
@click.option("--endpoints", default=",".join(ENDPOINTS), show_default=True,
              help="Comma list of the endpoints to fuzz.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def main(count: int, quick: bool, seed: int | None, rounds: int, endpoints: str,
         as_json: bool) -> None:
    logging.basicConfig(level=logging.ERROR)  # the nodes' warnings about refused messages
    if quick:
        count = 5_000
    seed = random.randrange(2**32) if seed is None else seed
    chosen = tuple(e.strip() for e in endpoints.split(",") if e.strip())
    unknown = [e for e in chosen if e not in ENDPOINTS]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown endpoints {unknown}; choose from {list(ENDPOINTS)}",
                                 param_hint="--endpoints")
    result = run(count, seed, rounds, chosen)
    checks = {label: r.mismatches() for label, r in result["results"].items()}
    growth = bounded(result)
    ok = (all(result["still_serving"].values()) and result["oversized_dropped"] == 5
          and not any(checks.values()) and not growth and all(result["spec_checks"].values()))
    if as_json:
        result["results"] = {k: {**vars(v), "expect": vars(v.expect)}
                             for k, v in result["results"].items()}
        for r in result["results"].values():  # ids as counts per id are too long to print
            r["reply_ids"] = r["expect"]["reply_ids"] = None
        click.echo(json.dumps({**result, "mismatches": checks, "growth": growth, "ok": ok}))
    else:
        report(result)
        if growth:
            click.echo("unbounded: " + "; ".join(growth))
        for what, held in result["spec_checks"].items():
            if not held:
                click.echo(f"spec and code disagree: {what}: no")
        click.echo("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
