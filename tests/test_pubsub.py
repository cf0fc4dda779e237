"""Publish/subscribe across real processes: subscribers that start before and after the publisher,
and topic-prefix filtering; in one process, the subscriber count (``Publisher.wait_subscribers``)
and its promise that nothing published after it returns is lost.

ZeroMQ pub/sub drops what is published before a subscription reaches the publisher, so the
multi-process tests use a handshake: the publisher sends ``ctl.ping`` until every subscriber has
reported one, and only then the numbered data, which must then arrive complete and in order.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from typing import Any, Callable

import msgpack
import pytest
import zmq

import zmqfabric as zf
import zmqfabric.aio
from tests.procs import Child, ProcessGroup
from zmqfabric.core.records import EndpointKind
from zmqfabric.patterns.pubsub import MARKER_PREFIX

pytestmark = pytest.mark.slow

SLOW = 20.0

PRELUDE = """\
import json, os, signal, sys, threading, time
import zmqfabric as zf

def report(**fields):
    print(json.dumps(fields), flush=True)
"""

#: A subscriber process: subscribes to STREAM with TOPICS (None: all), prints READY, waits for a
#: publisher, reports its first ``ctl.ping``, then collects events until ``ctl.end`` and reports
#: them (pings in between are skipped). Uses iteration when ITERATE, recv(timeout) otherwise.
SUBSCRIBER = """
with zf.Node(NAME) as node:
    sub = node.subscribe(STREAM, topics=TOPICS)
    print("READY", flush=True)
    report(event="connected", ok=sub.wait_ready(30.0))
    events = iter(sub) if ITERATE else iter(lambda: sub.recv(timeout=30.0), None)
    for topic, body in events:
        if topic == "ctl.ping":
            report(event="first", body=body)
            break
    received = []
    for topic, body in events:
        if topic == "ctl.end":
            break
        if topic != "ctl.ping":
            received.append([topic, body])
    report(event="done", received=received)
