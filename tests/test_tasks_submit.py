"""Submitting reliable tasks, in one process with real sockets: ``submit_many`` (sync and
asyncio), the size check at the sender, task messages split to fit what workers accept,
idempotency keys (also across a producer restart with its journal), durable submit, and the
dead-letter file's privacy."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

import zmqfabric as zf
from tests import test_tasks
from tests.helpers import unique, wait_until
from tests.test_tasks import SLOW, table_stats, wait_workers
from zmqfabric.tasks import journal_log
from zmqfabric.tasks.handle import HandleState, TaskHandle, settle
from zmqfabric.tasks.journal_log import FILE_HEADER
from zmqfabric.tasks.keys import KeyIndex

MB = 1024 * 1024
worker_node = test_tasks.worker_node  # the fixture: an in-process worker node, serving


def echo(body: Any) -> dict[str, Any]:
    info = zf.current_task()
    return {"body": body if not isinstance(body, bytes) else len(body), "id": info.id}


def test_submit_many_returns_handles_in_order(worker_node, make_node, name) -> None:
    task = name("many")
    worker_node(task, echo, prefetch=8)
    producer = make_node("producer")
    wait_workers(producer, task, 1)
    handles = producer.submit_many(task, ({"i": i} for i in range(50)), deadline=5.0)
    assert [h.result(SLOW)["body"] for h in handles] == [{"i": i} for i in range(50)]
    assert [h.result(0)["id"] for h in handles] == [h.id for h in handles]
    assert producer.submit_many(task, []) == []
    with pytest.raises(zf.LocalProtocolError):
        producer.submit_many(task, [1, 2], keys=["a"])  # one key per body


def test_asyncio_submit_many_with_a_journal(worker_node, aio_make_node, name,
                                             tmp_path: Path) -> None:
    task = name("aiomany")
    worker_node(task, echo)

    async def main() -> list[Any]:
        node = aio_make_node("aio", tasks=zf.TaskConfig(journal=str(tmp_path / "j.db")))
        async with node:
            handles = await node.submit_many(task, [1, 2, 3], keys=["a", None, "c"])
            again = await node.submit(task, 99, key="a")  # the key is taken: same task
            assert again is handles[0]
            return [await h for h in handles]

    results = asyncio.run(asyncio.wait_for(main(), SLOW * 2))
    assert [r["body"] for r in results] == [1, 2, 3]


# --- size --------------------------------------------------------------------------------------


def test_a_70_mb_task_raises_at_submit_and_nothing_is_queued(make_node, name) -> None:
    task = name("huge")
    producer = make_node("producer")
    huge = b"x" * (70 * MB)
    start = time.monotonic()
    with pytest.raises(zf.MessageTooLargeError) as info:
        producer.submit(task, huge)
    assert time.monotonic() - start < 2.0
    limit = producer.config.max_message_size  # what workers accept (1 MiB by default)
    assert info.value.limit == limit and info.value.size > 70 * MB
    with pytest.raises(zf.MessageTooLargeError):
        producer.submit_many(task, [1, huge, 3])  # checked before any is queued
    with pytest.raises(zf.MessageTooLargeError) as info:  # the first that does not fit
        producer.submit_many(task, [1, b"x" * limit, huge])
    assert info.value.size < 70 * MB
    with pytest.raises(zf.LocalProtocolError):  # a body msgpack cannot encode
        producer.submit_many(task, [1, object(), 3])
    assert producer.wait_tasks(0)  # nothing unsettled
    assert table_stats(producer, task).get("queued", 0) == 0


def test_task_messages_are_split_to_fit_what_workers_accept(worker_node, make_node, name) -> None:
    """Twelve tasks of 300 kB with credit for all of them: one message would be 3.6 MB, and a
    worker that accepts 1 MB frames would drop the connection on it, for ever."""
    task = name("split")
    config = zf.NodeConfig(max_message_size=1 * MB)
    node = zf.Node(unique("worker"), config=config)
    node.task(task, prefetch=16)(echo)
    node.start()
    node.serve_in_background()
    try:
        producer = make_node("producer", config=config)
        wait_workers(producer, task, 1)
        handles = producer.submit_many(task, [bytes(300_000)] * 12)
        assert [h.result(SLOW)["body"] for h in handles] == [300_000] * 12
        with pytest.raises(zf.MessageTooLargeError) as info:
            producer.submit(task, bytes(MB))
        assert info.value.limit == MB
        stats = table_stats(producer, task)
        assert stats["redelivered"] == 0 and stats["dead"] == 0, stats
    finally:
        node.close()


# --- idempotency keys --------------------------------------------------------------------------


def test_a_key_in_use_returns_the_existing_handle(worker_node, make_node, name) -> None:
    task, other = name("keyed"), name("other")
    ran: list[Any] = []
    worker_node(task, lambda body: ran.append(body) or body)
    worker_node(other, lambda body: body)
    producer = make_node("producer", tasks=zf.TaskConfig(dedupe_window_s=1.5))
    wait_workers(producer, task, 1)
    first = producer.submit(task, "first", key="order-1")
    assert producer.submit(task, "second", key="order-1") is first  # pending
    assert first.result(SLOW) == "first"
    assert producer.submit(task, "third", key="order-1") is first  # settled, within the window
    assert producer.submit(other, "x", key="order-1") is not first  # keys are per task name
    many = producer.submit_many(task, ["a", "b", "c"], keys=["order-1", "order-2", "order-2"])
    assert many[0] is first and many[1] is many[2] and many[1].result(SLOW) == "b"
    wait_until(lambda: time.monotonic() - first.settled_at >= 1.5, SLOW, "the window to pass")
    fresh = producer.submit(task, "fourth", key="order-1")
    assert fresh is not first and fresh.result(SLOW) == "fourth"
    assert ran.count("first") == 1 and "second" not in ran and "third" not in ran


def test_a_failed_submit_frees_its_key(make_node, name) -> None:
    task = name("full")
    producer = make_node("producer", tasks=zf.TaskConfig(queue_limit=1))
    producer.submit(task, 0)
    with pytest.raises(zf.FabricTimeoutError):
        producer.submit(task, 1, key="k", timeout=0.05)
    with pytest.raises(zf.FabricTimeoutError):  # a new attempt, not the failed handle
        producer.submit(task, 1, key="k", timeout=0.05)


def test_a_pending_key_survives_a_producer_restart_with_its_journal(
    worker_node, name, tmp_path: Path
) -> None:
    task = name("restart")
    config = zf.TaskConfig(journal=str(tmp_path / "j.db"))
    with zf.Node(unique("producer"), tasks=config) as first:
        handle = first.submit(task, "once", key="invoice-7")  # nobody serves it yet
        assert handle.wait_recorded(0)  # submit returned: it is on disk
    with zf.Node(unique("producer"), tasks=config) as second:
        again = second.submit(task, "twice", key="invoice-7")
        assert again.id == handle.id  # the resent task, not a new one
        worker_node(task, lambda body: body)
        assert again.result(SLOW) == "once"
        assert second.task_stats()["submit"][task]["done"] == 1


# --- files ---------------------------------------------------------------------------------------


def _dead_letter_once(worker_node, name, path: Path) -> tuple[zf.Node, zf.TaskHandle]:
    task = name("deadfile")
    worker_node(task, lambda body: 1 / 0)
    producer = zf.Node(unique("producer"), tasks=zf.TaskConfig(
        dead_letter_file=str(path), max_attempts=1))
    producer.start()
    wait_until(lambda: producer.directory.providers(zf.EndpointKind.TASK, task), SLOW, "worker")
    handle = producer.submit(task, {"secret": "payload"})
    with pytest.raises(zf.TaskFailedError):
        handle.result(SLOW)
    return producer, handle


def test_the_dead_letter_file_is_0600_whatever_the_umask(worker_node, name,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    old = os.umask(0)
    try:
        producer, handle = _dead_letter_once(worker_node, name, path)
        producer.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [letter] = [json.loads(line) for line in path.read_text().splitlines()]
    assert letter["id"] == handle.id and letter["body"] == {"secret": "payload"}
    assert letter["attempts"] == 1 and letter["deliveries"] == 1


def test_the_dead_letter_file_is_never_written_through_a_link(worker_node, name,
                                                               tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "dead.jsonl"
    path.symlink_to(victim)
    producer, _ = _dead_letter_once(worker_node, name, path)
    try:
        assert producer.counters.get("dead_letters_unwritten") == 1
    finally:
        producer.close()
    assert victim.read_text() == "precious\n" and path.is_symlink()


def test_a_producer_resumes_past_malformed_journal_rows(worker_node, name,
                                                       tmp_path: Path) -> None:
    """A row the journal cannot vouch for is quarantined; it neither stops the dispatcher nor
    spoils the batch it would have been sent in."""
    task = name("resume")
    config = zf.TaskConfig(journal=str(tmp_path / "j.db"))
    with zf.Node(unique("producer"), tasks=config) as first:
        handles = first.submit_many(task, [{"i": i} for i in range(5)])
    spoil = {handles[1].id: (3, b"\xc1"), handles[3].id: (5, "soon")}  # payload, deadline
    path = tmp_path / "j.db"
    data = path.read_bytes()
    records = [data[:len(FILE_HEADER)]]
    for _, _, body in journal_log.scan(data, len(FILE_HEADER)):
        assert body is not None
        item = msgpack.unpackb(body)
        if item[0] == journal_log.ADD and item[1] in spoil:
            field, value = spoil[item[1]]
            item[field + 1] = value
        records.append(journal_log.frame(msgpack.packb(item)))
    path.write_bytes(b"".join(records))
    ran: list[Any] = []
    worker_node(task, lambda body: ran.append(body["i"]))
    with zf.Node(unique("producer"), tasks=config) as second:
        assert second.counters.get("journal_rows_quarantined") == 2
        assert second.wait_tasks(SLOW)
        assert second.task_stats()["submit"][task]["done"] == 3
    assert sorted(ran) == [0, 2, 4]


class _Owner:
    """The registry's side of handles (HandleOwner), for tests that settle handles directly."""

    def __init__(self) -> None:
        self.config = zf.TaskConfig()
        self.handle_lock = threading.Lock()

    def settled(self, count: int) -> None:
        pass


