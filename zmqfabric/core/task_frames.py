"""Reliable task frames (kinds 6, 7, 8 of the wire format): batches of tasks, of results, and
credit. Pure: no IO, no clock. Headers and bodies are those of :mod:`zmqfabric.core.wire`.

The specification is ``docs/PROTOCOL.md``, section 7.4. In short: each worker binds a ROUTER; a
producer connects one DEALER to each worker and sends ``["", header, body]``:

* kind 8, credit: the producer opens each connection with a credit request (a map); the worker
  grants ``{"credit": N, "slots": S}`` (1..65535 each; no ``slots`` means 1) and MAY send a new
  grant at any time, asked or not; the latest replaces the window. Only the worker grants.
* kind 6, tasks (producer to worker): ``[[task_id, attempt, payload, key], ...]``, never more
  unanswered deliveries on a connection than its window.
* kind 7, results (worker to producer): ``[[task_id, attempt, ok, value], ...]``; ``ok`` false
  carries ``{"type": str, "message": str}``. Each result gives a unit of window back.

A worker starts a connection's tasks in order, at most ``slots`` at once; delivery is at least
once (a lost worker's tasks, or an overdue one's, are delivered again with ``attempt`` + 1).

Malformed input raises :class:`~zmqfabric.errors.RemoteProtocolError`, as in ``wire``.
"""


from __future__ import annotations

from typing import Any

import msgpack

from ..constants import MAX_TASK_CREDIT, MAX_TASK_ID, MAX_TASK_KEY
from ..errors import LocalProtocolError, RemoteProtocolError
from .taskrecords import Task, is_failure
from .wire import PACK_ERRORS, Kind, error_body, unpack_body, unpack_header


def pack_tasks(tasks: list[tuple[str, int, bytes, str | None]]) -> bytes:
    """The body of a task message: ``(task_id, attempt, payload, key)`` items, ``payload`` already
    encoded by :func:`~zmqfabric.core.wire.pack_body` (it is spliced in, not encoded again)."""
    pack = msgpack.Packer().pack
    parts = [_array_header(len(tasks))]
    add = parts.append
    for task_id, attempt, payload, key in tasks:
        # The usual item (first attempt, no key) costs one encoding call, not three.
        add(b"\x94" + pack(task_id) + (_SMALL_INTS[attempt] if attempt < 128 else pack(attempt))
            + payload + (_NIL if key is None else pack(key)))
    return b"".join(parts)


def pack_task_records(tasks: list[Task]) -> bytes:
    """:func:`pack_tasks` of the current delivery of each :class:`Task` (its ``id``,
    ``attempts``, ``payload`` and ``key``), without a tuple per task: the dispatcher's path."""
    pack = msgpack.Packer().pack
    parts = [_array_header(len(tasks))]
    add = parts.extend  # the item's five parts, joined once for the whole message
    for task in tasks:
        attempt, key = task.attempts, task.key
        add((b"\x94", pack(task.id), _SMALL_INTS[attempt] if attempt < 128 else pack(attempt),
             task.payload, _NIL if key is None else pack(key)))
    return b"".join(parts)


#: Kinds read per message: module globals (an enum class's attribute is slow on Python 3.11).
_TASK, _RESULT, _CREDIT = Kind.TASK, Kind.RESULT, Kind.CREDIT
#: msgpack's encodings of 0..127 (positive fixint: the byte itself) and of nil.
_SMALL_INTS = [bytes((i,)) for i in range(128)]
_NIL = b"\xc0"


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count <= 0xFFFF:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def pack_results(results: list[list[Any]]) -> bytes:
    """The body of a result message: ``[task_id, attempt, ok, value]`` items. A value msgpack
    cannot encode turns its item into a failure (``ok`` false, type ``LocalProtocolError``)."""
    try:
        return msgpack.packb(results)
    except PACK_ERRORS:
        fixed = []
        for item in results:
            try:
                msgpack.packb(item[3])
            except PACK_ERRORS as exc:
                error = LocalProtocolError(f"result cannot be encoded as msgpack: {exc}")
                item = [item[0], item[1], False, error_body(error)]
            fixed.append(item)
        return msgpack.packb(fixed)


def pack_credit(credit: int, slots: int = 1) -> bytes:
    """The body of a worker's credit message: its window and how many tasks it runs at once.
    Raises LocalProtocolError for either out of 1..65535."""
    for what, value in (("credit", credit), ("slots", slots)):
        if type(value) is not int or not 1 <= value <= MAX_TASK_CREDIT:
            raise LocalProtocolError(f"{what} must be an integer from 1 to {MAX_TASK_CREDIT}")
    return msgpack.packb({"credit": credit, "slots": slots})


