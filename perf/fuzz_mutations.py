"""Mutations of valid protocol-2 messages (``fuzz_frames.py``), for
``perf/fuzz_network.py``. Pure: nothing here touches a socket.

A :class:`Generator` draws a template of one endpoint kind and either sends it as it is, changes
its fields (wrong versions 0, 1, 3, 255, the version-1 two-frame layout, wrong kinds and flags,
odd fixed fields, header maps near the 4096-byte limit, broken, bomb and too deep bodies,
batches that are not arrays, wrong services, bad topics, bad task items) or changes its frames
(flipped bytes, truncated, dropped, duplicated, swapped and extra frames, a second whole message
behind the first, large frames). What the node must do with each is decided elsewhere
(``fuzz_expect.py``), by the reference decoders.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any, Callable

import msgpack
from fuzz_frames import (
    CREDIT,
    MAX_HEADER,
    RESULT,
    TASK,
    Spec,
    body,
    render,
    result_item,
    task_item,
)

Template = Callable[[random.Random], Spec]
Mutation = Callable[[random.Random, Spec], list[bytes]]


def _flip(rng: random.Random, frames: list[bytes], start: int) -> list[bytes]:
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(start, len(frames)) if start < len(frames) else 0
        if frames[i]:
            b = bytearray(frames[i])
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
            frames[i] = bytes(b)
    return frames


def _msg_at(spec: Spec) -> int:
    return len(spec.envelope)


def m_random(rng: random.Random, spec: Spec) -> list[bytes]:
    count = rng.choice((1, 1, 2, 2, 3, 3, 4, 5, 8))
    return [rng.randbytes(rng.choice((0, 0, 1, 2, 5, 16, 21, 22, 64, 300))) for _ in range(count)]


def m_flip(rng: random.Random, spec: Spec) -> list[bytes]:
    return _flip(rng, render(spec), _msg_at(spec))


def m_flip_fixed(rng: random.Random, spec: Spec) -> list[bytes]:
    """One byte of the fixed fields (array header, version, kind, id and timestamp tags)."""
    frames = render(spec)
    i = _msg_at(spec)
    start = (len(spec.topic) + 1) if spec.topic is not None else 0
    b = bytearray(frames[i])
    at = start + rng.choice((0, 1, 2, 3, 12))
    if at < len(b):
        b[at] = rng.choice((0x00, 0x01, 0x03, 0x90, 0x94, 0x95, 0x96, 0x97, 0xC0, 0xCA, 0xCB,
                            0xCE, 0xCF, 0xD3, 0xFF, b[at] ^ 0x10, b[at] ^ 0x20))
    frames[i] = bytes(b)
    return frames


def m_truncate(rng: random.Random, spec: Spec) -> list[bytes]:
    frames = render(spec)
    i = rng.randrange(_msg_at(spec), len(frames))
    frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    return frames


def m_drop(rng: random.Random, spec: Spec) -> list[bytes]:
    frames = render(spec)
    del frames[rng.randrange(len(frames))]
    return frames or [b""]


def m_duplicate(rng: random.Random, spec: Spec) -> list[bytes]:
    frames = render(spec)
    i = rng.randrange(len(frames))
    frames.insert(i, frames[i])
    return frames


def m_swap(rng: random.Random, spec: Spec) -> list[bytes]:
    frames = render(spec)
    i, j = rng.randrange(len(frames)), rng.randrange(len(frames))
    frames[i], frames[j] = frames[j], frames[i]
    return frames


def m_extra_frame(rng: random.Random, spec: Spec) -> list[bytes]:
    frames = render(spec)
    frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(rng.randrange(40)))
    return frames


def m_second_message(rng: random.Random, spec: Spec) -> list[bytes]:
    """A whole one-frame message followed by the frame(s) of another in the same multipart
    message: malformed as one message; a hot path may read the frames after it as messages of
    their own (PROTOCOL.md 5.2)."""
    first = render(replace(spec, form="one", raw=False, headers=None, body=spec.body
                           if spec.form != "two" else None))
    other = render(replace(spec, envelope=[], msg_id=7))
    return first + other


def m_version(rng: random.Random, spec: Spec) -> list[bytes]:
    return render(replace(spec, version=rng.choice((0, 1, 3, 255))))


def m_v1(rng: random.Random, spec: Spec) -> list[bytes]:
    """The version 1 layout: a header frame ``[1, kind, id, ts(, headers)]``, a body frame, and
    a stream's topic in a frame of its own."""
    items: list[Any] = [1, spec.kind, spec.msg_id if type(spec.msg_id) is int else 1, 1.7e9]
    if rng.random() < 0.5:
        items.append({"svc": "x"})
    frames = spec.envelope + [msgpack.packb(items), msgpack.packb(body(rng))]
    if spec.topic is not None:
        frames.insert(len(spec.envelope), spec.topic)
    return frames


def m_kind(rng: random.Random, spec: Spec) -> list[bytes]:
    kind = rng.choice([k for k in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 127, -1, 255, 0x30 | 5,
                                   0x40 | spec.kind, "1") if k != spec.kind])
    return render(replace(spec, kind=kind))


