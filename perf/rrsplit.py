"""Where a request/reply round trip's time goes: each side plain pyzmq or zmqfabric, crossed, the
same message and the same msgpack work on both, pinned.

wirebench's ``rr`` compares a raw REQ/REP pair with a fabric pair, so it says how far apart they
are, not which side the difference is on. Here the raw sides speak the fabric's own frames
(docs/PROTOCOL.md 7.1) with plain pyzmq, so every side can face every other:

- raw client: a REQ (``--raw-client req``) or a ROUTER with the fabric requester's envelope,
  ``[route, "", frame]`` (``router``), sending ``[2, 1, id, ts, body, {"svc": name}]`` and
  unpacking ``[2, 2, id, ts, result]``, the id checked;
- raw server: a ROUTER answering each request with its body (unpack, pack), as the fabric echo
  service (``@node.reply`` returning its argument) does;
- the fabric sides are wirebench's ``rr`` halves (``requester.request``, ``serve_in_background``).

For each pair: p50 and p99 (µs) and each side's CPU per request in its working thread (the
client's main thread, the service's driver thread) and in ZeroMQ's I/O thread (from /proc's
schedstat, in nanoseconds): the client's over its timed requests, the server's from its
first request to its last (the 500 unmeasured ones included, in the count too). Pairs alternate
within each run; figures are medians over ``--runs``.

    python3 perf/rrsplit.py --runs 5                      # the four pairs, cross-core
    python3 perf/rrsplit.py --runs 5 --raw-client router  # the raw client with the envelope
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import click

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the checkout, for tests.fleet

from tests.fleet import thread_run_ns  # noqa: E402 - per-thread run time, from schedstat

#: A child that does not finish in this long is killed and the run fails.
CHILD_TIMEOUT_S = 120
WARMUP = 500
PAIRS = (("raw", "raw"), ("fabric", "raw"), ("raw", "fabric"), ("fabric", "fabric"))


def _threads() -> dict[str, float]:
    """CPU seconds used so far by each thread of this process, keyed ``tid:name``."""
    return {f"{tid}:{comm}": ns / 1e9 for tid, (comm, ns) in thread_run_ns(os.getpid()).items()}


def _split(before: dict[str, float], after: dict[str, float], n: int,
           worker: str | None = None) -> dict[str, float]:
    """CPU per request (µs) of the working thread (the main thread, or the thread whose
    ``tid:name`` key starts with ``worker``), ZeroMQ's I/O thread and the rest."""
    work = worker or f"{os.getpid()}:"
    split = {"main_us": 0.0, "io_us": 0.0, "other_us": 0.0}
    for key, used in after.items():
        spent = (used - before.get(key, 0.0)) * 1e6 / max(n, 1)
        if key.startswith(work):
            split["main_us"] += spent
        elif key.endswith("ZMQbg/IO/0"):
            split["io_us"] += spent
        else:
            split["other_us"] += spent
    return split


def serve(impl: str) -> None:
    """The server half: announce ``{"url", "name"}`` on stdout, serve until stdin closes (fabric)
    or no request comes for a second after the first (raw)."""
    if impl == "raw":
        import msgpack
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        print(json.dumps({"url": f"tcp://127.0.0.1:{port}", "name": "rrsplit"}), flush=True)
        sock.setsockopt(zmq.RCVTIMEO, 30_000)
        recv, send, more = sock.recv, sock.send, zmq.SNDMORE
        packb, unpackb, now = msgpack.packb, msgpack.unpackb, time.time
        served, before = 0, None
        try:
            while True:
                route = recv()
                if before is None:
                    before = _threads()
                recv()  # the empty delimiter
                fields = unpackb(recv())
                send(route, more)
                send(b"", more)
                send(packb([2, 2, fields[2], now(), fields[4]]))
                served += 1
                if served == 1:
                    sock.setsockopt(zmq.RCVTIMEO, 1000)
        except zmq.Again:
            print(json.dumps(_split(before or {}, _threads(), served)), flush=True)
        finally:
            sock.close()
            ctx.term()
    import threading

    import zmqfabric as zf

    node = zf.Node(f"rrsplit-b-{os.getpid()}")
    name = f"rrsplit-{os.getpid()}"
    state: dict[str, Any] = {"served": 0, "before": None, "tid": None}

    @node.reply(name)
    def echo(body: Any) -> Any:
        if state["before"] is None:
            state["before"], state["tid"] = _threads(), f"{threading.get_native_id()}:"
        state["served"] += 1
        return body

    try:
        node.start()
        node.serve_in_background()
        port = next(ep.port for ep in node._services.endpoints() if ep.name == name)
        print(json.dumps({"url": f"tcp://127.0.0.1:{port}", "name": name}), flush=True)
        sys.stdin.readline()  # the driver closes stdin when the client is done
        print(json.dumps(_split(state["before"] or {}, _threads(), state["served"],
                                state["tid"])), flush=True)
    finally:
        node.close()