def parse_to_worker(payload: list[bytes]) -> tuple[Kind, Any]:
    """Decode ``[header, body]`` (after the route) as a worker receives it: ``(Kind.TASK, items)``
    with items ``[task_id, attempt, payload, key]``, or ``(Kind.CREDIT, map)``.
    Raises RemoteProtocolError."""
    if len(payload) != 2:
        raise RemoteProtocolError(f"task message must be [header, body], got {len(payload)} frames")
    header = unpack_header(payload[0])
    body = unpack_body(payload[1], header.raw)
    if header.kind is _TASK:
        _check_items(body, "task")
        for item in body:
            task_id, attempt, _, key = item
            _check_id(task_id, attempt)
            if key is not None and (type(key) is not str or len(key) > MAX_TASK_KEY):
                raise RemoteProtocolError("task key must be nil or a string of <= 256 characters")
        return header.kind, body
    if header.kind is _CREDIT:
        if not isinstance(body, dict):
            raise RemoteProtocolError("credit request body must be a map")
        return header.kind, body
    raise RemoteProtocolError(f"expected tasks or credit, got kind {header.kind.name.lower()}")


def parse_from_worker(frames: list[bytes]) -> tuple[Kind, Any]:
    """Decode ``["", header, body]`` as a producer's DEALER receives it: ``(Kind.RESULT, items)``
    with items ``[task_id, attempt, ok, value]``, or ``(Kind.CREDIT, (credit, slots))`` (slots
    1 when the worker did not say). Every result item is checked (the dispatcher reads with
    :func:`read_from_worker` instead).
    Raises RemoteProtocolError."""
    kind, body = read_from_worker(frames)
    if kind is _RESULT:
        for item in body:
            if type(item) is not list or len(item) != 4:
                _check_items(body, "result")  # raises
            task_id, attempt, ok, value = item
            _check_id(task_id, attempt)
            if ok is not True and not is_failure(ok, value):
                if ok is not False:
                    raise RemoteProtocolError("result ok flag must be a boolean")
                raise RemoteProtocolError(
                    "failed result value must be {'type': str, 'message': str}"
                )
    return kind, body


def read_from_worker(frames: list[bytes]) -> tuple[Kind, Any]:
    """:func:`parse_from_worker` without checking each result item: the body of results is an
    array of 1 to 65535 items, each unchecked. The producer's hot path: its table judges each
    result on its own (:meth:`~zmqfabric.core.tasktable.TaskTable.on_results`: a result that
    answers one of its deliveries has that delivery's id and attempt, so only ``ok`` and a
    failure's value are left to check). Raises RemoteProtocolError."""
    if len(frames) != 3 or frames[0]:
        raise RemoteProtocolError(
            f"worker message must be ['', header, body], got {len(frames)} frames"
        )
    header = unpack_header(frames[1])
    body = unpack_body(frames[2], header.raw)
    if header.kind is _RESULT:
        if type(body) is not list or not 1 <= len(body) <= MAX_TASK_CREDIT:
            _check_items(body, "result")  # raises
        return header.kind, body
    if header.kind is _CREDIT:
        credit = body.get("credit") if isinstance(body, dict) else None
        if type(credit) is not int or not 1 <= credit <= MAX_TASK_CREDIT:
            raise RemoteProtocolError(f"credit must be an integer from 1 to {MAX_TASK_CREDIT}")
        slots = body.get("slots", 1)
        if type(slots) is not int or not 1 <= slots <= MAX_TASK_CREDIT:
            raise RemoteProtocolError(f"slots must be an integer from 1 to {MAX_TASK_CREDIT}")
        return header.kind, (credit, slots)
    raise RemoteProtocolError(f"expected results or credit, got kind {header.kind.name.lower()}")


def _check_items(body: Any, what: str) -> None:
    if type(body) is not list or not 1 <= len(body) <= MAX_TASK_CREDIT:
        raise RemoteProtocolError(f"{what} body must be an array of 1 to {MAX_TASK_CREDIT} items")
    for item in body:
        if type(item) is not list or len(item) != 4:
            raise RemoteProtocolError(f"each {what} must be an array of 4 items")


def _check_id(task_id: Any, attempt: Any) -> None:
    if type(task_id) is not str or not 0 < len(task_id) <= MAX_TASK_ID:
        raise RemoteProtocolError("task id must be a string of 1 to 128 characters")
    if type(attempt) is not int or not 1 <= attempt <= 0xFFFFFFFF:
        raise RemoteProtocolError("task attempt must be an integer from 1")
