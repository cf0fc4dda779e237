"""The task journal's file format (:mod:`.journal` reads and writes it): an append-only log.

A file starts with :data:`FILE_HEADER` (name and format version) and holds records back to
back. A record is a 10-byte head, then its body::

    marker   u16 little-endian, 0x4A5A: where a record starts, to find the next one after damage
    length   u32 little-endian, bytes in the body
    check    u32 little-endian, zlib.crc32(body, length): the body and its length

and the body is msgpack, one of:

- ``[1, id, name, payload, key, deadline_s, max_attempts]``: a task submitted (``ADD``); the
  same id again replaces it (and makes it the newest);
- ``[2, [id, ...]]``: these tasks settled (``SETTLED``); ids the file does not hold are ignored.

The unsettled tasks are the ``ADD`` records not followed by a ``SETTLED`` of their id, in the
order of their last ``ADD``. A record whose head or check is wrong is damage: at the end of the
file, a write the process did not finish (a torn tail); elsewhere, a corrupt region, after which
:func:`scan` resumes at the next intact record. A record that is intact but is not one of the two
above (or carries a task this fabric could not have written) is malformed.

Thread-safe (no state).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack

from ..constants import MAX_TASK_ID, MAX_TASK_KEY
from ..core import wire
from ..errors import FabricError
from .config import validate_task_name

#: The first bytes of every journal file: the format's name and version.
FILE_HEADER = b"ZMQFABRIC-JOURNAL 2\n"
#: What a journal of the previous release (sqlite) starts with.
SQLITE_HEADER = b"SQLite format 3\x00"
HEAD = struct.Struct("<HII")
MARKER = 0x4A5A
_MARKER_BYTES = struct.pack("<H", MARKER)
ADD = 1
SETTLED = 2

#: One task as the journal takes and gives it: (id, name, payload, key, deadline_s, max_attempts).
Row = tuple[str, str, bytes, str | None, float, int]


def frame(body: bytes) -> bytes:
    """The record holding ``body`` (head and body)."""
    return HEAD.pack(MARKER, len(body), zlib.crc32(body, len(body))) + body


def settled_record(task_ids: list[str]) -> bytes:
    """The record saying ``task_ids`` settled."""
    return frame(msgpack.packb((SETTLED, task_ids)))


@dataclass(slots=True)
class Replayed:
    """What a journal file holds, as :func:`replay` found it."""

    #: The unsettled tasks, in the order of their last ``ADD``.
    tasks: dict[str, Row] = field(default_factory=dict)
    #: Where each one's record is: task id -> (offset, size).
    live: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Malformed records and corrupt regions: (reason, offset, bytes).
    bad: list[tuple[str, int, bytes]] = field(default_factory=list)
    #: Where a torn tail starts (-1: none).
    torn: int = -1


def replay(data: bytes) -> Replayed:
    """Read a whole journal file (``data`` starts with :data:`FILE_HEADER`)."""
    found = Replayed()
    tasks, live = found.tasks, found.live
    for offset, end, body in scan(data, len(FILE_HEADER)):
        if body is None:
            if end == len(data):
                found.torn = offset
            else:
                found.bad.append(("corrupt region (no intact record)", offset, data[offset:end]))
            continue
        try:
            kind, value = decode(body)
        except ValueError as exc:
            found.bad.append((str(exc), offset, data[offset:end]))
            continue
        if kind == ADD:
            task_id = value[0]
            if live.pop(task_id, None) is not None:
                del tasks[task_id]  # recorded again: the newest record counts
            tasks[task_id] = value
            live[task_id] = (offset, end - offset)
        else:
            for task_id in value:
                if live.pop(task_id, None) is not None:
                    del tasks[task_id]
    return found


def scan(data: bytes, start: int) -> Iterator[tuple[int, int, bytes | None]]:
    """Walk the records of ``data`` from offset ``start``: yields ``(offset, end, body)`` for
    each intact record and ``(offset, end, None)`` for each damaged region (``end`` is then the
    next intact record, or ``len(data)`` for a damaged tail)."""
    size = len(data)
    pos = start
    while pos < size:
        end = _intact(data, pos, size)
        if end:
            yield pos, end, data[pos + HEAD.size:end]
            pos = end
            continue
        found = pos
        while True:  # the next place a record starts and checks out
            found = data.find(_MARKER_BYTES, found + 1)
            if found < 0:
                found = size
                break
            if _intact(data, found, size):
                break
        yield pos, found, None
        pos = found


def _intact(data: bytes, pos: int, size: int) -> int:
    """The end of the intact record at ``pos``, or 0."""
    if size - pos < HEAD.size:
        return 0
    marker, length, check = HEAD.unpack_from(data, pos)
    end = pos + HEAD.size + length
    if marker != MARKER or end > size:
        return 0
    if zlib.crc32(data[pos + HEAD.size:end], length) != check:
        return 0
    return end


def decode(body: bytes) -> tuple[int, Any]:
    """What an intact record says: ``(ADD, row)`` or ``(SETTLED, [id, ...])``. Raises ValueError
    with the reason when it is malformed."""
    try:
        item = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several types (ExtraData, UnicodeDecodeError...)
        raise ValueError(f"not msgpack: {exc}") from exc
    if type(item) is not list or not item:
        raise ValueError("not a record (a non-empty array)")
    if item[0] == ADD and len(item) == 7:
        row = tuple(item[1:])
        why = check_task(row)
        if why is not None:
            raise ValueError(why)
        return ADD, row
    if item[0] == SETTLED and len(item) == 2 and type(item[1]) is list:
        if not all(type(i) is str for i in item[1]):
            raise ValueError("settled ids must be strings")
        return SETTLED, item[1]
    raise ValueError(f"unknown record kind {item[0]!r} with {len(item)} fields")


def check_task(row: tuple[Any, ...]) -> str | None:
    """Why ``(id, name, payload, key, deadline, attempts)`` is not a task this fabric could have
    written, or None when it is one."""
    task_id, name, payload, key, deadline, attempts = row
    if type(task_id) is not str or not 0 < len(task_id) <= MAX_TASK_ID:
        return f"id must be a string of 1 to {MAX_TASK_ID} characters"
    try:
        validate_task_name(name)
    except FabricError as exc:
        return f"bad task name: {exc}"
    if key is not None and (type(key) is not str or len(key) > MAX_TASK_KEY):
        return f"key must be null or a string of at most {MAX_TASK_KEY} characters"
    if type(deadline) not in (int, float) or not 0 < deadline < math.inf:
        return "deadline must be a number of seconds > 0"
    if type(attempts) is not int or attempts < 1:
        return "attempts must be an integer >= 1"
    if type(payload) is not bytes:
        return "payload must be bytes"
    try:
        wire.unpack_body(payload)
    except FabricError as exc:
        return f"payload: {exc}"
    return None
