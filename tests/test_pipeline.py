"""Push/pull pipelines across real processes: producer -> 3 worker processes -> sink, every message
exactly once, work spread over every worker.

PUSH deals round robin over the pullers it is *connected* to, so the producer first sends probes
until the sink has seen one through every worker (each worker's connection is then up); only then
does the counted batch go out.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import textwrap
import threading
import time
from typing import Any

import pytest

import zmqfabric as zf
from tests.procs import Child, ProcessGroup

pytestmark = pytest.mark.slow

SLOW = 20.0

PRELUDE = """\
import json, os, signal, sys, threading, time
import zmqfabric as zf

def report(**fields):
    print(json.dumps(fields), flush=True)
"""

#: A worker process: pulls from WORK, pushes {"id", "worker", "square"} into RESULTS. SIGTERM
#: ends the loop between messages; it reports how many it handled and exits 0.
WORKER = """
stopping = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopping.set())
handled = 0
with zf.Node(NAME) as node:
    work = node.puller(WORK)
    results = node.pusher(RESULTS)
    print("READY", flush=True)
    report(event="connected", ok=results.wait_ready(30.0))
    while not stopping.is_set():
        message = work.recv_message(timeout=0.1)
        if message is None:
            continue
        body = message.body
        results.send({"id": body["id"], "worker": NAME, "square": body["id"] ** 2}, timeout=30.0)
        handled += 1
