"""Reliable tasks: tasks per second with empty handlers and 4 worker processes, with and without
the journal, against raw pyzmq push/pull measured in the same run on the same machine.

- ``raw one-way``: a PUSH socket deals msgpack bodies to 4 worker processes (PULL); the rate is
  what the workers receive, counted when the last one has its share.
- ``raw round trip``: the same, and each worker pushes a small acknowledgement to a sink in the
  producer's process (the classic ventilator / workers / sink); the rate is acknowledgements.
- ``tasks``: ``node.submit`` in a loop to 4 worker nodes (``@node.task`` with an empty handler);
  the rate is tasks whose result reached the producer (``wait_tasks``), without a journal, and
  with the durable journal (each ``submit`` returns once its task is written to the journal
  file: one thread in a loop pays a write(2) per task).
- ``tasks_journal_many``: the durable journal, ``submit_many`` in batches of ``--batch`` (one
  write per batch); ``tasks_journal_threads``: ``submit`` from ``--threads`` threads at once
  (they share writes). ``--fsync``: the journal cases with ``journal_fsync=True`` (an fdatasync
  per write).

All traffic is on loopback. Not a test: it prints figures, the ratios, and the CPU each task cost
the producer process and the workers (``*_producer_us``, ``*_workers_us``: steadier than rates on a
loaded machine). Targets (issue 15): >= 250,000 tasks/s without a journal, >= 100,000/s with the
durable journal.

    python3 perf/tasks.py [--tasks 100000] [--workers 4] [--prefetch 64] [--batch 1000]
                          [--threads 4] [--no-raw] [--cases none,loop,many,threads] [--fsync]
                          [--json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import zmq  # noqa: E402

import zmqfabric as zf  # noqa: E402

RAW_WORKER = """
import sys, msgpack, zmq
ctx = zmq.Context()
pull = ctx.socket(zmq.PULL)
pull.setsockopt(zmq.RCVHWM, 10000)
pull.connect(sys.argv[1])
ack = ctx.socket(zmq.PUSH)
ack.connect(sys.argv[2])
reply = sys.argv[3] == "1"
print("READY", flush=True)
count = 0
while True:
    frames = pull.recv_multipart()
    body = msgpack.unpackb(frames[1])
    if body is None:
        break
    count += 1
    if reply:
        ack.send_multipart([frames[0], msgpack.packb(None)])
ack.send_multipart([b"done", msgpack.packb(count)])
ack.close(2000)
pull.close(0)
ctx.term()
"""

TASK_WORKER = """
import sys, zmqfabric as zf
node = zf.Node(sys.argv[1])

@node.task(sys.argv[2], prefetch=int(sys.argv[3]))
def empty(body):
    return None

