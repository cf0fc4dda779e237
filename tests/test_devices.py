"""Forwarding devices: the forwarder (pub/sub hub), the streamer (pipeline hub) and the queue (LRU
request/reply load balancer), found by their node's name (``via=``) through zeroconf on loopback.

Multi-process where it matters: devices, workers, pushers and subscribers run as child processes
(``tests.procs``) that print READY and report with JSON lines; the test process plays the remaining
part. In-process tests cover what needs a handle on the device itself (pause/resume, exact counters,
CPU use). Every wait is bounded; every name is unique to this test run.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import textwrap
import threading
import time
from typing import Any, Callable, Iterator

import pytest
import zmq

import zmqfabric as zf
from tests.helpers import RawSockets, wait_for_event, wait_until
from tests.procs import Child, ProcessGroup
from zmqfabric.core import wire
from zmqfabric.devices import Device, Forwarder, Queue, Streamer

pytestmark = pytest.mark.slow

#: Bound for anything that starts a process or waits on discovery under load.
SLOW = 20.0
#: How long a device thread may take to end once told to.
THREAD_JOIN_S = 5.0
#: Device thread CPU allowed while it has nothing it can do (s of CPU per 0.2 s of wall time).
IDLE_CPU_S = 0.03

PRELUDE = """\
import json, os, signal, sys, threading, time
import zmqfabric as zf

def report(**fields):
    print(json.dumps(fields), flush=True)
"""

#: A device node NAME running DEVICES [(kind, name)] until SIGTERM. WAIT_FOR [(endpoint kind,
#: name)]: wait until the node knows a provider of each before starting the devices (a device
#: restarted while its workers are up).
HUB = """
from zmqfabric.devices import KINDS
node = zf.Node(NAME).start()
for kind, what in WAIT_FOR:
    node.wait_for_endpoint(kind, what, 20.0)
devices = [KINDS[kind](node, what).start() for kind, what in DEVICES]
print("READY", flush=True)
try:
    node.run()
finally:
    for device in devices:
        device.stop()
    node.close()
"""

#: A worker serving SVC: answers {"worker": NAME, "echo": body} after DELAY seconds.
WORKER = """
node = zf.Node(NAME)

@node.reply(SVC)
def handle(body):
    if DELAY:
        time.sleep(DELAY)
    return {"worker": NAME, "echo": body}

node.start()
print("READY", flush=True)
node.run()
node.close()
"""

#: Subscribes to STREAM (through device node VIA, or directly when None); reports its first
#: ``ctl.ping``, then the bodies of every ``data`` event until ``ctl.end``.
SUBSCRIBER = """
with zf.Node(NAME) as node:
    sub = node.subscribe(STREAM, via=VIA)
    print("READY", flush=True)
    report(event="connected", ok=sub.wait_ready(20.0))
    while sub.recv(timeout=20.0)[0] != "ctl.ping":
        pass
    report(event="first")
    received = []
    while True:
        topic, body = sub.recv(timeout=20.0)
        if topic == "ctl.end":
            break
        if topic == "data":
            received.append(body)
    report(event="done", received=received, providers=sub.providers)
"""

#: Pulls PIPE and reports each message as a JSON line, until SIGTERM.
PULLER = """
with zf.Node(NAME) as node:
    inp = node.puller(PIPE)
    print("READY", flush=True)
    while True:
        body = inp.recv(timeout=30.0)
        report(src=body["src"], seq=body["seq"])
"""

#: Pushes COUNT numbered messages into PIPE through device node VIA once connected to it.
PUSHER = """
with zf.Node(NAME) as node:
    out = node.pusher(PIPE, via=VIA)
    print("READY", flush=True)
    ok = out.wait_ready(20.0)
    for seq in range(COUNT):
        out.send({"src": NAME, "seq": seq}, timeout=10.0)
    report(event="sent", ok=ok)
"""

#: Calls SVC through device node VIA COUNT times in a row; reports who answered what.
CLIENT = """
with zf.Node(NAME) as node:
    print("READY", flush=True)
    answers = []
    for n in range(COUNT):
        reply = node.request(SVC, {"from": NAME, "n": n}, timeout=10.0, via=VIA)
        answers.append([reply["worker"], reply["echo"]["n"]])
    report(event="done", answers=answers)
"""


# --- helpers ---------------------------------------------------------------------------------


def code(body: str, **params: Any) -> str:
    head = "".join(f"{key} = {value!r}\n" for key, value in params.items())
    return PRELUDE + head + textwrap.dedent(body)


def spawn(procs: ProcessGroup, body: str, **params: Any) -> Child:
    """Start a child without waiting for it (see :func:`ready`): children start in parallel."""
    return procs.python(code(body, **params), ready=False)


def ready(*children: Child) -> None:
    for child in children:
        child.expect("READY", SLOW)


def hub_code(name: str, devices: list[tuple[str, str]],
             wait_for: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    return {"NAME": name, "DEVICES": devices, "WAIT_FOR": wait_for or []}


def device_stats(node: zf.Node, hub: str, key: str) -> dict[str, Any]:
    """The device section ``key`` ("queue:calc") of node ``hub``'s control "stats" answer."""
    return node.stats(hub)[key]


