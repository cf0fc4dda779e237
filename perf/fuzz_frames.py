"""Valid protocol-2 messages of every endpoint kind, for ``perf/fuzz_network.py``. Pure:
random and msgpack only; nothing here touches a socket.

A :class:`Spec` describes one message as its sender would write it (docs/PROTOCOL.md, sections
5 and 7): the frames before it (the DEALER's empty delimiter), the stream topic, the fields
``[version, kind, msg_id, timestamp, body(, headers)]`` and the form (one frame, a header frame
and a body frame, or a batch). :func:`render` turns it into the frames to send, in the
canonical 21-byte layout zmqfabric writes or in compact msgpack (both are valid). The
templates (``request``, ``control``, ``message``, ``event``, ``task``) draw a valid message of
one endpoint kind; ``fuzz_mutations.py`` breaks them.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

#: The wire's version, kind numbers and flag bits (docs/PROTOCOL.md 5.1, 5.2, 5.4, 5.7).
VERSION = 2
REQUEST, EVENT, MESSAGE, TASK, RESULT, CREDIT = 1, 4, 5, 6, 7, 8
FOLLOWS, BATCH = 0x10, 0x20
MAX_HEADER = 4096
MAX_TOPIC = 1024
#: A one-frame message bigger than this is checked for its decoded size before decoding.
DECODE_CHECK = 16 * 1024
_FLOAT = struct.Struct(">d")


@dataclass
class Spec:
    """One message as a sender writes it. ``form``: "one", "two" (header frame then body frame;
    ``raw``: the body frame is ``body`` as bytes) or "batch" (``body`` is the list of bodies)."""

    kind: Any
    body: Any
    msg_id: Any = 1
    ts: Any = 1.7e9
    version: Any = VERSION
    headers: Any = None
    form: str = "one"
    raw: bool = False
    canonical: bool = True
    envelope: list[bytes] = field(default_factory=list)
    topic: bytes | None = None
    #: Bytes put in place of the packed body (a broken body), or appended to the first frame.
    body_bytes: bytes | None = None
    trailer: bytes = b""
    #: Fields after the body (or after the timestamp of a header frame) beyond ``headers``.
    extra_fields: list[Any] = field(default_factory=list)
    drop_fields: int = 0


def _fixed(spec: Spec, kind: Any, count: int) -> bytes:
    """The array header and fixed fields: canonical (CF id, CB timestamp) when they fit it."""
    v, i, t = spec.version, spec.msg_id, spec.ts
    if (spec.canonical and count < 16 and type(v) is int and 0 <= v < 128 and type(kind) is int
            and 0 <= kind < 128 and type(i) is int and 0 <= i < 2**64 and type(t) is float):
        return (bytes((0x90 | count, v, kind)) + b"\xcf" + i.to_bytes(8, "big") + b"\xcb"
                + _FLOAT.pack(t))
    head = msgpack.packb([0] * count)[:-count]  # the array header only
    return head + b"".join(msgpack.packb(x) for x in (v, kind, i, t))


def render(spec: Spec) -> list[bytes]:
    """The frames ``spec`` is sent as (a topic is the first frame's prefix)."""
    kind = spec.kind
    tail = [spec.headers] if spec.headers is not None else []
    tail += spec.extra_fields
    if spec.form == "two":
        flagged = kind | FOLLOWS if type(kind) is int else kind
        first = _fixed(spec, flagged, 4 + len(tail)) + b"".join(msgpack.packb(x) for x in tail)
        if spec.body_bytes is not None:
            second = spec.body_bytes
        else:
            second = spec.body if spec.raw else msgpack.packb(spec.body)
        frames = [first + spec.trailer, second]
    else:
        flagged = kind | BATCH if spec.form == "batch" and type(kind) is int else kind
        body = spec.body_bytes if spec.body_bytes is not None else msgpack.packb(spec.body)
        first = _fixed(spec, flagged, 5 + len(tail)) + body + b"".join(
            msgpack.packb(x) for x in tail)
        frames = [first + spec.trailer]
    if spec.drop_fields:  # too few items (the body frame, if any, stays)
        fields = msgpack.unpackb(frames[0], strict_map_key=False)
        frames[0] = msgpack.packb(fields[: max(0, len(fields) - spec.drop_fields)])
    if spec.topic is not None:
        frames[0] = spec.topic + b"\x00" + frames[0]
    return spec.envelope + frames


# --- bodies and templates ---------------------------------------------------------------------


def body(rng: random.Random) -> Any:
    return rng.choice([None, 1, -7, 2.5, "text", "é", b"\x00\xff", [1, [2, [3]]],
                       {"k": [1, 2.5]}, {1: "int key"}, rng.randbytes(rng.randrange(40)),
                       "x" * rng.randrange(300), list(range(rng.randrange(20)))])


def _id(rng: random.Random) -> int:
    return rng.choice([rng.getrandbits(64), rng.getrandbits(40), rng.randrange(1, 200),
                       2**64 - 1])


def _ts(rng: random.Random) -> Any:
    return rng.choice([1.7e9 + rng.random(), 0.0, 1_700_000_000])


def request(rng: random.Random, service: str) -> Spec:
    """A request to ``service``: one frame, or a header frame and a (raw) body frame."""
    named = rng.random() < 0.8
    headers = {"svc": service} if named else None
    spec = Spec(REQUEST, body(rng), _id(rng), _ts(rng), headers=headers,
                envelope=[b""], canonical=rng.random() < 0.7)
    roll = rng.random()
    if roll < 0.15:
        spec.form, spec.raw = "two", True
        spec.headers = {**(headers or {}), "enc": "raw"}
        spec.body = rng.randbytes(rng.randrange(100))
    elif roll < 0.25:
        spec.form = "two"
    return spec


def control(rng: random.Random) -> Spec:
    """A control request: the monitoring ops, an unknown op, and liveness and introduction ops
    that name no address (nothing here makes the node connect anywhere new)."""
    op = rng.choice(["ping", "ping", "info", "stats", "record", "nope", "probe", "probe-ack",
                     "hello", "peers"])
    payload: dict[str, Any] = {"op": op}
    if op == "probe":
        payload.update({"to": [rng.randbytes(8).hex(), 0, False], "from": None, "g": []})
    elif op == "probe-ack":
        payload.update({"nonce": rng.randrange(1000), "id": rng.randbytes(8).hex(), "inc": 0,
                        "g": []})
    elif op == "hello":
        payload.update({"name": "fz-nobody", "txt": {"v": "9"}})
    elif op == "peers":
        payload["peers"] = []
    one_way = op in ("probe-ack", "hello", "peers")
    msg_id = 0 if one_way or rng.random() < 0.05 else _id(rng)
    headers = {"svc": "control"} if rng.random() < 0.7 else None
    form = "two" if rng.random() < 0.2 else "one"
    return Spec(REQUEST, payload, msg_id, _ts(rng), headers=headers, form=form,
                envelope=[b""], canonical=rng.random() < 0.7)


def _bodies_spec(rng: random.Random, kind: int) -> Spec:
    spec = Spec(kind, body(rng), _id(rng), _ts(rng), canonical=rng.random() < 0.7)
    roll = rng.random()
    if roll < 0.2:
        spec.form, spec.body = "batch", [body(rng) for _ in range(rng.randrange(0, 6))]
    elif roll < 0.3:
        spec.form, spec.raw, spec.headers = "two", True, {"enc": "raw"}
        spec.body = rng.randbytes(rng.randrange(100))
    elif roll < 0.35:
        spec.form = "two"
    elif roll < 0.4:
        spec.headers = {"h": 1}
    return spec


def message(rng: random.Random) -> Spec:
    """A pipeline message (kind 5): one frame, a batch, or header and (raw) body frames."""
    return _bodies_spec(rng, MESSAGE)


def event(rng: random.Random) -> Spec:
    """A stream event (kind 4) on one of a few topics (``topic NUL message``)."""
    spec = _bodies_spec(rng, EVENT)
    spec.topic = rng.choice([b"t", b"", b"prices.EUR", "é".encode(), b"x" * 1024])
    return spec


def task_item(rng: random.Random) -> list[Any]:
    return [f"t-{rng.getrandbits(32):x}", rng.randrange(1, 6), body(rng),
            rng.choice([None, "key-1", "k" * 256])]


def task(rng: random.Random) -> Spec:
    """A producer's message to a worker: a credit request or tasks, ``["", header, body]``
    (now and then one frame, which PROTOCOL.md 7.4 says a worker accepts as well)."""
    if rng.random() < 0.3:
        spec = Spec(CREDIT, {"from": "fz-producer"}, 0, _ts(rng))
    else:
        spec = Spec(TASK, [task_item(rng) for _ in range(rng.randrange(1, 4))], 0, _ts(rng))
    spec.envelope = [b""]
    spec.form = "two" if rng.random() < 0.9 else "one"
    spec.canonical = rng.random() < 0.8
    return spec


def result_item(rng: random.Random) -> list[Any]:
    """A result for a task the producer never gave out (it counts it as late)."""
    ok = rng.random() < 0.7
    value = body(rng) if ok else {"type": "ValueError", "message": "fuzzed"}
    return [f"t-{rng.getrandbits(48):x}", rng.randrange(1, 6), ok, value]


def result(rng: random.Random) -> Spec:
    """A worker's message to a producer: a grant or results, ``["", header, body]`` as the
    producer's DEALER receives it (now and then one frame, as PROTOCOL.md 7.4 allows)."""
    if rng.random() < 0.3:
        grant: dict[str, Any] = {"credit": rng.randint(1, 65535)}
        if rng.random() < 0.7:
            grant["slots"] = rng.randint(1, 16)
        spec = Spec(CREDIT, grant, 0, _ts(rng))
    else:
        spec = Spec(RESULT, [result_item(rng) for _ in range(rng.randrange(1, 4))], 0, _ts(rng))
    spec.envelope = [b""]
    spec.form = "two" if rng.random() < 0.9 else "one"
    spec.canonical = rng.random() < 0.8
    return spec