def m_flags(rng: random.Random, spec: Spec) -> list[bytes]:
    """The FOLLOWS or BATCH bit where the form says otherwise."""
    form = rng.choice([f for f in ("one", "two", "batch") if f != spec.form])
    fixed = replace(spec, form=form)
    if form == "batch" and rng.random() < 0.5:
        fixed.body = spec.body if isinstance(spec.body, list) else [spec.body]
    if form == "two" and spec.form == "batch" and rng.random() < 0.5:
        return render(fixed)[:-1]  # the header frame alone
    return render(fixed)


def m_fields(rng: random.Random, spec: Spec) -> list[bytes]:
    """Odd fixed fields: ids out of range, timestamps that are not numbers, too few or too many
    items, header maps that are not maps of strings, trailing bytes after the array."""
    choice = rng.randrange(11)
    if choice == 0:
        return render(replace(spec, msg_id=rng.choice((-1, -2**63, 1.5, "7", None, b"\x01"))))
    if choice == 1:
        return render(replace(spec, ts=rng.choice(("yesterday", None, [1], True))))
    if choice == 2:
        return render(replace(spec, version=rng.choice((2.0, "2", True, None))))
    if choice == 3:
        return render(replace(spec, headers=rng.choice((5, [1], {1: 2}, {"k": 1, 2: 3}, "svc"))))
    if choice == 4:
        return render(replace(spec, headers=spec.headers or {}, extra_fields=[rng.choice(
            (6, None, {}, "x"))]))
    if choice == 5:
        return render(replace(spec, drop_fields=rng.randint(1, 3)))
    if choice == 6:
        return render(replace(spec, trailer=rng.choice((b"\x00", b"\xc0", b"\x91\x01"))))
    if choice == 7:
        return render(replace(spec, headers={}))
    if choice == 8:
        return render(replace(spec, canonical=not spec.canonical))
    if choice == 9:
        return render(replace(spec, headers=None if spec.headers else {"extra": "header"}))
    return spec.envelope + [msgpack.packb({"v": 2, "kind": spec.kind})]


def m_big_header(rng: random.Random, spec: Spec) -> list[bytes]:
    """A header map that puts a header frame (or a one-frame message) around 4096 bytes."""
    size = rng.randint(MAX_HEADER - 200, MAX_HEADER + 200)
    headers = dict(spec.headers or {})
    headers["pad"] = ""
    base = len(render(replace(spec, headers=headers))[_msg_at(spec)])
    headers["pad"] = "x" * max(0, size - base - 2)
    return render(replace(spec, headers=headers, form=rng.choice((spec.form, "two"))))


def m_body(rng: random.Random, spec: Spec) -> list[bytes]:
    """A body that does not decode, decodes to too much (a bomb over 16 KiB of empty arrays), or
    nests deeper than msgpack allows."""
    bad = rng.choice([
        b"\xc1", b"\x92\x01", b"\xa5ab", b"\xa2\xff\xfe", b"\xdd\xff\xff\xff\xff",
        msgpack.packb(1) + b"\x00", rng.randbytes(rng.randrange(1, 50)),
        b"\xdd\x00\x00\x80\x00" + b"\x90" * 0x8000,  # 32768 empty arrays: expands ~50x
        b"\xdf\x00\x00\x50\x00" + b"\x80\x90" * 0x5000,
        b"\x91" * 1100 + b"\xc0",  # nested deeper than 1024
        b"\xd4\x01\x02",  # an extension type: decodes, and a sender SHOULD NOT use it
    ])
    return render(replace(spec, body_bytes=bad, raw=False))


def m_batch(rng: random.Random, spec: Spec) -> list[bytes]:
    """Batches of odd bodies: not an array, empty, one item, many."""
    bodies: Any = rng.choice((None, 5, "x", {"a": 1}, [], [1], list(range(300)), [[]] * 10))
    return render(replace(spec, form="batch", body=bodies, raw=False, headers=None))


def m_raw(rng: random.Random, spec: Spec) -> list[bytes]:
    """Raw bodies: random bytes under ``"enc": "raw"``, or the map on a one-frame message."""
    headers = {**(spec.headers or {}), "enc": rng.choice(("raw", "raw", "zip", 1))}
    form = rng.choice(("two", "two", "one"))
    blob = rng.randbytes(rng.randrange(200))
    return render(replace(spec, form=form, raw=form == "two", headers=headers,
                          body=blob if form == "two" else spec.body))


def m_service(rng: random.Random, spec: Spec) -> list[bytes]:
    """Requests naming another service, or a service name that is not a string."""
    svc = rng.choice(("other", "", "control", 5, None, ["x"], "s" * 200))
    return render(replace(spec, headers={**(spec.headers or {}), "svc": svc}))


def m_topic(rng: random.Random, spec: Spec) -> list[bytes]:
    """Stream frames without a topic end, with a topic over 1024 bytes, or not UTF-8."""
    topic = rng.choice((b"y" * 1025, b"\xff\xfe", b"\xc3", b"\xffzf/sub/00", b"t" * 2000))
    frames = render(replace(spec, topic=topic))
    if rng.random() < 0.3:
        frames[0] = frames[0].replace(b"\x00", b"", 1) if b"\x00" in frames[0][:2100] else frames[0]
    return frames


