"""What a node must do with each message ``perf/fuzz_network.py`` sends: the reference
decoders of ``zmqfabric.core.wire`` and ``zmqfabric.core.task_frames`` (docs/PROTOCOL.md in
code) classify every message as it is sent, so that the node's counters and answers can be
compared exactly. Pure: no sockets.

Two receive paths read pipelines and streams. ``recv_message`` takes a whole multipart message
and hands it to the parser. ``recv`` (the hot path) first tests a frame for the canonical
one-frame message or batch and decodes it with one msgpack call; frames behind such a frame are
then read as messages of their own (PROTOCOL.md 5.2 allows it). A subscription's hot path only
takes topics it has decoded before (a cache of 1024, cleared when full), so its model keeps the
same cache. Anything the hot path does not take goes to the parser with the rest of the frames.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from zmqfabric.constants import DECODE_CHECK_SIZE, MAX_CONTROL_MESSAGE, MAX_TOPIC_SIZE
from zmqfabric.core import task_frames, wire
from zmqfabric.errors import RemoteProtocolError

#: The identity a ROUTER puts before each message of a peer that set none (0 + 4 bytes).
IDENTITY = b"\x00\x00\x00\x00\x01"
_MESSAGE = wire.MESSAGE_PREFIX[wire.Kind.MESSAGE]
_MESSAGE_BATCH = wire.BATCH_PREFIX[wire.Kind.MESSAGE]
_EVENT = wire.MESSAGE_PREFIX[wire.Kind.EVENT]
_EVENT_BATCH = wire.BATCH_PREFIX[wire.Kind.EVENT]
#: Control ops that are never answered (PROTOCOL.md 6.1), and liveness ops answered unless
#: their id is 0.
ONE_WAY = ("hello", "peers", "probe-ack")
LIVENESS = ("probe", "probe-req")
#: How many topics a subscription's hot path remembers (zmqfabric.patterns.pubsub).
TOPIC_CACHE = 1024


@dataclass
class Expect:
    """Totals for one endpoint: what was sent and what the node must have done with it."""

    sent: int = 0
    refused: int = 0
    #: Messages (or task items) the application must receive.
    valid: int = 0
    replies: int = 0
    #: Control messages dropped unanswered and uncounted: over 64 KiB in all.
    dropped: int = 0
    grants: int = 0
    #: The message id each reply must carry: the request's, or for a refusal the id read from
    #: its first frame (0 when none can be read; PROTOCOL.md 5.6).
    reply_ids: Counter[int] = field(default_factory=Counter)
    by_mutation: dict[str, int] = field(default_factory=dict)

    def add(self, other: Expect) -> None:
        for key in ("sent", "refused", "valid", "replies", "dropped", "grants"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.reply_ids.update(other.reply_ids)
        for key, n in other.by_mutation.items():
            self.by_mutation[key] = self.by_mutation.get(key, 0) + n

    def note(self, mutation: str) -> None:
        self.sent += 1
        self.by_mutation[mutation] = self.by_mutation.get(mutation, 0) + 1


def request(expect: Expect, frames: list[bytes], service: str, control: bool) -> None:
    """A DEALER's ``frames`` to a service (``control``: the control endpoint, ``service``
    "control"). Refused with a route: an error reply; refused without one: no answer."""
    full = [IDENTITY, *frames]
    if control and sum(len(f) for f in full) > MAX_CONTROL_MESSAGE:
        expect.dropped += 1
        return
    try:
        _, payload = wire.split_route(full)
    except RemoteProtocolError:
        expect.refused += 1
        return
    try:
        header, body = wire.parse_request(payload, service)
    except RemoteProtocolError:
        expect.refused += 1
        expect.replies += 1
        expect.reply_ids[(wire.request_id(payload[0]) if payload else None) or 0] += 1
        return
    expect.valid += 1
    op = body.get("op") if control and isinstance(body, dict) else None
    if op in ONE_WAY or (op in LIVENESS and header.msg_id == 0):
        return
    expect.replies += 1
    expect.reply_ids[header.msg_id] += 1


def reply_id(frames: list[bytes]) -> int:
    """The id of a reply as the fuzzing DEALER receives it (route frames, if the request had
    any, then ``["", reply...]``). Raises RemoteProtocolError for anything else."""
    try:
        start = frames.index(b"")
    except ValueError:
        raise RemoteProtocolError("reply without a delimiter") from None
    return wire.parse_reply(frames[start:])[0].msg_id


def _parsed(expect: Expect, frames: list[bytes], parse: Any) -> list[wire.Message] | None:
    try:
        messages = parse(frames)
    except RemoteProtocolError:
        expect.refused += 1
        return None
    expect.valid += len(messages)
    return messages


def message_whole(expect: Expect, frames: list[bytes]) -> None:
    """A PUSH's ``frames`` as ``Puller.recv_message`` reads them: one multipart message."""
    _parsed(expect, frames, wire.parse_message)