def wait_providers(node: zf.Node, hub: str, key: str, count: int) -> None:
    """Wait until the device ``key`` on node ``hub`` is connected to ``count`` providers."""
    wait_until(lambda: device_stats(node, hub, key)["providers"] >= count, SLOW,
               f"{key} on {hub} reaching {count} providers")


def thread_cpu(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def cpu_over(thread: threading.Thread, seconds: float = 0.2) -> float:
    before = thread_cpu(thread)
    time.sleep(seconds)
    return thread_cpu(thread) - before


def ping_through(publisher: Any, subscription: Any, timeout: float = SLOW) -> None:
    """Publish ``ctl.ping`` until ``subscription`` gets one (the subscription reached the
    publisher, through the device if any), then drain what is still queued."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "no event reached the subscriber"
        publisher.send("ctl.ping", None)
        if subscription.recv_message(timeout=0.02) is not None:
            break
    while subscription.recv_message(timeout=0.05) is not None:
        pass


@pytest.fixture
def procs(procs: ProcessGroup) -> Iterator[ProcessGroup]:
    """The shared fixture, but teardown signals every child first, so they stop in parallel."""
    yield procs
    for child in procs.children:
        child.signal(signal.SIGTERM)


@pytest.fixture
def devices(make_node: Callable[..., zf.Node]) -> Iterator[Callable[[Device], Device]]:
    """``devices(Forwarder(hub, "x"))`` starts it; every device is stopped before the nodes
    close (this fixture depends on ``make_node``, so it is torn down first)."""
    started: list[Device] = []

    def start(device: Device) -> Device:
        started.append(device)
        return device.start()

    yield start
    for device in reversed(started):
        device.stop()


@pytest.fixture
def make_worker(name) -> Iterator[Callable[..., zf.Node]]:
    """``make_worker(svc, delay=0.0)``: a started node serving ``svc`` in a background thread
    (answers ``{"worker": node name, "echo": body}``); closed after the test."""
    nodes: list[zf.Node] = []

    def make(svc: str, delay: float = 0.0) -> zf.Node:
        node = zf.Node(name("worker"))
        nodes.append(node)

        @node.reply(svc)
        def handle(body: Any) -> Any:
            if delay:
                time.sleep(delay)
            return {"worker": node.name, "echo": body}

        node.start().serve_in_background()
        return node

    yield make
    for node in nodes:
        node.close()


# --- traffic through each device, between processes ------------------------------------------


def test_forwarder_relays_between_processes_each_event_exactly_once(procs, make_node,
                                                                    name) -> None:
    """A publisher (this process), a forwarder process and three subscriber processes: two via
    the forwarder, one direct. Every subscriber gets every event exactly once, in order: the via
    subscribers are not also connected to the publisher, and the direct one is not connected to
    the forwarder."""
    hub, stream = name("hub"), name("prices")
    hub_child = spawn(procs, HUB, **hub_code(hub, [("forwarder", stream)]))
    subs = [spawn(procs, SUBSCRIBER, NAME=name("viasub"), STREAM=stream, VIA=hub)
            for _ in range(2)]
    direct = spawn(procs, SUBSCRIBER, NAME=name("directsub"), STREAM=stream, VIA=None)
    ready(hub_child, *subs, direct)
    publisher = make_node("publisher").publisher(stream)

    waiting = {id(child): child for child in [*subs, direct]}
    deadline = time.monotonic() + SLOW
    while waiting:  # publish pings until every subscriber has one (through the forwarder too)
        assert time.monotonic() < deadline, "subscribers never got a ping: " + "; ".join(
            child.err_tail() for child in waiting.values())
        publisher.send("ctl.ping", None)
        for key, child in list(waiting.items()):
            with contextlib.suppress(TimeoutError):
                line = child.json_line(timeout=0.01)
                assert line["event"] != "connected" or line["ok"], (
                    f"a subscriber found no provider in 20 s: {child.err_tail()}")
                if line["event"] == "first":
                    del waiting[key]
    events = 300
    for seq in range(events):
        publisher.send("data", seq)
    publisher.send("ctl.end", None)

    for child in [*subs, direct]:
        line = child.json_line(SLOW)
        assert line["event"] == "done", line
        assert line["received"] == list(range(events)), (
            f"expected each of {events} events once, got {len(line['received'])}: "
            f"{collections.Counter(line['received']).most_common(3)}")
        assert line["providers"] == 1, "a subscriber is connected to more than its one provider"
        assert child.wait(SLOW) == 0, child.err_tail()
    observer = make_node("observer")
    stats = device_stats(observer, hub, f"forwarder:{stream}")
    assert stats["providers"] == 1 and stats["state"] == "running"
    # Everything the forwarder took in went out (to both via subscribers at once), in whole
    # one-frame events ("topic NUL message"), and at least the data events and the end marker did.
    assert stats["front_frames_out"] == stats["back_frames_in"]
    assert stats["front_frames_out"] >= events + 1


def test_streamer_deals_from_pusher_processes_to_puller_processes(procs, make_node,
                                                                   name) -> None:
    hub, pipe = name("hub"), name("jobs")
    hub_child = spawn(procs, HUB, **hub_code(hub, [("streamer", pipe)]))
    pullers = [spawn(procs, PULLER, NAME=name("puller"), PIPE=pipe) for _ in range(2)]
    ready(hub_child, *pullers)
    observer = make_node("observer")
    wait_providers(observer, hub, f"streamer:{pipe}", 2)  # so that both get a share

    count = 150
    sources = [name("pusher"), name("pusher")]
    pushers = [spawn(procs, PUSHER, NAME=src, PIPE=pipe, VIA=hub, COUNT=count)
               for src in sources]
    ready(*pushers)
    for child in pushers:
        line = child.json_line(SLOW)
        assert line == {"event": "sent", "ok": True}, line
    got: dict[int, list[tuple[str, int]]] = {id(p): [] for p in pullers}
    deadline = time.monotonic() + SLOW
    while sum(map(len, got.values())) < 2 * count:
        assert time.monotonic() < deadline, f"{sum(map(len, got.values()))} of {2 * count} pulled"
        for child in pullers:
            with contextlib.suppress(TimeoutError):
                line = child.json_line(timeout=0.02)
                got[id(child)].append((line["src"], line["seq"]))
    everything = sorted(item for items in got.values() for item in items)
    assert everything == sorted((src, seq) for src in sources for seq in range(count))
    for items in got.values():  # both pullers connected: the streamer deals round robin
        assert len(items) >= 0.3 * 2 * count, {k: len(v) for k, v in got.items()}
    stats = device_stats(observer, hub, f"streamer:{pipe}")
    assert stats["front_frames_in"] == stats["back_frames_out"] == 2 * count  # one frame each


def test_queue_between_client_processes_and_worker_processes(procs, make_node, name) -> None:
    hub, svc = name("hub"), name("calc")
    hub_child = spawn(procs, HUB, **hub_code(hub, [("queue", svc)]))
    ready(hub_child)
    workers = [spawn(procs, WORKER, NAME=name("worker"), SVC=svc, DELAY=0.0) for _ in range(2)]
    ready(*workers)
    observer = make_node("observer")
    wait_providers(observer, hub, f"queue:{svc}", 2)

    count = 20
    clients = [spawn(procs, CLIENT, NAME=name("client"), SVC=svc, VIA=hub, COUNT=count)
               for _ in range(3)]
    ready(*clients)
    served: collections.Counter[str] = collections.Counter()
    for child in clients:
        line = child.json_line(SLOW)
        assert line["event"] == "done", line
        assert [n for _, n in line["answers"]] == list(range(count))
        served.update(worker for worker, _ in line["answers"])
        assert child.wait(SLOW) == 0, child.err_tail()
    assert sum(served.values()) == 3 * count
    assert len(served) == 2, f"one worker served everything: {served}"
    stats = device_stats(observer, hub, f"queue:{svc}")
    # A request is [client id, "", message] at the front end; a reply the same.
    assert stats["front_frames_in"] == stats["back_frames_out"] == 3 * 3 * count
    assert stats["back_frames_in"] == stats["front_frames_out"] == 3 * 3 * count


# --- the queue's routing ----------------------------------------------------------------------


def _spread(node: zf.Node, svc: str, via: str | None, clients: int = 4,
            each: int = 15) -> collections.Counter[str]:
    """Who answered ``clients`` threads that each call ``svc`` ``each`` times (after two
    uncounted warm-up calls that let every requester connect)."""
    served: collections.Counter[str] = collections.Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            for n in range(2 + each):
                reply = node.request(svc, n, timeout=10.0, via=via)
                if n >= 2:
                    with lock:
                        served[reply["worker"]] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, name=f"test-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SLOW)
    assert not any(t.is_alive() for t in threads), "clients did not finish"
    assert not errors, errors
    assert sum(served.values()) == clients * each
    return served


def test_queue_gives_work_to_idle_workers_first(procs, make_node, name) -> None:
    """One worker takes 50 ms a request, the other 1 ms; four concurrent clients. Through the
    queue the fast worker gets the large majority; direct round robin splits ~50/50."""
    hub, svc = name("hub"), name("calc")
    slow, fast = name("slow"), name("fast")
    hub_child = spawn(procs, HUB, **hub_code(hub, [("queue", svc)]))
    ready(hub_child)
    workers = [spawn(procs, WORKER, NAME=slow, SVC=svc, DELAY=0.05),
               spawn(procs, WORKER, NAME=fast, SVC=svc, DELAY=0.001)]
    ready(*workers)
    node = make_node("clients")
    wait_providers(node, hub, f"queue:{svc}", 2)
    node.wait_for_node(hub, SLOW)

    through_queue = _spread(node, svc, via=hub)
    share = through_queue[fast] / sum(through_queue.values())
    assert share >= 0.75, f"fast worker got {share:.0%} through the queue: {through_queue}"

    # The control case: the same clients without the device round robin over both workers.
    assert node.directory.wait_for(
        lambda: len(node.directory.providers(zf.EndpointKind.REPLY, svc)) == 2, SLOW)
    direct = _spread(node, svc, via=None)
    direct_share = direct[fast] / sum(direct.values())
    assert 0.35 <= direct_share <= 0.65, f"round robin gave the fast worker {direct_share:.0%}"


def test_queue_uses_workers_known_before_it_starts(make_node, make_worker, devices,
                                                   name) -> None:
    """A queue started on a node that already knows the service's workers must use them.

    Regression test: ``Device.start`` calls ``directory.watch`` before the device thread runs,
    so the initial "connect" ops are queued while ``Queue._interrupt`` does nothing; until
    e18d238 ``Queue._relay`` applied ops only after a steering command and every request
    through such a queue timed out."""
    svc = name("calc")
    worker = make_worker(svc)
    hub = make_node("hub")
    hub.wait_for_endpoint(zf.EndpointKind.REPLY, svc, SLOW)
    devices(Queue(hub, svc))
    client = make_node("client")
    client.wait_for_node(hub.name, SLOW)
    assert client.request(svc, 7, timeout=2.0, via=hub.name) == {"worker": worker.name, "echo": 7}


# --- a device killed and restarted ------------------------------------------------------------


def _until(attempt: Callable[[int], bool], phase: int, what: str, timeout: float) -> float:
    """Call ``attempt(phase)`` (itself bounded) until it returns True; the seconds it took."""
    start = time.monotonic()
    while not attempt(phase):
        assert time.monotonic() - start < timeout, f"{what} did not resume within {timeout} s"
    return time.monotonic() - start


def test_device_killed_and_restarted_is_found_again(procs, make_node, make_worker,
                                                    name) -> None:
    """SIGKILL a device process (no goodbye) and start another under the same node name: the
    clients' handles, never remade, find it and traffic resumes through all three devices.
    Messages and requests sent during the gap may be lost or time out."""
    hub, svc, stream, pipe = name("hub"), name("calc"), name("prices"), name("jobs")
    kinds = [("queue", svc), ("forwarder", stream), ("streamer", pipe)]
    first = spawn(procs, HUB, **hub_code(hub, kinds))
    ready(first)
    backend = make_worker(svc)  # serves svc, publishes stream, pulls pipe
    publisher, puller = backend.publisher(stream), backend.puller(pipe)
    client = make_node("client")
    for label, what in kinds:
        wait_providers(client, hub, f"{label}:{what}", 1)
    sub = client.subscribe(stream, via=hub)
    pusher = client.pusher(pipe, via=hub)

    def event_arrives(phase: int) -> bool:
        publisher.send("data", phase)
        message = sub.recv_message(timeout=0.05)
        return message is not None and message.body == phase

    def message_arrives(phase: int) -> bool:
        with contextlib.suppress(zf.NoProviderError):
            pusher.send({"phase": phase}, timeout=0.1)
        while (message := puller.recv_message(timeout=0.05)) is not None:
            if message.body == {"phase": phase}:
                return True
        return False

    def answer_arrives(phase: int) -> bool:
        try:
            return client.request(svc, phase, timeout=0.5, via=hub)["echo"] == phase
        except (zf.RequestTimeoutError, zf.NoProviderError):
            return False

    checks = [("pub/sub through the forwarder", event_arrives),
              ("push/pull through the streamer", message_arrives),
              ("request/reply through the queue", answer_arrives)]
    for what, check in checks:
        _until(check, 1, what, SLOW)
    old_pid = client.ping(hub)["pid"]

    first.kill()
    assert first.wait(SLOW) == -signal.SIGKILL
    # The new device process starts while its workers, publisher and puller are up.
    second = spawn(procs, HUB, **hub_code(
        hub, kinds, wait_for=[("rep", svc), ("pub", stream), ("pull", pipe)]))
    ready(second)
    took = {what: _until(check, 2, what, 10.0) for what, check in checks}
    assert client.ping(hub)["pid"] == second.proc.pid != old_pid
    print("resumed after", {k: round(v, 2) for k, v in took.items()})


# --- statistics -------------------------------------------------------------------------------

_COUNTERS = ("front_frames_in", "front_bytes_in", "front_frames_out", "front_bytes_out",
             "back_frames_in", "back_bytes_in", "back_frames_out", "back_bytes_out")


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in _COUNTERS}


def test_statistics_count_every_part(make_node, make_worker, devices, raw, name) -> None:
    """The counters in the hub's control "stats" answer match the traffic exactly: parts as
    libzmq's proxy counts them (one-frame events "topic NUL message", two-frame pipeline
    messages from a raw PUSH, [client id, "", message] requests and replies at the queue) and
    their bytes."""
    svc, stream, pipe = name("calc"), name("prices"), name("jobs")
    hub = make_node("hub")
    devices(Queue(hub, svc))
    devices(Forwarder(hub, stream))
    devices(Streamer(hub, pipe))
    worker = make_worker(svc)
    producer = make_node("producer")
    publisher, puller = producer.publisher(stream), producer.puller(pipe)
    client = make_node("client")
    for key in (f"queue:{svc}", f"forwarder:{stream}", f"streamer:{pipe}"):
        wait_providers(client, hub.name, key, 1)
    header = len(wire.pack_header(wire.Kind.EVENT, 2**40, time.time()))  # fixed size
    count = 100

    # Forwarder: count events after the subscription is known to have reached the publisher.
    sub = client.subscribe(stream, via=hub.name)
    assert sub.wait_ready(SLOW)
    ping_through(publisher, sub)
    # Its marker, subscribed after its topics, has passed the forwarder too: nothing more comes in
    # at the front end while the events are counted.
    assert publisher.wait_subscribers(1, SLOW) == 1
    before = device_stats(client, hub.name, f"forwarder:{stream}")
    size = sum(len(wire.encode_topic("data")) + 1 + header + len(wire.pack_body(n))
               for n in range(count))  # one frame: topic NUL message
    for n in range(count):
        publisher.send("data", n)
    assert [sub.recv(timeout=SLOW)[1] for _ in range(count)] == list(range(count))
    after = device_stats(client, hub.name, f"forwarder:{stream}")
    assert _delta(before, after) == {
        "front_frames_in": 0, "front_bytes_in": 0, "front_frames_out": count,
        "front_bytes_out": size, "back_frames_in": count, "back_bytes_in": size,
        "back_frames_out": 0, "back_bytes_out": 0}
    assert after["front_frames_in"] >= 1 and after["back_frames_out"] == after["front_frames_in"]

    # Streamer: a raw PUSH sends known frames; a second puller in the middle restarts the
    # proxy (its counters are carried over).
    url = client.directory.providers(zf.EndpointKind.STREAMER, pipe, hub.name)[0]
    frames = [[wire.pack_header(wire.Kind.MESSAGE, n + 1, time.time()), wire.pack_body({"n": n})]
              for n in range(2 * count)]
    size = sum(len(part) for message in frames for part in message)
    got: list[Any] = []
    with raw(zmq.PUSH, connect=url) as push:
        for message in frames[:count]:
            push.send_multipart(message)
        got += [puller.recv(timeout=SLOW) for _ in range(count)]
        second = make_node("producer").puller(pipe)
        wait_providers(client, hub.name, f"streamer:{pipe}", 2)
        for message in frames[count:]:
            push.send_multipart(message)
        deadline = time.monotonic() + SLOW
        while len(got) < 2 * count and time.monotonic() < deadline:
            for inp in (puller, second):
                if (message := inp.recv_message(timeout=0.01)) is not None:
                    got.append(message.body)
    assert sorted(m["n"] for m in got) == list(range(2 * count))
    stats = device_stats(client, hub.name, f"streamer:{pipe}")
    assert {k: stats[k] for k in _COUNTERS} == {
        "front_frames_in": 2 * 2 * count, "front_bytes_in": size, "front_frames_out": 0,
        "front_bytes_out": 0, "back_frames_in": 0, "back_bytes_in": 0,
        "back_frames_out": 2 * 2 * count, "back_bytes_out": size}

    # Queue: ROUTER ids are 5 bytes; requests and replies are [id, "", message]: the header
    # (21 bytes), the body and (requests) the service map, in one frame.
    before = device_stats(client, hub.name, f"queue:{svc}")
    for n in range(count):
        assert client.request(svc, n, timeout=SLOW, via=hub.name)["echo"] == n
    after = device_stats(client, hub.name, f"queue:{svc}")
    named = header + len(wire.service_tail(svc))  # a request's header names its service
    asked = sum(5 + named + len(wire.pack_body(n)) for n in range(count))
    answered = sum(5 + header + len(wire.pack_body({"worker": worker.name, "echo": n}))
                   for n in range(count))
    assert _delta(before, after) == {
        "front_frames_in": 3 * count, "front_bytes_in": asked, "front_frames_out": 3 * count,
        "front_bytes_out": answered, "back_frames_in": 3 * count, "back_bytes_in": answered,
        "back_frames_out": 3 * count, "back_bytes_out": asked}


def test_forwarder_counts_survive_back_end_changes(make_node, devices, name) -> None:
    """Publishers that come and go restart the proxy under traffic; no relayed part may go
    uncounted.

    Bug: ``ProxyDevice._interrupt`` reads STATISTICS and then sends TERMINATE while the proxy
    keeps relaying; whatever it relays in between (often thousands of parts when the GIL delays
    the second command) is lost from the counters."""
    stream = name("prices")
    hub = make_node("hub")
    forwarder = devices(Forwarder(hub, stream))
    publisher = make_node("publisher").publisher(stream)
    other = make_node("other")
    sub = make_node("client").subscribe(stream, via=hub.name)
    assert sub.wait_ready(SLOW)
    ping_through(publisher, sub)
    before = forwarder.statistics()

    # Each open and close of a second publisher changes the forwarder's back end, which
    # restarts the proxy (from discovery's thread) while this thread keeps publishing.
    sent = received = 0
    extra: Any = None
    for _ in range(12):
        if extra is None:
            extra = other.publisher(stream)
        else:
            extra.close()
            extra = None
        for _ in range(10):
            for _ in range(200):
                publisher.send("data", sent)
                sent += 1
            while sub.recv_message(timeout=0) is not None:
                received += 1
    deadline = time.monotonic() + SLOW
    while received < sent and time.monotonic() < deadline:
        if sub.recv_message(timeout=0.1) is not None:
            received += 1
    assert received == sent
    counted = forwarder.statistics()
    assert counted.back_frames_in - before.back_frames_in == sent, "parts relayed uncounted"
    assert counted.front_frames_out - before.front_frames_out == sent



@pytest.mark.parametrize("kind", ["streamer", "queue"])
def test_statistics_answer_promptly_while_the_back_end_changes(kind, make_node, make_worker,
                                                                devices, name) -> None:
    """Every statistics call is answered in well under its 2 s timeout while providers come
    and go.

    Bug: discovery's thread called the device's watcher under the directory lock and waited
    there for the device thread, which needed that lock (a peer's CURVE key) or the steering
    lock held by a statistics call waiting for the device thread: each call could stall 2 s
    and then fail (CI failure of test_pause_holds_traffic_until_resume[streamer])."""
    what = name(kind)
    hub = make_node("hub")
    device = devices((Streamer if kind == "streamer" else Queue)(hub, what))
    providers = make_node("provider")
    slowest = 0.0
    for _ in range(15):
        if kind == "streamer":
            handle: Any = providers.puller(what)
        else:  # services are fixed at start: a worker node comes and goes
            handle = zf.Node(name("worker"))
            handle.reply(what)(lambda body: body)
            handle.start()
        for _ in range(3):
            started = time.monotonic()
            device.statistics()
            slowest = max(slowest, time.monotonic() - started)
        handle.close()
        started = time.monotonic()
        device.statistics()
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 1.0, f"a statistics call took {slowest:.2f} s"

# --- pause and resume -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forwarder", "streamer", "queue"])
def test_pause_holds_traffic_until_resume(kind, make_node, make_worker, devices, name) -> None:
    """While paused nothing is delivered; after resume the held messages arrive, in order.

    Bug (forwarder, streamer): libzmq 4.3.5's ``zmq_proxy_steerable`` swapped PAUSE and RESUME
    (libzmq PR #4600), so ``pause()`` does not pause the proxy."""
    what = name(kind)
    hub = make_node("hub")
    device = devices({"forwarder": Forwarder, "streamer": Streamer, "queue": Queue}[kind](
        hub, what))
    key = f"{kind}:{what}"
    client = make_node("client")
    count = 20

    if kind == "forwarder":
        publisher = make_node("producer").publisher(what)
        sub = client.subscribe(what, via=hub.name)
        assert sub.wait_ready(SLOW)
        ping_through(publisher, sub)
        device.pause()
        assert device_stats(client, hub.name, key)["state"] == "paused"
        for n in range(count):
            publisher.send("data", n)
        assert sub.recv_message(timeout=0.2) is None, "delivered while paused"
        device.resume()
        assert [sub.recv(timeout=SLOW)[1] for _ in range(count)] == list(range(count))
    elif kind == "streamer":
        puller = make_node("producer").puller(what)
        wait_providers(client, hub.name, key, 1)
        pusher = client.pusher(what, via=hub.name)
        assert pusher.wait_ready(SLOW)
        pusher.send("warm-up", timeout=SLOW)
        assert puller.recv(timeout=SLOW) == "warm-up"
        device.pause()
        assert device_stats(client, hub.name, key)["state"] == "paused"
        for n in range(count):
            pusher.send(n, timeout=SLOW)
        assert puller.recv_message(timeout=0.2) is None, "delivered while paused"
        device.resume()
        assert [puller.recv(timeout=SLOW) for _ in range(count)] == list(range(count))
    else:
        make_worker(what)
        wait_providers(client, hub.name, key, 1)
        assert client.request(what, "warm-up", timeout=SLOW, via=hub.name)["echo"] == "warm-up"
        device.pause()
        assert device_stats(client, hub.name, key)["state"] == "paused"
        answers: list[Any] = []
        caller = threading.Thread(target=lambda: answers.append(
            client.request(what, "held", timeout=SLOW, via=hub.name)), name="test-caller")
        caller.start()
        caller.join(0.2)
        assert caller.is_alive() and not answers, "answered while paused"
        device.resume()
        caller.join(SLOW)
        assert [a["echo"] for a in answers] == ["held"]
    assert device_stats(client, hub.name, key)["state"] == "running"


@pytest.mark.parametrize("kind", ["forwarder", "streamer"])
def test_relaying_goes_on_after_pause_and_resume(kind, make_node, devices, name) -> None:
    """Bug: with libzmq 4.3.5 (PAUSE and RESUME swapped) ``resume()`` pauses the proxy, so a
    device that was paused and resumed relays nothing until its back end next changes."""
    what = name(kind)
    hub = make_node("hub")
    device = devices((Forwarder if kind == "forwarder" else Streamer)(hub, what))
    producer, client = make_node("producer"), make_node("client")
    if kind == "forwarder":
        publisher = producer.publisher(what)
        sub = client.subscribe(what, via=hub.name)
        assert sub.wait_ready(SLOW)
        ping_through(publisher, sub)
    else:
        puller = producer.puller(what)
        wait_providers(client, hub.name, f"{kind}:{what}", 1)
        pusher = client.pusher(what, via=hub.name)
        assert pusher.wait_ready(SLOW)
    device.pause()
    device.resume()
    if kind == "forwarder":
        publisher.send("data", "after")
        assert sub.recv_message(timeout=2.0) is not None, "nothing relayed after resume()"
    else:
        pusher.send("after", timeout=SLOW)
        assert puller.recv_message(timeout=2.0) is not None, "nothing relayed after resume()"


def test_paused_queue_with_a_pending_request_does_not_spin(make_node, make_worker, devices,
                                                           name) -> None:
    """Bug: while paused, ``Queue._relay`` keeps the front end in its poller but does not read
    it, so a waiting request makes every poll return at once: a busy loop."""
    svc = name("calc")
    hub = make_node("hub")
    queue = devices(Queue(hub, svc))
    make_worker(svc)
    client = make_node("client")
    wait_providers(client, hub.name, f"queue:{svc}", 1)
    assert client.request(svc, 1, timeout=SLOW, via=hub.name)["echo"] == 1
    queue.pause()
    answers: list[Any] = []
    caller = threading.Thread(target=lambda: answers.append(
        client.request(svc, 2, timeout=SLOW, via=hub.name)), name="test-caller")
    caller.start()
    try:
        # The request reaches the paused queue's front end. While paused, the device thread
        # leaves that socket alone (the fix under test), so this thread may poll it meanwhile.
        assert queue.front.poll(int(SLOW * 1000)), "the request never reached the queue"
        used = cpu_over(queue._thread)
    finally:
        queue.resume()
        caller.join(SLOW)
    assert [a["echo"] for a in answers] == [2]
    assert used < IDLE_CPU_S, f"paused queue used {used:.3f} s of CPU in 0.2 s"


def test_streamer_holding_messages_without_pullers_does_not_spin(make_node, devices,
                                                                 name) -> None:
    """Messages pushed while no puller exists wait in the streamer and reach the first puller.

    Bug: meanwhile ``zmq.proxy_steerable`` (libzmq 4.3.5) busy-loops when its front end has input
    and its back end (PUSH, IMMEDIATE) has no peer to send to: one core at 100 % per streamer."""
    pipe = name("jobs")
    hub = make_node("hub")
    streamer = devices(Streamer(hub, pipe))
    client = make_node("client")
    client.wait_for_endpoint(zf.EndpointKind.STREAMER, pipe, SLOW)
    pusher = client.pusher(pipe, via=hub.name)
    assert pusher.wait_ready(SLOW)
    for n in range(5):
        pusher.send(n, timeout=SLOW)
    # The messages reach the streamer's front end. Without a puller the device thread does not
    # run the proxy and leaves that socket alone, so this thread may poll it meanwhile.
    assert streamer.front.poll(int(SLOW * 1000)), "nothing reached the streamer"
    used = cpu_over(streamer._thread)
    puller = make_node("late").puller(pipe)
    assert [puller.recv(timeout=SLOW) for _ in range(5)] == list(range(5))
    assert used < IDLE_CPU_S, f"idle streamer used {used:.3f} s of CPU in 0.2 s"


# --- bad input --------------------------------------------------------------------------------


def _handshake_refused(raw: RawSockets, kind: int, url: str) -> None:
    """A raw socket of type ``kind`` connecting to ``url`` is dropped without a handshake."""
    sock = raw(kind)
    # Watch before connecting: the refusal takes microseconds and is not retried.
    monitor = raw.monitor(sock, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    with sock:
        sock.connect(url)
        events = wait_for_event(monitor, {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED},
                                SLOW, f"a connection event from {url}")
    assert events == [zmq.EVENT_DISCONNECTED], f"socket type {kind} talked to {url}: {events}"


def test_bad_input_does_not_stop_devices(make_node, make_worker, devices, raw: RawSockets,
                                         name) -> None:
    """Raw pyzmq sockets send malformed frames to each front end and connect with patterns
    that cannot talk to it; every device then still relays correct traffic."""
    svc, stream, pipe = name("calc"), name("prices"), name("jobs")
    hub = make_node("hub")
    started = [devices(Queue(hub, svc)), devices(Forwarder(hub, stream)),
               devices(Streamer(hub, pipe))]
    make_worker(svc)
    producer = make_node("producer")
    publisher, puller = producer.publisher(stream), producer.puller(pipe)
    client = make_node("client")
    for key in (f"queue:{svc}", f"forwarder:{stream}", f"streamer:{pipe}"):
        wait_providers(client, hub.name, key, 1)
    front = {kind: client.directory.providers(kind, what, hub.name)[0] for kind, what in (
        (zf.EndpointKind.QUEUE, svc), (zf.EndpointKind.FORWARDER, stream),
        (zf.EndpointKind.STREAMER, pipe))}

    # The queue's ROUTER: a single frame and a request without the empty delimiter are
    # refused by the queue; a delimited request with a garbage header reaches a worker, which
    # answers with an error reply.
    with raw(zmq.DEALER, connect=front[zf.EndpointKind.QUEUE]) as dealer:
        dealer.send(b"garbage")
        dealer.send_multipart([b"no", b"delimiter"])
        dealer.send_multipart([b"", b"\xc1 not a header", b"\xc1"])
        dealer.send_multipart([b""])
        assert dealer.poll(int(SLOW * 1000)), "no error reply through the queue"
        reply = dealer.recv_multipart()
        assert reply[0] == b"" and wire.parse_reply(reply)[0].kind is wire.Kind.ERROR
    wait_until(lambda: hub.counters.get("queue_refused_requests") == 3, SLOW, "refusals counted")
    # The forwarder's XPUB: junk where subscriptions belong (relayed upstream, where PUB
    # sockets drop it); the streamer's PULL: frames that are no pipeline message (relayed; the
    # puller refuses them and carries on).
    with raw(zmq.XSUB, connect=front[zf.EndpointKind.FORWARDER]) as xsub:
        for junk in ([b"\x07junk"], [b""], [b"\x01", b"extra", b"parts"], [b"\x00" * 5000]):
            xsub.send_multipart(junk)
    with raw(zmq.PUSH, connect=front[zf.EndpointKind.STREAMER]) as push:
        push.send(b"junk")
        push.send_multipart([b"a", b"b", b"c"])
        push.send_multipart([wire.pack_header(wire.Kind.MESSAGE, 1, time.time()), b"\xc1"])
        push.send_multipart([wire.pack_header(wire.Kind.MESSAGE, 2, time.time()),
                             wire.pack_body("after junk")])
        assert puller.recv(timeout=SLOW) == "after junk"
    assert producer.counters.get("refused_message") == 3
    # Patterns that cannot talk to a front end: ZeroMQ refuses the handshake.
    _handshake_refused(raw, zmq.PUB, front[zf.EndpointKind.QUEUE])
    _handshake_refused(raw, zmq.PUSH, front[zf.EndpointKind.FORWARDER])
    _handshake_refused(raw, zmq.PUB, front[zf.EndpointKind.STREAMER])
    _handshake_refused(raw, zmq.REP, front[zf.EndpointKind.STREAMER])

    # Correct traffic still flows through every device.
    assert client.request(svc, 42, timeout=SLOW, via=hub.name)["echo"] == 42
    sub = client.subscribe(stream, via=hub.name)
    assert sub.wait_ready(SLOW)
    ping_through(publisher, sub)
    publisher.send("data", "fine")
    assert sub.recv(timeout=SLOW) == ("data", "fine")
    pusher = client.pusher(pipe, via=hub.name)
    assert pusher.wait_ready(SLOW)
    pusher.send("fine", timeout=SLOW)
    assert puller.recv(timeout=SLOW) == "fine"
    for device in started:
        assert device._thread.is_alive()
        assert device_stats(client, hub.name, f"{device.label}:{device.name}")["state"] == "running"


# --- lifetimes --------------------------------------------------------------------------------


def _close_within(node: zf.Node, timeout: float) -> bool:
    """``node.close()`` in a helper thread; False if it has not returned after ``timeout`` s.

    The thread is a daemon only so that a close that hangs for ever (the bug these tests look
    for) cannot hang the test run at exit; a passing test always joins it."""
    closer = threading.Thread(target=node.close, name="test-closer", daemon=True)
    closer.start()
    closer.join(timeout)
    return not closer.is_alive()


def test_closing_the_node_stops_its_devices(name) -> None:
    """``with zf.Node("hub") as hub: Forwarder(hub, "x").start(); hub.run()`` - a device
    never stopped by hand - must not make the node's close hang.

    Bug: the node closes the device's front end (a tracked handle) under the running device
    thread, which fails with ENOTSOCK, and the device's back end and steering sockets stay open,
    so ``Context.term()`` in ``node.close()`` waits for ever."""
    hub = zf.Node(name("hub")).start()
    try:
        started = [Queue(hub, name("calc")).start(), Forwarder(hub, name("prices")).start(),
                   Streamer(hub, name("jobs")).start()]
    finally:
        closed = _close_within(hub, 5.0)
    assert closed, "node.close() hangs while its devices run"
    for device in started:
        assert device.wait(THREAD_JOIN_S), f"{device.label} thread still running"


def test_a_device_whose_thread_failed_still_stops_cleanly(make_node, name) -> None:
    """When the relay fails (here: injected), ``stop()`` still withdraws the front end and
    closes the device's sockets, so the node closes.

    Bug: the failed thread sets the state to STOPPED and ``stop()`` returns at once on that
    state: the front end stays advertised and the node's ``close()`` hangs in Context.term()."""
    hub = zf.Node(name("hub")).start()
    try:
        forwarder = Forwarder(hub, name("prices"))

        def fail() -> None:
            raise RuntimeError("injected relay failure")

        forwarder._relay = fail  # type: ignore[method-assign]
        forwarder.start()
        assert forwarder.wait(THREAD_JOIN_S)
        forwarder.stop()
        assert hub.record.find(zf.EndpointKind.FORWARDER, forwarder.name) is None, (
            "a stopped device is still advertised")
    finally:
        closed = _close_within(hub, 5.0)
    assert closed, "node.close() hangs after a device thread failed"
