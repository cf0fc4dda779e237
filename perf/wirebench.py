"""The headline comparison of issue 15: zmqfabric against the best plain pyzmq program for the
same job, the same message, in the same run, with builds and implementations alternating.

The message is the issue's: a msgpack dict built per send, ``{"id": i, "ts": time.time(),
"kind": "m", "blob": 29 bytes}`` (64 bytes packed for ids >= 65536), except ``pp1m``
(1 MiB bytes bodies). Raw programs are one frame per message, C-level receive:

- ``rr``: request/reply round trip. Raw REQ ``send(packb(msg))`` / ``unpackb(recv())`` against a
  REP echoing ``send(packb(unpackb(recv())))``. Fabric: ``requester.request(msg)`` against a
  node's ``@node.reply`` echo served by ``serve_in_background``. p50/p99 in microseconds.
- ``pp``: push/pull. Raw PUSH ``send(packb(msg))`` -> PULL ``unpackb(recv())``. Fabric:
  ``pusher.send(msg)`` -> ``puller.recv()``. Messages/s at the receiver.
- ``ps``: pub/sub, topic ``m``. Raw XPUB ``send(b"m" + packb(msg))`` -> SUB
  ``unpackb(recv()[1:])`` (one frame, the topic its first bytes), lossless: XPUB_NODROP (a send
  waits at the HWM) and the fabric's HWM. Fabric: ``publisher.send("m", msg)`` ->
  ``subscription.recv()``. Messages/s received and drops (``dropped``, ``drop_pct``) of both.
  A raw PUB that drops spends its core (pinned: shared with its I/O thread) on messages nobody
  gets: it delivered 0.37x of the lossless rate (137k of 371k msg/s, 66% dropped), so the
  fabric, which drops nothing at these rates, read 1.5-2.2x raw.
- ``pp1m``: push/pull of 1 MiB bytes bodies. Raw ``send(body, copy=False)`` / ``recv(copy=False)``.
- ``batch``: the fabric's ``pusher.send_many`` (batches of 256) -> ``puller.recv()`` against
  raw one message per frame (builds without ``send_many`` skip it).

``cpu_us`` / ``peer_cpu_us``: process CPU per message (all threads) of the measuring side (rr: the
client; others: the receiver) and of its peer, from the first message on; steadier under load.

Each (case, build) pair runs in two fresh processes (bind side, connect side), optionally pinned:
``--pin cross`` puts the measuring process on CPU 0 and its peer on CPU 1, ``--pin same`` both on
CPU 0. Fabric processes connect to the bound port at once (the perf hook); the handles carry the
advertised names, so discovery's own connection goes to the same endpoint. Medians of
``--runs`` runs; the ratio is fabric/raw of the medians (latency: lower is better).

    python3 perf/wirebench.py --builds old=/work/main,new=. --runs 5 --pin cross --json
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import click
from common import latency_figures, merge_runs  # perf/common.py (the script's directory)

HERE = os.path.abspath(__file__)
#: Bounds: a child that does not finish in this long is killed and the run counted as failed.
CHILD_TIMEOUT_S = 90
IDLE_MS = 500
MARK = 1023
BLOB = bytes(29)
#: The raw pub/sub sockets' HWM: the fabric's default (zmqfabric.constants.HWM).
PS_HWM = 10_000


def message(i: int) -> dict[str, Any]:
    return {"id": i, "ts": time.time(), "kind": "m", "blob": BLOB}


# --- the halves (run in child processes) ----------------------------------------------------


def _node(tag: str, echo: bool = False) -> Any:
    import zmqfabric as zf

    node = zf.Node(f"wb-{tag}-{os.getpid()}")
    if echo:
        node.reply(f"wbecho-{os.getpid()}")(lambda body: body)
    node.start()
    return node


def _connect(handle: Any, url: str) -> Any:
    handle._apply("connect", url)  # the perf hook: the connect step discovery would take
    return handle


def bind_half(case: str, impl: str, n: int, out: Any) -> dict[str, Any]:
    """The bind side: a server (rr), a receiver (pp, pp1m, batch) or a sender (ps)."""
    import msgpack
    import zmq

    if impl == "raw":
        ctx = zmq.Context()
        kind = {"rr": zmq.REP, "ps": zmq.XPUB}.get(case, zmq.PULL)
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if case == "ps":  # lossless (see the module docstring), with the fabric's HWM
            sock.setsockopt(zmq.SNDHWM, PS_HWM)
            sock.setsockopt(zmq.XPUB_NODROP, 1)  # a send waits at the HWM, nothing is dropped
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        _announce(out, {"url": f"tcp://127.0.0.1:{port}"})
        if case == "rr":
            sock.setsockopt(zmq.RCVTIMEO, 30000)
            recv, send, packb, unpackb = sock.recv, sock.send, msgpack.packb, msgpack.unpackb
            _mark()  # a blocking receive takes no CPU
            send(packb(unpackb(recv())))
            sock.setsockopt(zmq.RCVTIMEO, 1000)
            try:
                while True:
                    send(packb(unpackb(recv())))
            except zmq.Again:
                return _done({})
        if case == "ps":
            sock.setsockopt(zmq.RCVTIMEO, 30000)
            sock.recv()  # the subscription: the subscriber is there
            send, packb = sock.send, msgpack.packb
            _mark()
            for i in range(n):
                send(b"m" + packb(message(i)))
            return _done({"sent": n})
        return _raw_receive(sock, case, n)
    node = _node("b", echo=case == "rr")
    try:
        if case == "rr":
            node.serve_in_background()
            name = f"wbecho-{os.getpid()}"
            port = next(ep.port for ep in node._services.endpoints() if ep.name == name)
            _announce(out, {"url": f"tcp://127.0.0.1:{port}", "name": name})
            _mark()  # idle until the client's first request
            return _done({})
        if case == "ps":
            pub = node.publisher(f"wbstream-{os.getpid()}")
            _announce(out, {"url": f"tcp://127.0.0.1:{pub.port}", "name": pub.name})
            pub.wait_subscribers(1, 30)
            send = pub.send
            _mark()
            for i in range(n):
                send("m", message(i))
            return _done({"sent": n})
        copy = {"copy": False} if "copy" in node.puller.__code__.co_varnames else {}  # as raw
        pull = node.puller(f"wbpipe-{os.getpid()}", **copy)
        _announce(out, {"url": f"tcp://127.0.0.1:{pull.port}", "name": pull.name})
        recv = pull.recv
        recv(30)
        return _done(_count(lambda: recv(IDLE_MS / 1000), n, Exception))
    finally:
        node.close()


#: Process CPU time (s, every thread) when this half began its work (``_mark``).
_CPU0: list[float] = []


def _mark() -> None:
    """Start this half's CPU clock (once): the messages, not the setup, are measured."""
    _CPU0[:] = _CPU0 or [time.process_time()]


