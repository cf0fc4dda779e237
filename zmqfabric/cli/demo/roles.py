"""The processes of ``zmqfabric demo``: one function per role, each run in a spawned child.

Every child is an ordinary :class:`zmqfabric.Node` that finds the others by discovery. It reports
to the parent over its own pipe (msgpack, never pickle): ``("waiting", {"for": what})`` while it
waits for a peer, ``("ready", {})`` once its part of the fabric is connected, ``("progress",
counts)`` a few times a second, ``("final", counts)`` at the end, or ``("error", {"error":
text})``. The parent steers every child with three events: ``go`` (start traffic),
``stop_sources`` (sources stop sending) and ``stop`` (everyone closes and exits). A child also
stops when its parent disappears, so no child outlives the demo. The child's side of that
protocol (the pipe, the events, the names of a run) is :mod:`.child`; this module is the roles.
"""

from __future__ import annotations

import logging
import signal
import statistics
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any, Callable

from ...config import NodeConfig
from ...core.records import EndpointKind
from ...errors import FabricError, NoProviderError
from ...node import Node
from .child import PROGRESS_S, TICK_S, Child, Controls, RoleSpec, Stopped

log = logging.getLogger(__name__)

#: Pipeline queue depth per connection: backpressure instead of an unbounded backlog. The
#: kernel's socket buffers hold more (tens of thousands of small jobs per connection on a loaded
#: host), which the parent waits for once the sources stop (run.py, DRAIN_STALL_S).
PIPELINE_HWM = 200
#: Each request waits this long (s) for its answer; a miss is counted, not fatal.
REQUEST_TIMEOUT_S = 2.0
#: The publisher repeats a warm-up message this often (s) until every subscriber has one.
WARMUP_EVERY_S = 0.02


