"""Batches of a pipeline (docs/PROTOCOL.md 5.7) and large raw bodies, against real sockets.

``send_many`` packs each run of bodies with one msgpack call and cuts a run that would pack over
16 KiB (the receivers' decode bound) to the share that fits; the frames are read here off a plain
PULL socket, so the layout is checked as it goes on the wire. ``recv`` hands a batch out body by
body, ``recv_many`` as it came; a closed puller hands out nothing more. A raw body of 64 KiB or
more arrives as a memoryview over the received frame (no copy) from a puller made with
``copy=False``, as bytes otherwise.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
import zmq

import zmqfabric as zf
from tests.helpers import RawSockets, advertise_raw
from zmqfabric.constants import DECODE_CHECK_SIZE, MAX_BATCH, ZERO_COPY_THRESHOLD
from zmqfabric.core import wire
from zmqfabric.core.records import EndpointKind

SLOW = 20.0


def _raw_sink(node: zf.Node, raw: RawSockets, pipeline: str) -> zmq.Socket:
    """A plain PULL socket entered in ``node``'s directory as a puller of ``pipeline``."""
    pull = raw(zmq.PULL, bind=True)
    pull.setsockopt(zmq.RCVTIMEO, int(SLOW * 1000))
    advertise_raw(node, EndpointKind.PIPELINE, pipeline, pull, "rawpull")
    return pull


def _frames(pull: zmq.Socket, bodies: int) -> list[tuple[wire.Header, Any]]:
    """Read whole messages until they carry ``bodies`` bodies; each decoded by the parser."""
    got: list[tuple[wire.Header, Any]] = []
    count = 0
    while count < bodies:
        frames = pull.recv_multipart()
        assert len(frames) == 1 or wire.unpack_frame(frames[0])[0].follows
        if len(frames) == 1:
            assert len(frames[0]) <= DECODE_CHECK_SIZE, "a batch over the receivers' decode bound"
        header, body = wire.parse_frames(frames, wire.Kind.MESSAGE)
        got.append((header, body))
        count += len(body) if header.batch else 1
    return got


def test_send_many_cuts_runs_to_the_decode_bound_and_grows_back(make_node, name, raw) -> None:
    """Bodies that pack over 16 KiB per 256 are cut into batches under it; the run length is
    remembered (the next call's first frame is not over) and grows back for smaller bodies. Ids
    are consecutive over frames and calls; every body arrives once, in order."""
    pipeline = name("cut")
    node = make_node("source")
    pull = _raw_sink(node, raw, pipeline)
    pusher = node.pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    wide = [{"i": i, "pad": "x" * 100} for i in range(MAX_BATCH)]  # ~110 bytes each: 28 KiB
    narrow = [i for i in range(3 * MAX_BATCH)]  # 1-3 bytes each
    pusher.send_many(wide, timeout=SLOW)
    pusher.send_many(wide, timeout=SLOW)
    pusher.send_many(narrow, timeout=SLOW)
    got = _frames(pull, 2 * len(wide) + len(narrow))
    bodies = [b for h, body in got for b in (body if h.batch else [body])]
    assert bodies == wide + wide + narrow
    ids = [h.msg_id + k for h, body in got for k in range(len(body) if h.batch else 1)]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    sizes = [len(body) if h.batch else 1 for h, body in got]
    assert all(size <= MAX_BATCH for size in sizes)
    assert len(sizes) >= 4 + 3, sizes  # each call of wide bodies took two frames at least
    assert sizes.count(MAX_BATCH) >= 2, f"the run length did not grow back: {sizes}"


def test_send_many_with_a_bad_body_sends_nothing_and_takes_no_id(make_node, name, raw) -> None:
    """An unencodable body, or one over the limit, anywhere in the list: nothing of the call is
    sent, and the next message's id follows the last one sent."""
    pipeline = name("bad")
    node = make_node("source", config=zf.NodeConfig(max_message_size=1 << 20))
    pull = _raw_sink(node, raw, pipeline)
    pusher = node.pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    pusher.send_many([1, 2, 3], timeout=SLOW)
    with pytest.raises(zf.LocalProtocolError):
        pusher.send_many([4] * 300 + [object()] + [5], timeout=SLOW)
    with pytest.raises(zf.MessageTooLargeError):
        pusher.send_many([6] * 10 + [bytes(2 << 20)], timeout=SLOW)
    with pytest.raises(zf.MessageTooLargeError):
        pusher.send_many([7] * 10 + [["y" * 100_000] * 20], timeout=SLOW)
    pusher.send_many(["after", "after"], timeout=SLOW)
    (first, body), (then, after) = _frames(pull, 5)
    assert body == [1, 2, 3] and after == ["after", "after"]
    assert then.msg_id == first.msg_id + 3
    pull.setsockopt(zmq.RCVTIMEO, 100)
    with pytest.raises(zmq.Again):
        pull.recv()