def _done(result: dict[str, Any]) -> dict[str, Any]:
    """Print the result, keep the sockets open until the driver says the peer is done (closing
    drops what is queued), then print the process CPU time used since ``_mark``."""
    print(json.dumps(result), flush=True)
    sys.stdin.readline()
    print(json.dumps({"cpu_s": time.process_time() - (_CPU0[0] if _CPU0 else 0.0)}), flush=True)
    return result


def _raw_receive(sock: Any, case: str, n: int) -> dict[str, Any]:
    import msgpack
    import zmq

    recv, unpackb = sock.recv, msgpack.unpackb
    take = (lambda: recv(copy=False)) if case == "pp1m" else (lambda: unpackb(recv()))
    sock.setsockopt(zmq.RCVTIMEO, 30000)
    take()
    sock.setsockopt(zmq.RCVTIMEO, IDLE_MS)
    return _done(_count(take, n, zmq.Again))


def _count(recv: Any, n: int, stop: Any) -> dict[str, Any]:
    """Receive up to n-1 more (the first one started the clock); rate from first to last."""
    pc = time.perf_counter
    _mark()
    t0 = t_mark = pc()
    count = c_mark = 1
    try:
        while count < n:
            recv()
            count += 1
            if not count & MARK:
                t_mark, c_mark = pc(), count
        t_mark, c_mark = pc(), count
    except stop:
        pass
    return {"count": c_mark, "elapsed": max(t_mark - t0, 1e-9)}


