"""Results as the producer takes them: each result of a message is judged on its own (docs/
PROTOCOL.md, section 7.4, "Refusals"). A malformed one is dropped and counted; the well-formed
ones beside it count. The pure table first, then a real producer against a worker written
against the wire (real sockets), which answers with a message that mixes both."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest

import zmqfabric as zf
from tests.helpers import unique, wait_until
from tests.test_tasks import SLOW, table_stats
from zmqfabric.core import task_frames, wire
from zmqfabric.core.tasktable import Task, TaskState, TaskTable
from zmqfabric.errors import RemoteProtocolError

#: Results no producer can take, each malformed in another way (a good id and attempt: they
#: would answer the delivery if they were well-formed).
MALFORMED = [
    ["t1", 1, 1, None],  # ok is not a boolean
    ["t1", 1, None, None],
    ["t1", 1, False, "boom"],  # a failure's value must be {"type", "message"}
    ["t1", 1, False, {"type": "E"}],
    ["t1", 1, False, {"type": 1, "message": "m"}],
    ["t1", 1, True],  # three items
    ["t1", 1, True, None, None],  # five
    [["t1"], 1, True, None],  # an unhashable id
    ["t1", [1], True, None],  # an unhashable attempt
    5,  # not an array
    None,
]


def _table_with(ids: list[str]) -> TaskTable:
    table = TaskTable("t")
    table.set_credit("w", 64, 0.0, 4)
    table.submit_many([Task(i, b"\xc0") for i in ids])
    assert [(w, [t.id for t in ts]) for w, ts in table.assign(0.0)] == [("w", ids)]
    return table


@pytest.mark.parametrize("bad", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_result_is_refused_and_the_others_of_its_message_count(bad: Any) -> None:
    table = _table_with(["t1", "t2", "t3"])
    outcome = table.on_results("w", [["t2", 1, True, "two"], bad, ["t3", 1, True, None]], 1.0)
    assert [(t.id, t.value) for t in outcome.done] == [("t2", "two"), ("t3", None)]
    assert table.refused == 1 and table.late == 0
    t1 = table.get("t1")
    assert t1 is not None and t1.state is TaskState.IN_FLIGHT  # held: its result may come
    assert table.held("w") == [("t1", 1)]
    assert table.stats().refused == 1 and table.stats().done == 2
    outcome = table.on_results("w", [["t1", 1, False, {"type": "E", "message": "m"}]], 2.0)
    assert t1.state is TaskState.DELAYED and t1.error == ("E", "m")


def test_results_that_answer_no_delivery_are_late_whatever_their_id() -> None:
    table = _table_with(["t1"])
    stray = [[5, 1, True, None], ["t1", 2, True, None], ["t1", "1", True, None],
             [b"t1", 1, True, None], ["x" * 500, 1, True, None], ["t9", 1, True, None]]
    assert not table.on_results("w", stray, 1.0)
    assert table.late == len(stray) and table.refused == 0
    assert table.held("w") == [("t1", 1)]
    assert [t.id for t in table.on_results("w", [["t1", 1, True, 7]], 1.0).done] == ["t1"]


def test_the_producer_s_reader_checks_the_message_not_each_result() -> None:
    header = wire.pack_header(wire.Kind.RESULT, 0, 0.0)
    items = [["t1", 1, 1, None], ["t2", 1, True, None]]
    kind, body = task_frames.read_from_worker([b"", header, msgpack.packb(items)])
    assert kind is wire.Kind.RESULT and body == items  # the table judges each one
    with pytest.raises(RemoteProtocolError):  # the checking decoder refuses the message
        task_frames.parse_from_worker([b"", header, msgpack.packb(items)])
    for bad in ([], {"t1": 1}, "t1", [["t", 1, True, None]] * 65536):
        with pytest.raises(RemoteProtocolError):
            task_frames.read_from_worker([b"", header, msgpack.packb(bad)])


def _serve_once(sock: Any, answer: Any, deadline: float) -> None:
    """Be a worker on ``sock`` (a task endpoint's ROUTER) until one task message is answered
    with ``answer(items)``: grant credit, read the tasks, send one result message."""
    while time.monotonic() < deadline:
        if not sock.poll(50):
            continue
        frames = sock.recv_multipart()
        kind, items = task_frames.parse_to_worker(frames[2:])
        route = frames[:2]
        if kind is wire.Kind.CREDIT:
            body = task_frames.pack_credit(8, 2)
        else:
            kind, body = wire.Kind.RESULT, msgpack.packb(answer(items))
        sock.send_multipart(route + [wire.pack_header(kind, 0, time.time()), body])
        if kind is wire.Kind.RESULT:
            return
    raise AssertionError("no task came")


def test_a_producer_settles_the_good_results_of_a_message_with_malformed_ones(
        make_node: Any) -> None:
    task = unique("mixed")
    worker = zf.Node(unique("wire-worker"))
    worker.task(task, prefetch=8)(lambda body: None)  # not served: this test answers instead
    worker.start()
    try:
        [endpoint] = worker._tasks.endpoints()
        producer = make_node("producer")
        assert producer.directory.wait_for(
            lambda: producer.directory.providers(zf.EndpointKind.TASK, task), SLOW)
        handles = producer.submit_many(task, [1, 2])

        def answer(items: list[list[Any]]) -> list[Any]:
            assert [item[2] for item in items] == [1, 2]  # both in one message
            (id1, attempt1, _, _), (id2, attempt2, _, _) = items
            return [[id1, attempt1, "yes", None], [[id2], attempt2, True, None],
                    [id2, attempt2, True, {"got": 2}]]

        _serve_once(endpoint.socket, answer, time.monotonic() + SLOW)
        assert handles[1].result(SLOW) == {"got": 2}
        wait_until(lambda: producer.counters.get("refused_task_results") == 1, SLOW,
                   "the message with malformed results counted")
        stats = table_stats(producer, task)
        assert stats["refused"] == 2 and stats["done"] == 1 and stats["in_flight"] == 1
        assert not handles[0].done()  # its result was malformed: still held at the worker
    finally:
        worker.close()