"""


def child_code(body: str, **params: Any) -> str:
    head = "".join(f"{key} = {value!r}\n" for key, value in params.items())
    return PRELUDE + head + textwrap.dedent(body)


def start_subscriber(
    procs: ProcessGroup, name: str, stream: str, topics: list[str] | None = None,
    iterate: bool = False,
) -> Child:
    code = child_code(SUBSCRIBER, NAME=name, STREAM=stream, TOPICS=topics, ITERATE=iterate)
    return procs.python(code, timeout=SLOW)


def handshake(publisher: Any, children: list[Child], timeout: float = SLOW) -> None:
    """Publish ``ctl.ping`` until every child has received one (or fail after ``timeout``)."""
    waiting = {id(child): child for child in children}
    deadline = time.monotonic() + timeout
    n = 0
    while waiting:
        assert time.monotonic() < deadline, "subscribers never received a ping: " + "; ".join(
            child.err_tail() for child in waiting.values()
        )
        publisher.send("ctl.ping", {"n": n})
        n += 1
        for key, child in list(waiting.items()):
            try:
                line = child.json_line(timeout=0.02)
            except TimeoutError:
                continue
            if line["event"] == "connected":
                assert line["ok"], "subscriber found no publisher"
            elif line["event"] == "first":
                del waiting[key]


def finish(child: Child) -> list[list[Any]]:
    """The events a subscriber reported after ``ctl.end``; it must exit 0."""
    line = child.json_line(SLOW)
    assert line["event"] == "done", line
    assert child.wait(SLOW) == 0, child.err_tail()
    return line["received"]


def test_subscribers_before_and_after_the_publisher(procs, make_node, name) -> None:
    stream = name("ticks")
    early = start_subscriber(procs, name("early"), stream)  # no publisher exists yet
    node = make_node("publisher")
    publisher = node.publisher(stream)
    late = start_subscriber(procs, name("late"), stream, iterate=True)

    handshake(publisher, [early, late])
    for n in range(500):
        publisher.send("data", {"n": n, "pad": "x" * (n % 50)})
    publisher.send("ctl.end", None)

    expected = [["data", {"n": n, "pad": "x" * (n % 50)}] for n in range(500)]
    for child in (early, late):
        received = finish(child)
        assert len(received) == 500, f"got {len(received)} of 500 events"
        assert received == expected


def test_topic_prefix_filtering(procs, make_node, name) -> None:
    stream = name("prices")
    node = make_node("publisher")
    publisher = node.publisher(stream)
    eur = start_subscriber(procs, name("eur"), stream, topics=["EUR", "ctl."])
    # A second filter on another node, in this process: filters are per subscription.
    local = make_node("local").subscribe(stream, topics=["USD", "ctl.end"])
    assert local.wait_ready(SLOW)

    handshake(publisher, [eur])
    # The local subscription may have connected later than the child: ping it in too.
    local_ready = False
    deadline = time.monotonic() + SLOW
    while not local_ready:
        assert time.monotonic() < deadline, "local subscription never received an event"
        publisher.send("USD.ping", None)
        try:
            local_ready = local.recv(timeout=0.05)[0] == "USD.ping"
        except zf.FabricTimeoutError:
            pass
    while True:  # drop queued pings
        try:
            local.recv(timeout=0.05)
        except zf.FabricTimeoutError:
            break

    topics = ["EURUSD", "USDJPY", "EURGBP", "GBPEUR", "EU", "eurusd", "XEUR", "USD", "EUR"]
    sent: list[list[Any]] = []
    for i in range(300):
        topic = topics[i % len(topics)]
        publisher.send(topic, {"i": i})
        sent.append([topic, {"i": i}])
    publisher.send("ctl.end", None)

    assert finish(eur) == [event for event in sent if event[0].startswith("EUR")]
    got: list[list[Any]] = []
    while True:
        topic, body = local.recv(timeout=SLOW)
        if topic == "ctl.end":
            break
        got.append([topic, body])
    assert got == [event for event in sent if event[0].startswith("USD")]


def test_subscription_receives_every_publisher_of_a_stream(procs, make_node, name) -> None:
    """One stream, two publishers on two nodes (one appears after the subscriber is up): the
    subscription connects to both and receives from both."""
    stream = name("multi")
    sub_node = make_node("sub")
    first = make_node("pub-a").publisher(stream)
    sub = sub_node.subscribe(stream)
    assert sub.wait_ready(SLOW)
    second = make_node("pub-b").publisher(stream)

    seen: set[str] = set()
    deadline = time.monotonic() + SLOW
    while seen != {"a", "b"}:
        assert time.monotonic() < deadline, f"only heard from {seen}"
        first.send("from", "a")
        second.send("from", "b")
        try:
            seen.add(sub.recv(timeout=0.05)[1])
        except zf.FabricTimeoutError:
            pass


def wait_count(publisher: Any, n: int, timeout: float = SLOW) -> None:
    """Wait until ``publisher.subscribers == n`` (a count that goes down: wait_subscribers waits
    for at least n)."""
    deadline = time.monotonic() + timeout
    while (count := publisher.subscribers) != n:
        assert time.monotonic() < deadline, f"{count} subscribers, not {n}, after {timeout} s"
        publisher._sock.poll(20)  # wakes when a subscription message arrives


def test_events_published_right_after_wait_subscribers_arrive(make_node, name) -> None:
    """The promise of ``wait_subscribers``, taken literally: publish the moment it returns. Each
    round adds a sync and an asyncio subscriber (the earlier ones stay, so the count only grows)
    and sends three events at once; both must get all three. Without the markers (counting
    connections, or waiting in ``wait_ready``) about half of the rounds lost the first events."""
    stream = name("promise")
    publisher = make_node("pub").publisher(stream)
    sub_node = make_node("sub")
    assert sub_node.wait_for_endpoint(EndpointKind.STREAM, stream, SLOW) == 1
    rounds = 30

    async def main() -> list[tuple[int, str, list[Any]]]:
        lost: list[tuple[int, str, list[Any]]] = []
        subs: list[Any] = []
        async with zmqfabric.aio.Node(name("aiosub")) as aio_node:
            assert await aio_node.wait_for_endpoint(EndpointKind.STREAM, stream, SLOW) == 1
            try:
                for trial in range(rounds):
                    sync_sub = sub_node.subscribe(stream, topics=[f"t{trial}."])
                    async_sub = aio_node.subscribe(stream, topics=[f"t{trial}."])
                    subs += [sync_sub, async_sub]
                    # Blocks the loop: fine, the asyncio subscription's connection and
                    # subscription are libzmq's work, done in its own threads.
                    assert publisher.wait_subscribers(len(subs), SLOW) == len(subs)
                    for i in range(3):
                        publisher.send(f"t{trial}.x", i)
                    got_sync: list[Any] = []
                    got_async: list[Any] = []
                    try:
                        while len(got_sync) < 3:
                            got_sync.append(sync_sub.recv(timeout=2.0)[1])
                        while len(got_async) < 3:
                            got_async.append((await async_sub.recv(timeout=2.0))[1])
                    except zf.FabricTimeoutError:
                        pass
                    if got_sync != [0, 1, 2]:
                        lost.append((trial, "sync", got_sync))
                    if got_async != [0, 1, 2]:
                        lost.append((trial, "asyncio", got_async))
            finally:
                for sub in subs:
                    sub.close()
        return lost

    lost = asyncio.run(asyncio.wait_for(main(), 4 * SLOW))
    assert not lost, f"events published right after wait_subscribers() were lost: {lost}"
    wait_count(publisher, 0)  # every subscriber closed: none counts any more


def test_a_subscriber_leaving_lowers_the_count(make_node, name) -> None:
    """Closing a subscription, or its whole node, unsubscribes its marker: the count drops, and
    the subscriber that stays still counts and still receives."""
    stream = name("leave")
    publisher = make_node("pub").publisher(stream)
    assert publisher.subscribers == 0
    stay = make_node("stay").subscribe(stream)
    leave = make_node("leave").subscribe(stream, topics=["x"])
    gone_node = make_node("gone")
    gone = gone_node.subscribe(stream)
    assert publisher.wait_subscribers(3, SLOW) == 3
    assert publisher.wait_subscribers(1, 0) == 3  # at least n: returns at once
    assert stay.marker != leave.marker != gone.marker

    leave.close()
    wait_count(publisher, 2)
    gone_node.close()
    wait_count(publisher, 1)
    publisher.send("after", "the others left")
    assert stay.recv(timeout=SLOW) == ("after", "the others left")
    assert publisher.wait_subscribers(2, 0.05) == 1


def test_a_plain_zeromq_sub_receives_and_counts_once_it_subscribes_a_marker(
    make_node: Callable[..., zf.Node], name: Callable[[str], str]
) -> None:
    """The publisher's XPUB behaves as a PUB for a raw pyzmq SUB (no fabric import needed on
    that side): it receives the events of its topics. It is not counted until it subscribes, last,
    to a marker of its own as the wire spec describes; then an event sent at once arrives."""
    node = make_node("pub")
    stream = name("raw")
    publisher = node.publisher(stream)
    record = node.record
    endpoint = record.find(EndpointKind.STREAM, stream)
    assert endpoint is not None
    with zmq.Context() as ctx, ctx.socket(zmq.SUB) as sub:
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"EUR")
        sub.connect(record.url(endpoint))
        deadline = time.monotonic() + SLOW
        while not sub.poll(20):
            assert time.monotonic() < deadline, "the raw SUB never received an event"
            publisher.send("EURUSD", 1.1)
        topic, _, message = sub.recv().partition(b"\x00")  # one frame: topic NUL message
        assert topic == b"EURUSD" and msgpack.unpackb(message)[4] == 1.1
        assert publisher.subscribers == 0  # no marker, not counted

        sub.setsockopt(zmq.SUBSCRIBE, b"USD")
        sub.setsockopt(zmq.SUBSCRIBE, MARKER_PREFIX + b"00000000deadbeef")
        assert publisher.wait_subscribers(1, SLOW) == 1
        publisher.send("USDJPY", 150)
        assert sub.poll(int(SLOW * 1000)), "the event sent right after the count never came"
        while (frame := sub.recv()).startswith(b"EURUSD\x00"):  # pings still queued
            assert sub.poll(int(SLOW * 1000))
        assert frame.startswith(b"USDJPY\x00")
        sub.close(0)
    wait_count(publisher, 0)


def test_a_topic_starting_like_a_marker_is_refused(make_node, name) -> None:
    node = make_node("sub")
    with pytest.raises(zf.LocalProtocolError, match="marker"):
        node.subscribe(name("s"), topics=["ok", MARKER_PREFIX + b"x"])  # type: ignore[list-item]


def test_recv_timeout_and_message_metadata(make_node, name) -> None:
    node = make_node("node")
    stream = name("quiet")
    publisher = node.publisher(stream)
    sub = make_node("sub").subscribe(stream)
    assert sub.wait_ready(SLOW)

    start = time.monotonic()
    with pytest.raises(zf.FabricTimeoutError) as info:
        sub.recv(timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 3.0
    assert info.value.timeout == 0.2
    assert sub.recv_message(timeout=0.05) is None

    deadline = time.monotonic() + SLOW
    while (message := sub.recv_message(timeout=0.05)) is None:
        assert time.monotonic() < deadline
        publisher.send("t.1", {"k": "v"})
    assert isinstance(message, zf.Message)
    assert message.topic == "t.1" and message.body == {"k": "v"}


def test_publisher_leaving_with_events_queued_does_not_abort_the_subscriber(procs) -> None:
    """libzmq aborts the process (assertion ``!_more``, libzmq #2163) when a SUB disconnects a
    pipe that still holds a multipart message; the subscription must read its queued input before
    it applies the disconnect. Run in a child process: the bug would kill it, not the test run."""
    child = procs.python(
        """
        import os, secrets, time, msgpack, zmq
        import zmqfabric as zf
        from zmqfabric.core import wire
        from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord
        with zf.Node("leaver-sub-%d" % os.getpid()) as node, zmq.Context() as ctx:
            pub = ctx.socket(zmq.PUB); pub.linger = 0
            port = pub.bind_to_random_port("tcp://127.0.0.1")
            record = NodeRecord("leaver-pub-%d" % os.getpid(), secrets.token_hex(8), "h",
                                os.getpid(), "127.0.0.1",
                                (Endpoint(EndpointKind.STREAM, "queued", port),), 1)
            node.directory.put(record)
            sub = node.subscribe("queued")
            assert sub.wait_ready(10)
            deadline = time.monotonic() + 10
            header = wire.pack_header(wire.Kind.EVENT, 1, time.time())
            while sub.recv_message(timeout=0.05) is None:
                assert time.monotonic() < deadline
                pub.send_multipart([b"t\\x00" + header, msgpack.packb(0)])
            for i in range(50):  # multipart: the two-frame form (header frame, body frame)
                pub.send_multipart([b"t\\x00" + header, msgpack.packb(i)])
            while not sub._sock.get(zmq.EVENTS) & zmq.POLLIN:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            node.directory.remove(record.name, record.node_id)  # the publisher leaves
            got = 0
            while sub.recv_message(timeout=0.5) is not None:
                got += 1
            assert sub._urls == set(), sub._urls  # the disconnect happened once input was read
            print("READY", got, flush=True)
        """,
        ready=False,
    )
    got = int(child.expect("READY", 30))
    assert got > 0
    assert child.wait(10) == 0


def test_events_under_more_topics_than_the_publisher_caches_keep_their_topics_and_order(
    make_node: Callable[..., zf.Node], name: Callable[[str], str]
) -> None:
    """``send`` packs each event's topic, header and timestamp with a per-topic struct kept in a
    bounded cache (cleared when full): across a clear, under a topic seen before it and under
    bytes topics (never cached), every event still carries its own topic, its body and the next
    sequence number; a large bytes body (raw, uncopied) takes one number in the same order."""
    from zmqfabric.constants import ZERO_COPY_THRESHOLD
    from zmqfabric.patterns.publisher import _TOPIC_CACHE

    stream = name("many")
    publisher = make_node("pub").publisher(stream)
    sub = make_node("sub").subscribe(stream, topics=["t"])
    assert publisher.wait_subscribers(1, SLOW) == 1
    big = bytes(range(256)) * (ZERO_COPY_THRESHOLD // 256 + 1)
    sent: list[tuple[str, Any]] = [(f"t{i}", {"i": i}) for i in range(_TOPIC_CACHE + 50)]
    sent += [("t0", "again"), ("t1", big), ("t2", [1, "two"])]
    for topic, body in sent:
        publisher.send(topic, body)
    publisher.send(b"t-bytes", "a bytes topic")  # type: ignore[arg-type]
    sent.append(("t-bytes", "a bytes topic"))
    got = [sub.recv_message(timeout=SLOW) for _ in sent]
    assert [(m.topic, m.body) for m in got if m is not None] == sent
    ids = [m.msg_id for m in got if m is not None]
    assert ids == list(range(ids[0], ids[0] + len(sent)))
