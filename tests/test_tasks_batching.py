"""Batching in the task dispatcher (tasks/producer.py): tasks that follow others within a nap while
earlier ones are unsettled are taken by the batch after it (counted as ``task_naps``; the rounds
that take tasks, as ``task_takes``); a lone task, and the next task of a caller that waits for each
result, leave at once with no nap. Real sockets, one process."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import zmqfabric as zf
from tests import test_tasks
from tests.helpers import unique, wait_until
from tests.test_tasks import SLOW, wait_workers

worker_node = test_tasks.worker_node  # the fixture: an in-process worker node, serving


def double(body: Any) -> Any:
    return body * 2 if isinstance(body, int) else None  # wait_workers' warm-up task: a map


def test_a_caller_that_waits_for_each_result_never_waits_for_a_nap(
        worker_node, make_node, name) -> None:
    task = name("seq")
    worker_node(task, double)
    producer = make_node("producer")
    wait_workers(producer, task, 1)
    for i in range(100):  # each submitted well within the nap of the one before
        assert producer.submit(task, i).result(SLOW) == 2 * i
    assert producer.counters.get("task_naps") == 0


def test_a_burst_is_taken_by_the_batch_and_every_task_completes(
        worker_node, make_node, name, tmp_path: Path) -> None:
    task = name("burst")
    worker_node(task, double, prefetch=16)
    for journal in (None, str(tmp_path / "j.db")):
        producer = make_node("producer", tasks=zf.TaskConfig(journal=journal))
        wait_workers(producer, task, 1)
        takes = producer.counters.get("task_takes")
        handles = [producer.submit(task, i) for i in range(3000)]
        assert producer.wait_tasks(SLOW * 4)
        assert [h.result(0) for h in handles] == [2 * i for i in range(3000)]
        # Taken by the batch, not a dispatcher round per task (3000): by the GIL's switch interval
        # (the submitter runs ~5 ms between the dispatcher's turns), by naps while earlier tasks
        # are unsettled, or all at once when the submitter outran the dispatcher. 1-23 rounds
        # seen, loaded or not, naps or none; whether naps pay is perf/tasks.py's to measure.
        assert producer.counters.get("task_takes") - takes < 300
        stats = producer.task_stats()["submit"][task]
        assert stats["done"] == 3001 and stats["in_flight"] == 0 and stats["queued"] == 0
        producer.close()


def test_a_hung_task_in_a_batch_is_named_in_the_log(make_node, name, caplog) -> None:
    """The inline worker serves a task message whole (TaskEndpoint.serve_batch): a handler that
    hangs there is still reported with its task, as a slot of the general path is."""
    caplog.set_level(logging.INFO, logger="zmqfabric.patterns.handlers")
    task = name("hangs")
    node = zf.Node(unique("worker"), tasks=zf.TaskConfig(deadline_s=0.3))
    release = threading.Event()
    node.task(task)(lambda body: release.wait(SLOW) if body == "hang" else body)
    node.start()
    node.serve_in_background()
    try:
        producer = make_node("producer")
        wait_workers(producer, task, 1)
        handles = producer.submit_many(task, [1, "hang", 3])  # one message: a batch
        wait_until(lambda: any("its slot is hung" in r.getMessage()
                               and f"on task {handles[1].id} (attempt 1)" in r.getMessage()
                               for r in caplog.records), SLOW, "the hung task named")
        release.set()
        assert handles[0].result(SLOW) == 1 and handles[2].result(SLOW) == 3
    finally:
        release.set()
        node.close()