def _unpack_fast(data: bytes, plain: bytes, batch: bytes, at: int) -> int | None:
    """How many messages the hot path takes from ``data[at:]`` (a canonical message or a
    non-empty batch), or None when it leaves the frame to the parser."""
    try:
        if data[at + wire.FLOAT64_AT] != wire.FLOAT64:
            return None
        if data.startswith(plain, at):
            msgpack.unpackb(data[at:], raw=False, strict_map_key=False)[4]
            return 1
        if data.startswith(batch, at):
            fields = msgpack.unpackb(data[at:], raw=False, strict_map_key=False)
            if type(fields[4]) is list and fields[4]:
                return len(fields[4])
    except Exception:  # the parser decides (and counts)
        return None
    return None


def message_hot(expect: Expect, frames: list[bytes]) -> None:
    """A PUSH's ``frames`` as ``Puller.recv`` reads them (see the module docstring)."""
    for i, data in enumerate(frames):
        taken = None
        if len(data) <= DECODE_CHECK_SIZE:
            taken = _unpack_fast(data, _MESSAGE, _MESSAGE_BATCH, 0)
        if taken is None:
            _parsed(expect, frames[i:], wire.parse_message)
            return
        expect.valid += taken


def event_whole(expect: Expect, frames: list[bytes]) -> None:
    """A PUB's ``frames`` as ``Subscription.recv_message`` reads them."""
    _parsed(expect, frames, wire.parse_event)


class EventHot:
    """A PUB's frames as ``Subscription.recv`` reads them, with the topics it has learnt. Keep
    one per subscription for its whole life (the subscription's cache outlives a round), and
    start it with the topics the subscription decoded before (``learnt``)."""

    def __init__(self, learnt: tuple[bytes, ...] = ()) -> None:
        self.names: set[bytes] = set(learnt)

    def __call__(self, expect: Expect, frames: list[bytes]) -> None:
        for i, data in enumerate(frames):
            taken = None
            end = data.find(0, 0, MAX_TOPIC_SIZE + 1)
            if end >= 0 and len(data) <= DECODE_CHECK_SIZE and data[:end] in self.names:
                taken = _unpack_fast(data, _EVENT, _EVENT_BATCH, end + 1)
            if taken is None:
                messages = _parsed(expect, frames[i:], wire.parse_event)
                if messages:
                    if len(self.names) >= TOPIC_CACHE:
                        self.names.clear()
                    self.names.add((messages[0].topic or "").encode())
                return
            expect.valid += taken


def task(expect: Expect, frames: list[bytes]) -> None:
    """A DEALER's ``frames`` to a worker: a grant per credit request, a result per task."""
    full = [IDENTITY, *frames]
    try:
        if len(full) == 4 and not full[1]:
            payload = full[2:]
        else:
            _, payload = wire.split_route(full)
        kind, items = task_frames.parse_to_worker(payload)
    except RemoteProtocolError:
        expect.refused += 1
        return
    if kind is wire.Kind.CREDIT:
        expect.grants += 1
    else:
        expect.valid += len(items)


def worker_answer(frames: list[bytes]) -> tuple[int, int]:
    """(grants, results) in one message a worker sent to the fuzzing DEALER; raises
    RemoteProtocolError for anything else (a defect of the worker)."""
    try:
        route_end = frames.index(b"")
    except ValueError:
        raise RemoteProtocolError("worker answer without a delimiter") from None
    kind, body = task_frames.parse_from_worker(frames[route_end:])
    return (1, 0) if kind is wire.Kind.CREDIT else (0, len(body))


def result(expect: Expect, frames: list[bytes]) -> None:
    """A worker's ``frames`` (as the producer's DEALER receives them): refused, or results the
    producer counts as late (it never gave out their tasks), or a grant."""
    try:
        kind, body = task_frames.parse_from_worker(frames)
    except RemoteProtocolError:
        expect.refused += 1
        return
    if kind is wire.Kind.CREDIT:
        expect.grants += 1
    else:
        expect.valid += len(body)

