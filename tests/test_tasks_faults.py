"""Reliable tasks under the faults of the issue "work survives hanging handlers, crashes and long
partitions", with real processes:

- a journaled producer killed with SIGKILL in the middle of a burst of submissions loses none
  of the tasks whose ``submit`` had returned;
- a handler that hangs for ever holds one slot of each worker it reaches, is dead-lettered after
  its attempts (deadline x attempts), and every other task still runs;
- a task that kills its worker is dead-lettered after its attempts, and no other task is: a task
  that never ran is never charged an attempt.

Workers log each run as in :mod:`tests.test_tasks` (``id attempt i``, written with os.write, so
the runs of a killed worker are counted too).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

import zmqfabric as zf
from tests.helpers import unique, wait_until
from tests.procs import ProcessGroup
from tests.test_tasks import (
    RESUMER,
    SLOW,
    child_code,
    runs,
    start_workers,
    table_stats,
    wait_workers,
)
from zmqfabric.tasks.journal import Journal

pytestmark = pytest.mark.slow

# --- SIGKILL during a burst of durable submissions ---------------------------------------------

#: Submits in a loop (one thread with submit, one with submit_many) to a task nobody serves yet,
#: and writes the ids of each call to stdout once the call returned (one os.write per line, so
#: lines from the two threads never interleave).
BURST = """
config = zf.TaskConfig(journal=JOURNAL)
with zf.Node(NAME, tasks=config) as node:
    print("READY", flush=True)

    def say(ids):
        os.write(1, (json.dumps(ids) + "\\n").encode())

    def batches():
        for b in range(100_000):
            say([h.id for h in node.submit_many(TASK, [{"i": f"m{b}-{j}"} for j in range(20)])])

    threading.Thread(target=batches, daemon=True).start()
    for i in range(1_000_000):
        say([node.submit(TASK, {"i": i}).id])
"""


def test_sigkill_of_a_journaled_producer_mid_burst_loses_no_task_whose_submit_returned(
    procs: ProcessGroup, name, tmp_path: Path
) -> None:
    task = name("burst")
    journal = str(tmp_path / "producer.db")
    burst = procs.python(child_code(BURST, NAME=unique("burst"), TASK=task, JOURNAL=journal),
                         timeout=SLOW)
    returned: list[str] = []
    while len(returned) < 3000:
        returned += json.loads(burst.readline(SLOW))
    burst.kill()
    assert burst.wait(SLOW) == -signal.SIGKILL  # killed mid-burst, not finished
    while True:  # the lines it wrote before the kill (each written whole, after its submit)
        try:
            returned += json.loads(burst.readline(SLOW))
        except EOFError:
            break
    assert len(set(returned)) == len(returned)

    workers = start_workers(procs, tmp_path, task, 2, prefetch=32)
    resumer = procs.python(child_code(RESUMER, NAME=unique("resumer"), JOURNAL=journal),
                           timeout=SLOW)
    report = resumer.json_line(120)
    assert report["event"] == "settled" and report["ok"], report
    assert resumer.wait(SLOW) == 0, resumer.err_tail()
    stats = report["stats"][task]
    assert stats["dead"] == 0 and stats["done"] >= len(returned), stats
    lost = set(returned) - set(runs(tmp_path, task))
    assert not lost, f"{len(lost)} of {len(returned)} tasks whose submit returned never ran"
    with Journal(journal) as leftover:
        assert leftover.open() == []
    for child in workers:
        child.stop()


# --- a handler that hangs for ever ---------------------------------------------------------------

#: A worker with SLOTS slots, written against the wire spec: a node (for discovery and liveness)
#: whose task endpoint is served by this loop, not by the node's serve loop. It grants CREDIT
#: with ``{"credit": CREDIT, "slots": SLOTS}``, runs tasks in SLOTS threads in the order
#: received, and answers each as it finishes. A body with "hang" never returns.
SLOT_WORKER = """
import queue
import msgpack, zmq
from zmqfabric.core import task_frames, wire

node = zf.Node(NAME)

@node.task(TASK, prefetch=CREDIT)
def unused(body):
    raise AssertionError("tasks are run by the slots below")

node.start()
[endpoint] = node._tasks.endpoints()  # this thread owns its ROUTER from here on
sock = endpoint.socket
log = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
jobs, finished = queue.Queue(), queue.Queue()

def slot():
    while True:
        route, (task_id, attempt, body, key) = jobs.get()
        os.write(log, f"{task_id} {attempt} {body.get('i')}\\n".encode())
        if body.get("hang"):
            threading.Event().wait(3600)  # hung: nothing sets it; the test ends the process
        time.sleep(body.get("sleep", 0))
        finished.put((route, [task_id, attempt, True, {"pid": os.getpid(), "i": body.get("i")}]))

for _ in range(SLOTS):
    threading.Thread(target=slot, daemon=True).start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())

def send(route, kind, body):
    sock.send_multipart(route + [wire.pack_header(kind, 0, time.time()), body])