report(event="stopped", handled=handled)
"""


def child_code(body: str, **params: Any) -> str:
    head = "".join(f"{key} = {value!r}\n" for key, value in params.items())
    return PRELUDE + head + textwrap.dedent(body)


def start_worker(procs: ProcessGroup, name: str, work: str, results: str) -> Child:
    code = child_code(WORKER, NAME=name, WORK=work, RESULTS=results)
    return procs.python(code, timeout=SLOW)


def stop_worker(child: Child) -> int:
    child.signal(signal.SIGTERM)
    line = child.json_line(SLOW)
    assert line["event"] == "stopped", line
    assert child.wait(SLOW) == 0, child.err_tail()
    return int(line["handled"])


def test_three_workers_every_message_exactly_once(procs, make_node, name) -> None:
    work, results = name("work"), name("results")
    node = make_node("producer")
    sink = node.puller(results)  # the sink exists first: workers find it as they start
    names = [name(f"worker{i}") for i in range(3)]
    workers = [start_worker(procs, n, work, results) for n in names]
    for child in workers:
        line = child.json_line(SLOW)
        assert line == {"event": "connected", "ok": True}, line
    ok = node.directory.wait_for(
        lambda: len(node.directory.providers(zf.EndpointKind.PIPELINE, work)) == 3, SLOW
    )
    assert ok, f"the 3 workers are not all listed: {node.nodes()}"
    producer = node.pusher(work)
    assert producer.wait_ready(SLOW)

    # Probes (negative ids) until a result came back through every worker.
    through: collections.Counter[str] = collections.Counter()  # every result, probes included
    probes = 0
    deadline = time.monotonic() + SLOW
    while set(through) != set(names):
        assert time.monotonic() < deadline, f"probes only came back through {set(through)}"
        probes += 1
        producer.send({"id": -probes}, timeout=SLOW)
        try:
            through[sink.recv(timeout=0.05)["worker"]] += 1
        except zf.FabricTimeoutError:
            pass

    total = 3000
    for i in range(total):
        producer.send({"id": i}, timeout=SLOW)

    ids: collections.Counter[int] = collections.Counter()
    by_worker: collections.Counter[str] = collections.Counter()

    def take(result: dict[str, Any]) -> None:
        through[result["worker"]] += 1
        if result["id"] >= 0:
            assert result["square"] == result["id"] ** 2
            ids[result["id"]] += 1
            by_worker[result["worker"]] += 1

    # Each result must come within SLOW s of the previous one (a stall fails at once); the whole
    # batch gets long, since 3000 round trips through Python workers crawl on a loaded machine.
    deadline = time.monotonic() + 90.0
    while len(ids) < total:
        assert time.monotonic() < deadline, f"only {len(ids)} of {total} results arrived"
        take(sink.recv(timeout=SLOW))
    while True:  # anything still in flight is a late probe or a duplicate
        try:
            take(sink.recv(timeout=0.2))
        except zf.FabricTimeoutError:
            break

    assert set(ids) == set(range(total))
    duplicates = {i: n for i, n in ids.items() if n != 1}
    assert not duplicates, f"delivered more than once: {dict(list(duplicates.items())[:10])}"
    assert set(by_worker) == set(names)
    assert min(by_worker.values()) >= total // 6, f"uneven spread: {dict(by_worker)}"
    # Each worker reports what it handled: all of it reached the sink, nothing else did.
    handled = [stop_worker(child) for child in workers]
    assert handled == [through[n] for n in names]
    assert sum(handled) == total + probes


def test_pusher_without_puller_raises_no_provider(make_node, name) -> None:
    pusher = make_node("producer").pusher(name("nowhere"))
    assert pusher.wait_ready(0.2) is False
    start = time.monotonic()
    with pytest.raises(zf.NoProviderError) as info:
        pusher.send({"x": 1}, timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 3.0
    assert info.value.kind == "pipeline" and info.value.timeout == 0.3


def test_puller_recv_timeout(make_node, name) -> None:
    puller = make_node("sink").puller(name("empty"))
    start = time.monotonic()
    with pytest.raises(zf.FabricTimeoutError) as info:
        puller.recv(timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 3.0
    assert info.value.timeout == 0.2
    assert puller.recv_message(timeout=0.01) is None


def test_pipeline_in_one_process_keeps_order_and_big_bodies(make_node, name) -> None:
    """One pusher and one puller: messages arrive in order; large bytes go zero-copy intact."""
    pipeline = name("frames")
    puller = make_node("sink").puller(pipeline)
    pusher = make_node("source").pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    big = bytes(range(256)) * 1024  # 256 KiB: above the zero-copy threshold
    for i in range(200):
        pusher.send({"i": i}, timeout=SLOW)
    pusher.send(big, timeout=SLOW)
    assert [puller.recv(timeout=SLOW) for _ in range(200)] == [{"i": i} for i in range(200)]
    assert puller.recv(timeout=SLOW) == big


def test_send_many_delivers_one_by_one_in_order_with_consecutive_ids(make_node, name) -> None:
    """send_many packs bodies into batch frames; the puller's receives return them one at a
    time, in order, each with its own id (the batch's first id plus its place), whether read
    with recv (the hot path) or recv_message (the plan); a large raw body among them travels
    on its own, in its place."""
    pipeline = name("batched")
    puller = make_node("sink").puller(pipeline)
    pusher = make_node("source").pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    big = bytes(range(256)) * 512  # 128 KiB: raw, alone
    bodies: list[Any] = [{"i": i} for i in range(600)] + [big] + [{"i": 600}, {"i": 601}]
    pusher.send_many(bodies, timeout=SLOW)
    pusher.send({"i": "after"}, timeout=SLOW)
    got = [puller.recv(timeout=SLOW) for _ in range(300)]
    messages = [puller.recv_message(timeout=SLOW) for _ in range(len(bodies) - 300 + 1)]
    assert None not in messages
    assert got + [m.body for m in messages] == bodies + [{"i": "after"}]
    ids = [m.msg_id for m in messages]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # consecutive across batches
    assert puller.recv_message(timeout=0.05) is None


def test_a_pusher_ahead_of_its_puller_loses_nothing_and_needs_no_more_sends(
        make_node, name) -> None:
    """A pusher that outruns its puller waits for room (ZeroMQ's backpressure); when the sender
    stops (no flush, no close, no further send), every message it sent still arrives, in order.
    Before: a pusher that held messages back to batch them stranded the last ones of a burst
    until its next send (the demo's pipeline missed 184 jobs)."""
    pipeline = name("flood")
    sink = make_node("sink")
    puller = sink.puller(pipeline)
    source = make_node("source")
    pusher = source.pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    count = 100_000  # beyond both HWMs (10,000 each side) and the kernel's buffers (20 MB)
    pad = b"x" * 200
    got: list[Any] = []
    started = threading.Event()

    def read() -> None:  # late and slower than the pusher: it stays behind to the end
        started.wait(SLOW)
        time.sleep(0.2)
        deadline = time.monotonic() + SLOW
        while len(got) < count and time.monotonic() < deadline:
            with contextlib.suppress(zf.FabricTimeoutError):
                got.append(puller.recv(timeout=0.2))
                if len(got) % 1000 == 0:
                    time.sleep(0.005)

    reader = threading.Thread(target=read, name="test-slow-puller")
    reader.start()
    try:
        for i in range(count):
            pusher.send([i, pad], timeout=SLOW)
            if i == 1000:
                started.set()
    finally:
        started.set()
        reader.join(2 * SLOW)  # the pusher sends nothing more meanwhile
    assert len(got) == count and got == [[i, pad] for i in range(count)]


def test_first_sends_wait_for_the_connection(make_node, name) -> None:
    """A fresh pusher whose connection is still being made waits in send; every message
    arrives."""
    pipeline = name("fresh")
    puller = make_node("sink").puller(pipeline)
    source = make_node("source")
    pusher = source.pusher(pipeline)
    for i in range(5):
        pusher.send(i, timeout=SLOW)
    assert [puller.recv(timeout=SLOW) for _ in range(5)] == list(range(5))