def test_recv_many_returns_what_came_together(make_node, name) -> None:
    """recv_many: a batch as it came (at most max_count, the rest left for the next receives),
    a lone message alone; it waits and times out as recv does."""
    pipeline = name("many")
    puller = make_node("sink").puller(pipeline)
    pusher = make_node("source").pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    pusher.send_many(list(range(10)), timeout=SLOW)
    pusher.send("alone", timeout=SLOW)
    pusher.send_many(list(range(10, 20)), timeout=SLOW)
    assert puller.recv_many(timeout=SLOW) == list(range(10))
    assert puller.recv_many(timeout=SLOW) == ["alone"]
    assert puller.recv_many(timeout=SLOW, max_count=4) == [10, 11, 12, 13]
    assert puller.recv(timeout=SLOW) == 14
    assert puller.recv_many(timeout=SLOW, max_count=100) == list(range(15, 20))
    with pytest.raises(zf.FabricTimeoutError):
        puller.recv_many(timeout=0.05)


def test_a_closed_puller_hands_out_nothing_more(make_node, name) -> None:
    """The rest of a batch is dropped on close: recv, which hands out pending bodies before it
    looks at anything else, raises ClosedError."""
    pipeline = name("closed")
    puller = make_node("sink").puller(pipeline)
    pusher = make_node("source").pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    pusher.send_many(list(range(10)), timeout=SLOW)
    assert puller.recv(timeout=SLOW) == 0
    puller.close()
    with pytest.raises(zf.ClosedError):
        puller.recv(timeout=SLOW)
    with pytest.raises(zf.ClosedError):
        puller.recv_many(timeout=SLOW)


def test_large_raw_bodies_arrive_as_bytes_by_default(make_node, name) -> None:
    """Without ``copy=False`` a large raw body is bytes, whichever receive takes it: code that
    decodes or slices a body (``json.loads``, ``.decode()``) works at every size."""
    pipeline = name("bigcopy")
    puller = make_node("sink").puller(pipeline)
    pusher = make_node("source").pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    big = b'"' + b"x" * (ZERO_COPY_THRESHOLD + 10) + b'"'
    pusher.send(big, timeout=SLOW)
    pusher.send_many([1, big], timeout=SLOW)
    first = puller.recv(timeout=SLOW)
    assert type(first) is bytes and first == big and len(first.decode()) == len(big)
    assert puller.recv_many(timeout=SLOW) == [1]
    message = puller.recv_message(timeout=SLOW)
    assert message is not None and type(message.body) is bytes and message.body == big