def _raw_call(url: str, name: str, kind: str) -> tuple[Callable[[int], Any], Callable[[], None]]:
    import msgpack
    import zmq
    from wirebench import message

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ if kind == "req" else zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    route = url.encode()
    if kind == "router":
        sock.setsockopt(zmq.CONNECT_ROUTING_ID, route)
    sock.connect(url)
    packb, unpackb, now, svc = msgpack.packb, msgpack.unpackb, time.time, {"svc": name}
    send, recv, more = sock.send, sock.recv, zmq.SNDMORE
    ids = iter(range(1 << 40, 1 << 41))

    def call_req(i: int) -> Any:
        msg_id = next(ids)
        send(packb([2, 1, msg_id, now(), message(i), svc]))
        reply = unpackb(recv())
        if reply[2] != msg_id:
            raise RuntimeError("a reply to another request")
        return reply[4]

    def call_router(i: int) -> Any:
        msg_id = next(ids)
        send(route, more)
        send(b"", more)
        send(packb([2, 1, msg_id, now(), message(i), svc]))
        recv()
        recv()
        reply = unpackb(recv())
        if reply[2] != msg_id:
            raise RuntimeError("a reply to another request")
        return reply[4]

    def close() -> None:
        sock.close()
        ctx.term()

    if kind == "router":
        time.sleep(0.3)  # a ROUTER's send to a peer not yet connected is dropped
    return (call_req if kind == "req" else call_router), close


def client(impl: str, url: str, name: str, n: int, raw_kind: str) -> dict[str, Any]:
    """The client half: WARMUP then ``n`` timed requests; latency and CPU figures."""
    if impl == "raw":
        call, close = _raw_call(url, name, raw_kind)
    else:
        from wirebench import _connect, _node, message

        node = _node("c")
        request = _connect(node.requester(name), url).request
        call, close = (lambda i: request(message(i), 5)), node.close
    try:
        for i in range(WARMUP):
            call(i)
        pc, samples = time.perf_counter, []
        before = _threads()
        for i in range(n):
            t0 = pc()
            call(i)
            samples.append(pc() - t0)
        after = _threads()
    finally:
        close()
    samples.sort()
    return {"p50_us": samples[len(samples) // 2] * 1e6,
            "p99_us": samples[int(len(samples) * 0.99)] * 1e6, **_split(before, after, n)}


def run_pair(pair: tuple[str, str], n: int, pin: str, raw_kind: str) -> dict[str, Any]:
    client_cpu, server_cpu = {"cross": ("0", "1"), "same": ("0", "0")}[pin]
    server = subprocess.Popen(["taskset", "-c", server_cpu, sys.executable, HERE, "serve",
                               pair[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        info = json.loads(server.stdout.readline())
        done = subprocess.run(["taskset", "-c", client_cpu, sys.executable, HERE, "call", pair[0],
                               info["url"], info["name"], str(n), raw_kind],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if done.returncode != 0:
            raise click.ClickException(f"the {pair[0]} client failed:\n{done.stderr[-2000:]}")
        server.stdin.close()
        served = json.loads(server.stdout.readline())  # its CPU, once it has served the last
        server.wait(CHILD_TIMEOUT_S)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result.update({f"server_{key}": value for key, value in served.items()})
        return result
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@click.group(invoke_without_command=True)
@click.option("--runs", default=5, show_default=True, help="Runs; each runs every pair once.")
@click.option("--requests", "n", default=20_000, show_default=True,
              help="Timed requests per pair and run (after 500 unmeasured).")
@click.option("--pin", type=click.Choice(["cross", "same"]), default="cross", show_default=True,
              help="Client on CPU 0, server on CPU 1 (cross) or both on CPU 0 (same).")
@click.option("--raw-client", "raw_kind", type=click.Choice(["req", "router"]), default="req",
              show_default=True, help="The raw client's socket (router: the fabric's envelope).")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per pair.")
@click.pass_context
def main(ctx: click.Context, runs: int, n: int, pin: str, raw_kind: str, as_json: bool) -> None:
    """Each side of a round trip raw or fabric, crossed (see the module docstring)."""
    if ctx.invoked_subcommand is not None:
        return
    results: dict[tuple[str, str], list[dict[str, Any]]] = {pair: [] for pair in PAIRS}
    for _ in range(runs):
        for pair in PAIRS:
            results[pair].append(run_pair(pair, n, pin, raw_kind))
    base = statistics.median(r["p50_us"] for r in results[("raw", "raw")])
    if not as_json:
        print(f"{'client':7s} {'server':7s} {'p50 us':>8s} {'p99 us':>8s} {'x raw':>6s} "
              f"  CPU per request (us), working thread + I/O thread: client / server")
    for pair, rows in results.items():
        row = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        row.update(client=pair[0], server=pair[1], ratio=row["p50_us"] / base, runs=runs,
                   pin=pin, raw_client=raw_kind)
        if as_json:
            print(json.dumps(row))
        else:
            print(f"{pair[0]:7s} {pair[1]:7s} {row['p50_us']:8.1f} {row['p99_us']:8.1f} "
                  f"{row['ratio']:6.2f}  {row['main_us']:.1f} + {row['io_us']:.1f} / "
                  f"{row['server_main_us']:.1f} + {row['server_io_us']:.1f}")


@main.command("serve", hidden=True)
@click.argument("impl")
def serve_cmd(impl: str) -> None:
    serve(impl)


@main.command("call", hidden=True)
@click.argument("impl")
@click.argument("url")
@click.argument("name")
@click.argument("n", type=int)
@click.argument("raw_kind")
def call_cmd(impl: str, url: str, name: str, n: int, raw_kind: str) -> None:
    print(json.dumps(client(impl, url, name, n, raw_kind)), flush=True)


if __name__ == "__main__":
    main()