def child_main(spec: RoleSpec, conn: Connection, controls: Controls) -> None:
    """Entry point of a demo child (spawned): play ``spec.role``, report, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: parent decides
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"demo {spec.role_id}: %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(handler)  # this is the child's main: it owns logging
    logging.getLogger().setLevel(spec.log_level)
    child = Child(spec, conn, controls)
    try:
        if not child.stopping():  # stopped while this interpreter was starting: nothing to do
            ROLES[spec.role](child)
    except Stopped:
        pass
    except Exception as exc:  # reported to the parent, which shows it and stops the demo
        log.debug("demo %s failed", spec.role_id, exc_info=True)
        _send_quietly(child, "error", {"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None
    finally:
        conn.close()


def _send_quietly(child: Child, kind: str, data: dict[str, Any]) -> None:
    try:
        child.send(kind, data)
    except OSError:
        pass  # the parent is gone


def _node(spec: RoleSpec, hwm: int | None = None) -> Node:
    config = NodeConfig(scope=spec.scope) if hwm is None else NodeConfig(scope=spec.scope, hwm=hwm)
    return Node(spec.names.node(spec.role_id), config=config, metrics_port=spec.metrics_port)


def _providers(node: Node, kind: EndpointKind, name: str, wanted: int) -> Callable[[], bool]:
    return lambda: node.directory.wait_for(
        lambda: len(node.directory.providers(kind, name)) >= wanted, TICK_S
    )


# --- request/reply ---------------------------------------------------------------------------


def provider(child: Child) -> None:
    node = _node(child.spec)
    served = 0

    @node.reply(child.spec.names.service)
    def square(body: dict[str, int]) -> dict[str, Any]:
        nonlocal served
        served += 1
        return {"n": body["n"], "square": body["n"] * body["n"], "by": child.spec.role_id}

    with node:
        child.ready()
        while not child.stopping():
            node.run(timeout=PROGRESS_S, handle_signals=False)
            child.progress(lambda: {"served": served})
        child.send("final", {"served": served})


def client(child: Child) -> None:
    spec = child.spec
    with _node(spec) as node:
        child.until(f"{spec.providers} providers of {spec.names.service!r}",
                    _providers(node, EndpointKind.REPLY, spec.names.service, spec.providers))
        requester = node.requester(spec.names.service)
        child.ready()
        child.wait_go()
        latencies: list[float] = []
        by: Counter[str] = Counter()
        sent = wrong = failed = 0
        start = time.monotonic()
        while not child.sources_stopping():
            n = sent
            sent += 1
            began = time.perf_counter()
            try:
                reply = requester.request({"n": n}, timeout=REQUEST_TIMEOUT_S)
            except FabricError:
                failed += 1
                continue
            latencies.append(time.perf_counter() - began)
            by[reply["by"]] += 1
            wrong += reply["square"] != n * n
            child.progress(lambda: {"sent": sent, "replies": len(latencies)})  # noqa: B023 (called now)
        elapsed = time.monotonic() - start
        child.send("final", {
            "sent": sent, "replies": len(latencies), "wrong": wrong, "failed": failed,
            "by": dict(by), "elapsed": elapsed, **_percentiles(latencies),
        })
        child.wait_stop()


def _percentiles(latencies: list[float]) -> dict[str, float]:
    if len(latencies) < 2:
        value = latencies[0] * 1000 if latencies else 0.0
        return {"p50_ms": value, "p99_ms": value}
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000}


# --- publish/subscribe -------------------------------------------------------------------------


def publisher(child: Child) -> None:
    spec = child.spec
    with _node(spec) as node:
        pub = node.publisher(spec.names.stream)
        child.ready()
        deadline = time.monotonic() + spec.startup_timeout * 2
        while not child.go_within(WARMUP_EVERY_S):  # warm up until every subscriber has one
            if child.stopping() or time.monotonic() > deadline:
                raise Stopped
            pub.send("warmup", None)
        seq = 0
        start = time.monotonic()
        while not child.sources_stopping():
            due = int((time.monotonic() - start) * spec.pub_rate)
            while seq < due:
                pub.send("tick", {"seq": seq})
                seq += 1
            child.progress(lambda: {"sent": seq})  # noqa: B023 (called now)
            child.pace(0.002)
        child.send("final", {"sent": seq, "elapsed": time.monotonic() - start})
        child.wait_stop()


def subscriber(child: Child) -> None:
    spec = child.spec
    with _node(spec) as node:
        sub = node.subscribe(spec.names.stream, ["warmup", "tick"])

        def warmed_up() -> bool:
            message = sub.recv_message(TICK_S)
            return message is not None and message.topic == "warmup"

        child.until("a warm-up message from the publisher", warmed_up)
        child.ready()
        received = gaps = disorder = 0
        expected = 0
        while not child.stopping():
            message = sub.recv_message(TICK_S)
            if message is not None and message.topic == "tick":
                seq = message.body["seq"]
                if seq > expected:
                    gaps += seq - expected
                elif seq < expected:
                    disorder += 1
                expected = max(expected, seq + 1)
                received += 1
            child.progress(lambda: {"received": received})  # noqa: B023 (called now)
        child.send("final", {"received": received, "gaps": gaps, "disorder": disorder})


# --- pipeline ----------------------------------------------------------------------------------


def producer(child: Child) -> None:
    spec = child.spec
    with _node(spec, PIPELINE_HWM) as node:
        child.until(f"{spec.workers} workers on pipeline {spec.names.jobs!r}",
                    _providers(node, EndpointKind.PIPELINE, spec.names.jobs, spec.workers))
        push = node.pusher(spec.names.jobs)
        child.until("a connection to a worker", lambda: push.wait_ready(TICK_S))
        child.ready()
        child.wait_go()
        sent = 0
        start = time.monotonic()
        while not child.sources_stopping():
            try:
                push.send({"id": sent, "n": sent % 97}, timeout=TICK_S)
            except NoProviderError:
                continue  # every worker is PIPELINE_HWM jobs behind: backpressure
            sent += 1
            child.progress(lambda: {"sent": sent})  # noqa: B023 (called now)
        child.send("final", {"sent": sent, "elapsed": time.monotonic() - start})
        child.wait_stop()


def worker(child: Child) -> None:
    spec = child.spec
    with _node(spec, PIPELINE_HWM) as node:
        jobs = node.puller(spec.names.jobs)
        results = node.pusher(spec.names.results)
        child.until("a connection to the sink", lambda: results.wait_ready(TICK_S))
        child.ready()
        done = 0
        while not child.stopping():
            message = jobs.recv_message(TICK_S)
            if message is not None:
                job = message.body
                result = {"id": job["id"], "value": sum(i * i for i in range(job["n"])),
                          "by": spec.role_id}
                while not _try_send(results, result) and not child.stopping():
                    pass
                done += 1
            child.progress(lambda: {"done": done})  # noqa: B023 (called now)
        child.send("final", {"done": done})


def _try_send(pusher: Any, body: Any) -> bool:
    try:
        pusher.send(body, timeout=TICK_S)
        return True
    except NoProviderError:
        return False


def sink(child: Child) -> None:
    spec = child.spec
    with _node(spec, PIPELINE_HWM) as node:
        results = node.puller(spec.names.results)
        child.ready()
        seen: set[int] = set()
        by: Counter[str] = Counter()
        received = duplicates = 0
        first = last = 0.0
        while not child.stopping():
            message = results.recv_message(TICK_S)
            if message is not None:
                last = time.monotonic()
                first = first or last
                job_id = message.body["id"]
                duplicates += job_id in seen
                seen.add(job_id)
                by[message.body["by"]] += 1
                received += 1
            child.progress(lambda: {"received": received, "unique": len(seen)})  # noqa: B023 (called now)
        child.send("final", {
            "received": received, "unique": len(seen), "duplicates": duplicates,
            "max_id": max(seen, default=-1), "by": dict(by), "elapsed": last - first,
        })


ROLES: dict[str, Callable[[Child], None]] = {
    "provider": provider,
    "client": client,
    "publisher": publisher,
    "subscriber": subscriber,
    "producer": producer,
    "worker": worker,
    "sink": sink,
}