def connect_half(
    case: str, impl: str, n: int, url: str, seconds: float, name: str
) -> dict[str, Any]:
    """The connect side: a client (rr), a sender (pp, pp1m, batch) or a subscriber (ps)."""
    import msgpack
    import zmq

    body = bytes(range(256)) * 4096
    if impl == "raw":
        ctx = zmq.Context()
        kind = {"rr": zmq.REQ, "ps": zmq.SUB}.get(case, zmq.PUSH)
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if case == "ps":
            sock.setsockopt(zmq.RCVHWM, PS_HWM)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(url)
        if case == "rr":
            send, recv, packb, unpackb = sock.send, sock.recv, msgpack.packb, msgpack.unpackb
            return _done(_latency(lambda i: unpackb((send(packb(message(i))), recv())[1]),
                                  n, seconds))
        if case == "ps":
            recv, unpackb = sock.recv, msgpack.unpackb
            sock.setsockopt(zmq.RCVTIMEO, 30000)
            unpackb(recv()[1:])
            sock.setsockopt(zmq.RCVTIMEO, IDLE_MS)
            return _done(_count(lambda: unpackb(recv()[1:]), n, zmq.Again))
        send, packb = sock.send, msgpack.packb
        _mark()
        if case == "pp1m":
            for _ in range(n):
                send(body, copy=False)
        else:
            for i in range(n):
                send(packb(message(i)))
        return _done({"sent": n})
    node = _node("c")
    try:
        if case == "rr":
            req = _connect(node.requester(name), url)
            request = req.request
            return _done(_latency(lambda i: request(message(i), 5), n, seconds))
        if case == "ps":
            sub = _connect(node.subscribe(name, ["m"]), url)
            recv = sub.recv
            recv(30)
            return _done(_count(lambda: recv(IDLE_MS / 1000), n, Exception))
        push = _connect(node.pusher(name), url)
        send = push.send
        _mark()
        if case == "pp1m":
            for _ in range(n):
                send(body, 30)
        elif case == "batch":
            many = push.send_many
            for start in range(0, n, 256):
                many([message(i) for i in range(start, min(n, start + 256))], 30)
        else:
            for i in range(n):
                send(message(i), 30)
        return _done({"sent": n})
    finally:
        node.close()


def _latency(call: Any, n: int, seconds: float) -> dict[str, Any]:
    pc, samples = time.perf_counter, []
    _mark()
    for i in range(200):
        call(i)
    end = time.monotonic() + seconds
    for i in range(n):
        t0 = pc()
        call(i)
        samples.append(pc() - t0)
        if not i & 63 and time.monotonic() > end:
            break
    return latency_figures(samples)


def _announce(out: Any, info: dict[str, Any]) -> None:
    out.write(json.dumps(info) + "\n")
    out.flush()


# --- the driver -------------------------------------------------------------------------------

SIZES = {"rr": 20000, "pp": 400_000, "ps": 400_000, "pp1m": 2000, "batch": 1_000_000}


def _child(args: list[str], build: str, cpu: int | None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=build)
    cmd = [sys.executable, HERE, *args]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, cwd="/tmp")


