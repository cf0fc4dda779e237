"""Publish/subscribe across real processes: subscribers that start before and after the publisher,
and topic-prefix filtering.

ZeroMQ pub/sub drops what is published before a subscription reaches the publisher, so the tests
use a handshake: the publisher sends ``ctl.ping`` until every subscriber has reported one, and only
then the numbered data, which must then arrive complete and in order.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any

import pytest

import zmqfabric as zf
from tests.procs import Child, ProcessGroup

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


@pytest.mark.xfail(
    strict=True,
    reason="known limit, documented in Subscription.wait_ready: it sees the subscriber's "
    "handshake, the publisher applies the subscription a moment later, so events published at "
    "once are dropped about half the time (an XPUB publisher counting subscriptions would fix it)",
)
def test_events_published_right_after_wait_ready_arrive(make_node, name) -> None:
    """The promise of ``wait_ready``'s docstring, taken literally: publish the moment it returns."""
    stream = name("promise")
    publisher = make_node("pub").publisher(stream)
    sub_node = make_node("sub")
    assert sub_node.wait_for_endpoint("pub", stream, SLOW) == 1
    lost = []
    for trial in range(30):
        with sub_node.subscribe(stream, topics=[f"t{trial}."]) as sub:
            assert sub.wait_ready(SLOW)
            for i in range(3):
                publisher.send(f"t{trial}.x", i)
            got: list[Any] = []
            try:
                while len(got) < 3:
                    got.append(sub.recv(timeout=0.5)[1])
            except zf.FabricTimeoutError:
                pass
        if got != [0, 1, 2]:
            lost.append((trial, got))
            break
    assert not lost, f"events published right after wait_ready() were lost: {lost}"


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
                pub.send_multipart([b"t", header, msgpack.packb(0)])
            for i in range(50):
                pub.send_multipart([b"t", header, msgpack.packb(i)])
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
