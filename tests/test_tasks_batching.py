"""Batching in the task dispatcher (tasks/producer.py): tasks that follow others within a nap while
earlier ones are unsettled are taken by the batch after it (counted as ``task_naps``); a lone task,
and the next task of a caller that waits for each result, leave at once with no nap. Real sockets,
one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmqfabric as zf
from tests import test_tasks
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
        handles = [producer.submit(task, i) for i in range(3000)]
        assert producer.wait_tasks(SLOW * 4)
        assert [h.result(0) for h in handles] == [2 * i for i in range(3000)]
        if journal is not None:  # without one, the GIL's switch interval batches them anyway
            assert producer.counters.get("task_naps") > 0  # durable submits come a commit apart
        stats = producer.task_stats()["submit"][task]
        assert stats["done"] == 3001 and stats["in_flight"] == 0 and stats["queued"] == 0
        producer.close()