def run_pair(case: str, impl: str, build: str, pin: str, seconds: float) -> dict[str, Any]:
    n = SIZES[case]
    measure_cpu, peer_cpu = {"cross": (0, 1), "same": (0, 0)}.get(pin, (None, None))
    bind_measures = case not in ("rr", "ps")
    bind = _child(["half", "bind", case, impl, str(n)], build,
                  measure_cpu if bind_measures else peer_cpu)
    conn = None
    try:
        assert bind.stdout is not None and bind.stdin is not None
        info = json.loads(bind.stdout.readline())
        conn = _child(["half", "connect", case, impl, str(n), info["url"], str(seconds),
                       info.get("name", "")], build,
                      peer_cpu if bind_measures else measure_cpu)
        measurer, other = (bind, conn) if bind_measures else (conn, bind)
        assert measurer.stdout is not None
        result = json.loads(measurer.stdout.readline())  # bounded by the halves' own timeouts
        outs = [p.communicate("done\n", timeout=CHILD_TIMEOUT_S)[0] for p in (measurer, other)]
        lines = [line for line in outs[1].strip().splitlines() if '"cpu_s"' not in line]
        other_result = json.loads(lines[-1]) if lines else {}
    finally:
        for proc in (bind, conn):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    # CPU per message (us) of each side's process, every thread, from its first message on.
    per = max(1, result.get("samples", 0) + 200 if case == "rr" else result.get("count", 0))
    cpu = {"cpu_us": _last_cpu(outs[0]) / per * 1e6,
           "peer_cpu_us": _last_cpu(outs[1]) / (other_result.get("sent") or per) * 1e6}
    if "count" in result:
        rate = (result["count"] - 1) / result["elapsed"]
        sent = other_result.get("sent", 0)
        dropped = max(0, sent - result["count"])
        result = {"msgs_per_s": rate, "count": result["count"], "dropped": dropped,
                  "drop_pct": 100.0 * dropped / sent if sent else 0.0}
    result.update(cpu)
    if case == "pp1m":
        result["mb_per_s"] = result["msgs_per_s"] * (1 << 20) / 1e6
    return result


def _last_cpu(output: str) -> float:
    """The ``cpu_s`` a half printed last (NaN if none)."""
    lines = [line for line in output.splitlines() if '"cpu_s"' in line]
    return float(json.loads(lines[-1])["cpu_s"]) if lines else math.nan


@click.group(invoke_without_command=True)
@click.option("--builds", default=f"new={os.path.dirname(os.path.dirname(HERE))}",
              help="name=PYTHONPATH,... fabric builds to compare (raw runs once per run).")
@click.option("--cases", default="rr,pp,ps,pp1m,batch")
@click.option("--runs", default=3, show_default=True)
@click.option("--pin", type=click.Choice(["none", "cross", "same"]), default="none")
@click.option("--seconds", default=3.0, help="Latency cases stop after this long per run.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def main(ctx: click.Context, builds: str, cases: str, runs: int, pin: str, seconds: float,
         as_json: bool) -> None:
    if ctx.invoked_subcommand is not None:
        return
    named = dict(item.split("=", 1) for item in builds.split(","))
    impls = [("raw", "raw", next(iter(named.values())))]
    impls += [(name, "fabric", path) for name, path in named.items()]
    figures: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in range(runs):
        for case in cases.split(","):
            order = impls if run % 2 == 0 else impls[::-1]
            for name, impl, path in order:
                try:
                    fig = run_pair(case, impl, os.path.abspath(path), pin, seconds)
                except Exception as exc:
                    print(f"{case} {name} run {run + 1}: failed: {exc!r}", file=sys.stderr)
                    continue
                figures.setdefault((case, name), []).append(fig)
                print(f"{case} {name} run {run + 1}: {fig}", file=sys.stderr, flush=True)
    rows = []
    for (case, name), figs in figures.items():
        row = {"case": case, "impl": name, "pin": pin, **merge_runs(figs)}
        raw = figures.get((case, "raw"))
        if raw and name != "raw":
            key = "p50_us" if case == "rr" else "msgs_per_s"
            row["ratio"] = row[key] / statistics.median(f[key] for f in raw)
            if case == "rr":
                row["ratio_p99"] = row["p99_us"] / statistics.median(f["p99_us"] for f in raw)
        rows.append(row)
    for row in rows:
        print(json.dumps(row) if as_json else "  ".join(
            f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"load average {os.getloadavg()}", file=sys.stderr)


@main.command()
@click.argument("side")
@click.argument("case")
@click.argument("impl")
@click.argument("n", type=int)
@click.argument("url", required=False)
@click.argument("seconds", type=float, required=False)
@click.argument("name", required=False)
def half(side: str, case: str, impl: str, n: int, url: str | None, seconds: float | None,
         name: str | None) -> None:
    if side == "bind":
        bind_half(case, impl, n, sys.stdout)
    else:
        assert url is not None
        connect_half(case, impl, n, url, seconds or 3.0, name or "")


if __name__ == "__main__":
    main()