node.start()
print("READY", flush=True)
node.run()
node.close()
"""


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.startswith("READY"):
        child.kill()
        raise RuntimeError(f"child did not start: {line!r}")
    return child


def stop(children: list[subprocess.Popen[str]]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)


def raw(count: int, workers: int, reply: bool) -> float:
    """Messages per second through raw PUSH -> workers (-> sink)."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 10000)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    sink = ctx.socket(zmq.PULL)
    sink_port = sink.bind_to_random_port("tcp://127.0.0.1")
    children = [spawn(RAW_WORKER, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{sink_port}",
                      "1" if reply else "0") for _ in range(workers)]
    try:
        header = zf.core.wire.pack_header(zf.core.wire.Kind.MESSAGE, 0, 0.0)
        time.sleep(0.5)  # the workers printed READY after connect(); let the handshakes finish
        start = time.perf_counter()
        acks = done = total = 0
        if not reply:  # one way: blocking sends, then each worker reports its count
            for i in range(count):
                push.send_multipart([header, msgpack.packb({"i": i})])
        else:
            sent = 0
            sending, waiting = zmq.Poller(), zmq.Poller()
            for poller in (sending, waiting):
                poller.register(sink, zmq.POLLIN)
            sending.register(push, zmq.POLLOUT)
            while acks < count:
                while sent < count:
                    try:
                        push.send_multipart([header, msgpack.packb({"i": sent})], zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    sent += 1
                try:
                    while True:
                        sink.recv_multipart(zmq.NOBLOCK)
                        acks += 1
                except zmq.Again:
                    pass
                (sending if sent < count else waiting).poll(1000)
        for _ in range(workers):
            push.send_multipart([header, msgpack.packb(None)])
        while done < workers:
            frames = sink.recv_multipart()
            if frames[0] == b"done":
                done += 1
                total += msgpack.unpackb(frames[1])
        elapsed = time.perf_counter() - start
        assert total == count and (not reply or acks == count), (total, acks)
        return count / elapsed
    finally:
        stop(children)
        push.close(0)
        sink.close(0)
        ctx.term()


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tasks(count: int, workers: int, prefetch: int, journal: str | None, mode: str = "loop",
          batch: int = 1000, threads: int = 4, cpu: dict[str, float] | None = None,
          fsync: bool = False) -> float:
    """Tasks per second, submit to result, through ``workers`` worker nodes. ``mode``: "loop"
    (submit in one thread), "many" (submit_many batches), "threads" (submit from threads).
    ``cpu``, if given, receives the CPU microseconds per task of the producer process and of
    all the workers together (steadier than rates on a loaded machine)."""
    tag = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"
    name = f"bench-{tag}"
    children = [spawn(TASK_WORKER, f"bench-w{i}-{tag}", name, str(prefetch))
                for i in range(workers)]
    try:
        config = zf.TaskConfig(journal=journal, journal_fsync=fsync)
        with zf.Node(f"bench-p-{tag}", tasks=config) as node:
            node.directory.wait_for(
                lambda: len(node.directory.providers(zf.EndpointKind.TASK, name)) >= workers, 20)
            warm = node.submit_many(name, [{"i": i} for i in range(workers * prefetch * 2)])
            assert node.wait_tasks(30) and all(h.done() for h in warm)
            for _ in range(200):  # every worker granted credit (bounded: 20 s)
                stats = node.task_stats()["submit"][name]
                if stats["workers"] == workers:
                    break
                time.sleep(0.1)
            assert stats["workers"] == workers, stats
            start = time.perf_counter()
            cpu_start = time.process_time(), sum(_cpu_s(c.pid) for c in children)
            if mode == "many":
                for first in range(0, count, batch):
                    last = min(count, first + batch)
                    node.submit_many(name, [{"i": i} for i in range(first, last)])
            elif mode == "threads":
                share = -(-count // threads)

                def submit_share(first: int) -> None:
                    for i in range(first, min(count, first + share)):
                        node.submit(name, {"i": i})

                runners = [threading.Thread(target=submit_share, args=(t * share,))
                           for t in range(threads)]
                for runner in runners:
                    runner.start()
                for runner in runners:
                    runner.join()
            else:
                for i in range(count):
                    node.submit(name, {"i": i})
            assert node.wait_tasks(120), "tasks did not complete"
            rate = count / (time.perf_counter() - start)
            if cpu is not None:
                cpu["producer_us"] = (time.process_time() - cpu_start[0]) * 1e6 / count
                worker_s = sum(_cpu_s(c.pid) for c in children) - cpu_start[1]
                cpu["workers_us"] = worker_s * 1e6 / count
            return rate
    finally:
        stop(children)


@click.command()
@click.option("--tasks", "count", default=100_000, show_default=True)
@click.option("--workers", default=4, show_default=True)
@click.option("--prefetch", default=zf.TaskConfig().prefetch, show_default=True)
@click.option("--batch", default=1000, show_default=True, help="submit_many batch size")
@click.option("--threads", default=4, show_default=True, help="concurrent submitters")
@click.option("--no-raw", is_flag=True, help="skip the raw pyzmq baselines")
@click.option("--cases", default="none,loop,many,threads", show_default=True,
              help="task cases: none (no journal), loop, many, threads (durable journal)")
@click.option("--fsync", is_flag=True, help="journal cases with journal_fsync=True")
@click.option("--json", "as_json", is_flag=True)
def main(count: int, workers: int, prefetch: int, batch: int, threads: int, no_raw: bool,
         cases: str, fsync: bool, as_json: bool) -> None:
    chosen = set(cases.split(","))
    results: dict[str, Any] = {"tasks": count, "workers": workers, "prefetch": prefetch,
                               "fsync": fsync}
    if not no_raw:
        results["raw_one_way"] = raw(count, workers, reply=False)
        results["raw_round_trip"] = raw(count, workers, reply=True)
    cpu: dict[str, float] = {}
    if "none" in chosen:
        results["tasks_no_journal"] = tasks(count, workers, prefetch, None, cpu=cpu)
        results.update({f"tasks_no_journal_{k}": v for k, v in cpu.items()})
    for key, mode in (("tasks_journal", "loop"), ("tasks_journal_many", "many"),
                      ("tasks_journal_threads", "threads")):
        if mode not in chosen:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            results[key] = tasks(count, workers, prefetch, str(Path(tmp) / "bench.db"), mode,
                                 batch, threads, cpu, fsync)
            results.update({f"{key}_{k}": v for k, v in cpu.items()})
    if not no_raw and "tasks_no_journal" in results:
        results["ratio_vs_one_way"] = results["tasks_no_journal"] / results["raw_one_way"]
        results["ratio_vs_round_trip"] = results["tasks_no_journal"] / results["raw_round_trip"]
    if as_json:
        click.echo(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                               for k, v in results.items()}))
        return
    click.echo(f"{count} tasks, {workers} workers, prefetch {prefetch}, empty handlers")
    for key in ("raw_one_way", "raw_round_trip", "tasks_no_journal", "tasks_journal",
                "tasks_journal_many", "tasks_journal_threads"):
        if key in results:
            line = f"  {key:<22} {results[key]:>10,.0f} /s"
            if f"{key}_producer_us" in results:
                line += (f"   CPU per task: producer {results[key + '_producer_us']:.1f} us, "
                         f"workers {results[key + '_workers_us']:.1f} us")
            click.echo(line)
    if "ratio_vs_one_way" in results:
        click.echo(f"  tasks / raw one-way     {results['ratio_vs_one_way']:.2f}   "
                   "(target >= 0.30)")
        click.echo(f"  tasks / raw round trip  {results['ratio_vs_round_trip']:.2f}   "
                   "(target >= 0.30)")
    click.echo("  targets (issue 15): >= 250,000 /s without a journal, >= 100,000 /s with the "
               "durable journal")


if __name__ == "__main__":
    main()