def test_large_raw_bodies_arrive_uncopied(make_node, name) -> None:
    """With ``copy=False`` a bytes body of 64 KiB or more arrives as a memoryview over the
    received frame, by recv, recv_message and in a send_many; a smaller raw frame (another
    sender's) stays bytes."""
    pipeline = name("big")
    puller = make_node("sink").puller(pipeline, copy=False)
    pusher = make_node("source").pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    big = bytes(range(256)) * (ZERO_COPY_THRESHOLD // 256 + 4)
    pusher.send(big, timeout=SLOW)
    pusher.send(memoryview(big), timeout=SLOW)
    pusher.send_many([1, big, 2], timeout=SLOW)
    first = puller.recv(timeout=SLOW)
    assert type(first) is memoryview and type(first.obj) is zmq.Frame and first == big
    message = puller.recv_message(timeout=SLOW)
    assert message is not None and type(message.body) is memoryview and message.body == big
    assert puller.recv_many(timeout=SLOW) == [1]
    third = puller.recv(timeout=SLOW)
    assert type(third) is memoryview and bytes(third) == big
    assert puller.recv(timeout=SLOW) == 2


def test_large_raw_bodies_arrive_uncopied_in_asyncio(aio_make_node, name, raw) -> None:
    """The asyncio puller delivers large raw bodies as the sync one does (bytes by default, a
    memoryview with ``copy=False``), and batches by recv and recv_many (a plain PUSH sends the
    frames as the protocol writes them)."""
    big = bytes(range(256)) * (ZERO_COPY_THRESHOLD // 256 + 4)
    raw_header = msgpack.packb([2, 5 | 16, 1, 1.0, {"enc": "raw"}])

    def batch(first: int, bodies: list[Any]) -> bytes:
        return msgpack.packb([2, 5 | 32, first, 1.0, bodies])

    async def main() -> None:
        async with aio_make_node("sink") as node:
            copying = node.puller(name("aiocopy"))
            push = raw(zmq.PUSH, connect=f"tcp://127.0.0.1:{copying.port}")
            push.send_multipart([raw_header, big])
            body = await copying.recv(timeout=SLOW)
            assert type(body) is bytes and body == big
            puller = node.puller(name("aiobig"), copy=False)
            push = raw(zmq.PUSH, connect=f"tcp://127.0.0.1:{puller.port}")
            push.send_multipart([raw_header, big])
            push.send(batch(2, [1, 2, 3]))
            push.send(batch(5, list(range(5))))
            body = await puller.recv(timeout=SLOW)
            assert type(body) is memoryview and body == big
            assert await puller.recv_many(timeout=SLOW) == [1, 2, 3]
            assert await puller.recv(timeout=SLOW) == 0
            assert await puller.recv_many(timeout=SLOW, max_count=2) == [1, 2]
            assert await puller.recv_many(timeout=SLOW) == [3, 4]
            with pytest.raises(zf.FabricTimeoutError):
                await puller.recv_many(timeout=0.05)

    asyncio.run(main())


def test_a_raw_body_frame_under_the_threshold_stays_bytes(make_node, name, raw) -> None:
    """A plain sender's small raw body (a header frame and a 10-byte raw frame) arrives as
    bytes."""
    pipeline = name("smallraw")
    puller = make_node("sink").puller(pipeline)
    push = raw(zmq.PUSH, connect=f"tcp://127.0.0.1:{puller.port}")
    header = msgpack.packb([2, 5 | 16, 7, 1.0, {"enc": "raw"}])
    push.send_multipart([header, b"0123456789"])
    body = puller.recv(timeout=SLOW)
    assert type(body) is bytes and body == b"0123456789"


def test_stream_batches_deliver_each_event_with_its_topic(make_node, name) -> None:
    """A publisher's send_many reaches a subscription as batches; recv hands out each event
    with the batch's topic, in order, and recv_message goes on with consecutive ids."""
    stream = name("ticks")
    publisher = make_node("pub").publisher(stream)
    sub = make_node("sub").subscribe(stream, ["eur"])
    assert publisher.wait_subscribers(1, SLOW)
    bodies: list[Any] = [{"i": i, "pad": "x" * 60} for i in range(700)]
    publisher.send_many("eur.usd", bodies)
    publisher.send_many("eur.gbp", ["last", "one"])
    got = [sub.recv(timeout=SLOW) for _ in range(600)]
    assert got == [("eur.usd", body) for body in bodies[:600]]
    messages = [sub.recv_message(timeout=SLOW) for _ in range(102)]
    assert None not in messages
    assert [(m.topic, m.body) for m in messages] == (
        [("eur.usd", body) for body in bodies[600:]] + [("eur.gbp", "last"), ("eur.gbp", "one")])
    ids = [m.msg_id for m in messages]
    assert ids == list(range(ids[0], ids[0] + len(ids)))


def test_a_large_raw_body_leaves_behind_the_canonical_raw_header(make_node, name, raw) -> None:
    """The header frame of a raw body is the fixed layout the pullers' fast path tests for
    (PROTOCOL.md 5.2): RAW_PREFIX, the uint64 id, the float64 timestamp, the map. A compact
    encoding is valid but would send every large body down the full parser."""
    pipeline = name("rawhdr")
    node = make_node("source")
    pull = _raw_sink(node, raw, pipeline)
    pusher = node.pusher(pipeline)
    assert pusher.wait_ready(SLOW)
    big = bytes(ZERO_COPY_THRESHOLD)
    pusher.send(big, timeout=SLOW)
    pusher.send_many([1, big], timeout=SLOW)
    for _ in range(2):
        frames = pull.recv_multipart()
        if len(frames) == 1:  # the 1 of send_many
            frames = pull.recv_multipart()
        header = frames[0]
        assert header.startswith(wire.RAW_PREFIX[wire.Kind.MESSAGE]), header
        assert len(header) == wire.RAW_HEADER_SIZE and header.endswith(wire.RAW_MAP)
        assert header[wire.FLOAT64_AT] == wire.FLOAT64 and frames[1] == big
        assert wire.unpack_header(header).raw