print("READY", flush=True)
while not stop.is_set():
    if sock.poll(5):
        frames = sock.recv_multipart()
        kind, items = task_frames.parse_to_worker(frames[2:])
        if kind is wire.Kind.CREDIT:
            send(frames[:2], kind, msgpack.packb({"credit": CREDIT, "slots": SLOTS}))
        else:
            for item in items:
                jobs.put((frames[:2], item))
    while not finished.empty():
        route, result = finished.get()
        send(route, wire.Kind.RESULT, task_frames.pack_results([result]))
node.close()
os._exit(0)
"""


def test_a_hanging_handler_is_dead_lettered_and_every_other_task_runs(
    procs: ProcessGroup, make_node, name, tmp_path: Path
) -> None:
    task = name("hang")
    workers = [
        procs.python(child_code(SLOT_WORKER, NAME=unique("slots"), TASK=task, SLOTS=2, CREDIT=8,
                                LOG=str(tmp_path / f"runs-{task}-{i}.log")), timeout=SLOW)
        for i in range(2)
    ]
    deadline, attempts = 1.0, 2
    producer = make_node("producer", tasks=zf.TaskConfig(
        deadline_s=deadline, max_attempts=attempts, dead_letter_file=str(tmp_path / "dead")))
    wait_workers(producer, task, 2)

    start = time.monotonic()
    hung = producer.submit(task, {"i": "hang", "hang": True})
    ordinary = producer.submit_many(task, [{"i": i, "sleep": 0.01} for i in range(40)])
    with pytest.raises(zf.TaskFailedError) as info:
        hung.result(deadline * attempts + SLOW)
    elapsed = time.monotonic() - start
    results = [h.result(SLOW) for h in ordinary]
    assert [r["i"] for r in results] == list(range(40))

    failure = info.value
    assert failure.error_type == "DeadlineExceeded" and failure.attempts == attempts
    assert failure.error == f"ran longer than {deadline:g} s on 2 workers"
    assert elapsed < deadline * attempts + 5.0, f"dead-lettered after {elapsed:.1f} s"
    stats = table_stats(producer, task)
    assert stats["hung"] == 2 and stats["dead"] == 1 and stats["workers"] == 2, stats
    # Each worker has one slot hung for ever and one that still works.
    more = producer.submit_many(task, [{"i": 100 + i, "sleep": 0.05} for i in range(12)])
    pids = {h.result(SLOW)["pid"] for h in more}
    assert pids == {child.proc.pid for child in workers}
    assert runs(tmp_path, task)[hung.id] == 2  # it ran on each worker once, never again
    for child in workers:
        child.stop()


# --- a task that kills its worker ----------------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 3])
def test_a_task_that_kills_its_worker_is_dead_lettered_and_no_task_that_never_ran_is(
    procs: ProcessGroup, make_node, name, tmp_path: Path, attempts: int
) -> None:
    """Every kill takes the tasks queued at that worker with it; they never ran, so they go to
    other workers free. The killer runs alone after the first kill and is charged each time.
    With one attempt, a task that ran just before the killer and whose result died with the
    worker may be dead-lettered too (it did run); with three, only the killer is."""
    task = name("poison")
    workers = start_workers(procs, tmp_path, task, attempts + 2, prefetch=8)
    dead_file = tmp_path / "dead.jsonl"
    producer = make_node("producer", tasks=zf.TaskConfig(
        max_attempts=attempts, dead_letter_file=str(dead_file)))
    wait_workers(producer, task, len(workers))

    bodies: list[dict[str, object]] = [{"i": i, "sleep": 0.002} for i in range(60)]
    bodies[20] = {"i": 20, "poison": True}
    handles = producer.submit_many(task, bodies)
    poison = handles[20]
    with pytest.raises(zf.TaskFailedError) as info:
        poison.result(60)
    assert info.value.error_type == "WorkerLost" and info.value.attempts == attempts
    failed = {poison.id}
    for i, handle in enumerate(handles):
        if i != 20:
            error = handle.exception(SLOW)
            if error is None:
                assert handle.result(0)["i"] == i
            else:
                assert attempts == 1 and isinstance(error, zf.TaskFailedError), error
                failed.add(handle.id)

    ran = runs(tmp_path, task)
    letters = [json.loads(line) for line in dead_file.read_text().splitlines()]
    assert {x["id"] for x in letters} == failed and len(letters) == len(failed)
    assert all(x["attempts"] == attempts for x in letters)
    never_ran = {x["id"] for x in letters} - set(ran)
    assert not never_ran, f"dead-lettered without ever running: {never_ran}"
    if attempts > 1:
        assert failed == {poison.id}
    assert attempts <= ran[poison.id] <= attempts + 1  # the first run may have gone uncharged
    # A killed process's sockets close before it can be reaped: wait for its exit status.
    wait_until(lambda: sum(child.proc.poll() == -signal.SIGKILL for child in workers)
               == ran[poison.id], SLOW, "one killed worker per run of the poison task")
    killed = ran[poison.id]
    stats = table_stats(producer, task)
    assert stats["dead"] == len(failed), stats
    assert stats["done"] == len(handles) + 1 - len(failed), stats  # + the warm-up task
    wait_until(lambda: table_stats(producer, task)["workers"] == len(workers) - killed, SLOW,
               "the killed workers to be forgotten")
    for child in workers:
        child.stop()