def test_settled_keys_kept_are_bounded() -> None:
    """Past ``limit`` settled keys the oldest are forgotten, even within the window; keys of
    unsettled tasks never are."""

    owner = _Owner()
    index = KeyIndex(window=3600.0, limit=10)
    pending = TaskHandle("p", "job", "pending", owner)
    assert index.claim(pending) is pending
    for i in range(30):
        handle = TaskHandle(str(i), "job", f"k{i}", owner)
        assert index.claim(handle) is handle
        settle(owner, [(handle, HandleState.DONE, i)])
    assert len(index) <= 11
    assert index.claim(TaskHandle("again", "job", "pending", owner)) is pending
    latest = TaskHandle("x", "job", "k29", owner)
    assert index.claim(latest) is not latest  # the newest settled key is still kept


def test_a_journaled_task_over_a_lowered_size_limit_is_dead_lettered_at_resume(
        worker_node, name, tmp_path: Path) -> None:
    """A task journaled under a 1 MiB limit, resumed by a node whose max_message_size is now
    64 KiB: no worker could accept it, so it is dead-lettered at once with the reason (before:
    sent, refused by the worker, and dead-lettered as WorkerLost after a try), and the ones that
    fit run."""
    task = name("shrunk")
    journal, dead = tmp_path / "tasks.db", tmp_path / "dead.jsonl"
    config = zf.TaskConfig(journal=str(journal), dead_letter_file=str(dead))
    with zf.Node(unique("producer"), tasks=config) as first:
        big = first.submit(task, "x" * 200_000)
        small = first.submit(task, "fits")
    ran: list[Any] = []
    worker_node(task, lambda body: ran.append(body) or len(body))
    limit = zf.NodeConfig(max_message_size=64 * 1024)
    with zf.Node(unique("producer"), config=limit, tasks=config) as second:
        wait_until(lambda: second.task_stats()["submit"][task]["done"] == 1, SLOW,
                   "the small task")
        [letter] = [json.loads(line) for line in dead.read_text().splitlines()]
        assert letter["id"] == big.id and letter["error"]["type"] == "MessageTooLargeError"
        assert "max_message_size" in letter["error"]["message"]
        assert second.task_stats()["submit"][task]["dead"] == 1
    assert ran == ["fits"] and small.id != big.id