def m_tasks(rng: random.Random, spec: Spec) -> list[bytes]:
    """Task and credit bodies with bad items (PROTOCOL.md 7.4)."""
    good = task_item(rng)
    bad = rng.choice([
        [["", 1, None, None]], [["t" * 129, 1, None, None]], [["t", 0, None, None]],
        [["t", 2**32, None, None]], [["t", 1, None, "k" * 257]], [["t", 1, None, 5]],
        [["t", 1, None]], [[1, 1, None, None]], [good, "x"], [], "tasks", None,
        [["t", True, None, None]], [good] * 3,
    ])
    if spec.kind == CREDIT or rng.random() < 0.3:
        return render(replace(spec, kind=CREDIT, body=rng.choice((5, [], "x", None, {}, {1: 2}))))
    return render(replace(spec, kind=TASK, body=bad))


def m_results(rng: random.Random, spec: Spec) -> list[bytes]:
    """Result and grant bodies with bad items or values (PROTOCOL.md 7.4)."""
    if spec.kind == CREDIT or rng.random() < 0.3:
        grant: Any = rng.choice(({"credit": 0}, {"credit": 65536}, {"credit": 1, "slots": 0},
                            {"credit": "1"}, {"slots": 4}, {"credit": True}, [], 5, None,
                            {"credit": 1, "slots": 70000}))
        return render(replace(spec, kind=CREDIT, body=grant))
    good = result_item(rng)
    bad = rng.choice([
        [["t", 1, 1, None]], [["t", 1, False, "error"]], [["t", 1, False, {"type": "E"}]],
        [["", 1, True, None]], [["t", 0, True, None]], [["t" * 129, 1, True, None]],
        [["t", 1, True]], [good, 5], [], {"t": 1}, None, [good] * 3,
    ])
    return render(replace(spec, kind=RESULT, body=bad))


def m_large(rng: random.Random, spec: Spec) -> list[bytes]:
    frames = render(spec)
    i = rng.randrange(_msg_at(spec), len(frames))
    frames[i] = rng.randbytes(rng.choice((20_000, 65_000, 300_000)))
    return frames


def m_over_control(rng: random.Random, spec: Spec) -> list[bytes]:
    """A control message of more than 64 KiB in all, in frames each under the socket's limit:
    read to its end and dropped, unanswered (PROTOCOL.md 6.1)."""
    frames = render(spec)
    at = rng.randrange(len(frames) + 1)
    return frames[:at] + [rng.randbytes(40_000), rng.randbytes(30_000)] + frames[at:]


def m_valid(rng: random.Random, spec: Spec) -> list[bytes]:
    return render(spec)


COMMON: list[tuple[str, Mutation, int]] = [
    ("valid", m_valid, 6), ("random frames", m_random, 2), ("flipped bytes", m_flip, 3),
    ("flipped fixed field", m_flip_fixed, 3), ("truncated frame", m_truncate, 2),
    ("dropped frame", m_drop, 1), ("duplicated frame", m_duplicate, 1),
    ("swapped frames", m_swap, 1), ("extra random frame", m_extra_frame, 1),
    ("second message behind", m_second_message, 2), ("wrong version", m_version, 2),
    ("version 1 layout", m_v1, 1), ("wrong kind", m_kind, 2), ("wrong flags", m_flags, 2),
    ("odd fields", m_fields, 3), ("header near 4096", m_big_header, 1),
    ("broken body", m_body, 2), ("raw body", m_raw, 1),
]
EXTRA: dict[str, list[tuple[str, Mutation, int]]] = {
    "request": [("wrong service", m_service, 1)],
    "control": [("wrong service", m_service, 1), ("over 64 KiB in all", m_over_control, 1)],
    "message": [("odd batch", m_batch, 2)],
    "event": [("odd batch", m_batch, 2), ("bad topic", m_topic, 1)],
    "task": [("bad task items", m_tasks, 3)],
    "result": [("bad results", m_results, 3)],
}


class Generator:
    """Random and mutated messages of one endpoint kind (``what``: request, control, message,
    event, task). Large frames come rarely (``large_rate``), never to the control endpoint,
    whose 64 KiB limit disconnects the sender (``oversized`` covers that on its own)."""

    def __init__(self, rng: random.Random, what: str, template: Template,
                 large_rate: float = 0.002) -> None:
        self.rng = rng
        self.template = template
        self.large_rate = 0.0 if what == "control" else large_rate
        table = COMMON + EXTRA.get(what, [])
        self.names = [name for name, _, weight in table for _ in range(weight)]
        self.makers = {name: make for name, make, _ in table}

    def next(self) -> tuple[str, list[bytes]]:
        rng = self.rng
        spec = self.template(rng)
        if rng.random() < self.large_rate:
            return "large frame", m_large(rng, spec)
        name = rng.choice(self.names)
        return name, self.makers[name](rng, spec)