def test_a_handle_is_its_task_with_every_task_field_set() -> None:
    """A handle is the dispatcher's Task (one object per task) and sets Task's fields itself:
    a field added to Task but not to the handle's ``__init__`` fails here. A handle settled
    while a waiter waits, and one settled in place (no waiter), both give the table's value."""
    from zmqfabric.core.tasktable import Task, TaskState
    from zmqfabric.tasks.handle import settle_done

    owner = _Owner()
    handle = TaskHandle("t-1", "job", None, owner, b"\xc0", 7.0, 2)
    assert isinstance(handle, Task)
    plain = Task("t-1", b"\xc0", None, deadline_s=7.0, max_attempts=2)
    assert {f: getattr(handle, f) for f in Task.FIELDS} == {f: getattr(plain, f)
                                                            for f in Task.FIELDS}
    assert handle.state is TaskState.PENDING and not handle.done()
    waited = TaskHandle("t-2", "job", None, owner)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(waited.result(SLOW)))
    waiter.start()
    wait_until(lambda: waited.waiters, SLOW)
    handle.value, waited.value = "a", "b"
    settle_done(owner, [handle, plain, waited])  # a plain Task (resumed, no key): no handle
    waiter.join(SLOW)
    assert handle.result(0) == "a" and got == ["b"] and waited.waiters is None


def test_submit_before_start_and_after_close_raises_closed(name) -> None:
    """Node.submit leaves the started check to the registry (one call per task): it still
    raises ClosedError before start and after close, and queues nothing."""
    node = zf.Node(unique("producer"))
    with pytest.raises(zf.ClosedError, match="use it inside"):
        node.submit(name, 1)
    node.start()
    node.close()
    for call in (lambda: node.submit(name, 1), lambda: node.submit(name, 1, key="k"),
                 lambda: node.submit_many(name, [1])):
        with pytest.raises(zf.ClosedError):
            call()
    assert node.task_stats()["submit"] == {}
