"""The LAN tier: several hosts as network namespaces on a bridge, real processes, real mDNS.

Skipped, with the reason, where namespaces cannot be made (no root, no iproute2). Everything runs
inside namespaces the test creates; they are removed afterwards even when a test fails.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any, Iterator

import pytest

from tests.lan.netns import Host, Lan, lan_unavailable
from tests.procs import Child

_why = lan_unavailable()
pytestmark = [pytest.mark.lan, pytest.mark.skipif(_why is not None, reason=_why or "")]

#: Liveness promise of the issue: a dead node leaves every view within this many seconds.
DEAD_WITHIN_S = 3.0
#: A host whose cable is pulled (no RST: a missed probe, indirect probes, a suspicion).
PULLED_WITHIN_S = 4.0

# A node that reports every directory change as a JSON line with the system-wide monotonic time
# (the same clock in every namespace), and runs until SIGTERM.
WATCHER = """
import json, queue, signal, time, zmqfabric as zf
node = zf.Node({name!r})
events = queue.Queue()
node.directory.listen(lambda e: events.put((time.monotonic(), e.change.value, e.record.name)))
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
with node:
    print("READY", flush=True)
    deadline = time.monotonic() + 90
    while not stop and time.monotonic() < deadline:
        try:
            t, change, name = events.get(timeout=0.2)
        except queue.Empty:
            continue
        print(json.dumps({{"t": t, "change": change, "node": name}}), flush=True)
"""

# A node that serves until SIGTERM (clean goodbye) or is killed.
SERVER = """
import zmqfabric as zf
node = zf.Node({name!r})
@node.reply("who")
def who(_):
    return {name!r}
node.start()
print("READY", flush=True)
node.run(timeout=90)
node.close()
"""


@pytest.fixture
def lan() -> Iterator[Lan]:
    net = Lan()
    try:
        yield net
    finally:
        net.close()


def hosts(lan: Lan, count: int, subnet: int = 1) -> list[Host]:
    switch = lan.switch(f"{subnet}")
    return [lan.host(f"{subnet}x{i}", switch, f"198.18.{subnet}.{i + 1}/24") for i in range(count)]


def wait_event(child: Child, change: str, node: str, timeout: float) -> dict[str, Any]:
    """The watcher's next line about ``node`` with ``change``; other lines are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        line = child.readline(max(0.05, deadline - time.monotonic()))
        event = json.loads(line)
        if event["change"] == change and event["node"] == node:
            return event


def test_traffic_across_three_hosts(lan: Lan) -> None:
    h0, h1, h2 = hosts(lan, 3)
    sink = lan.python(h0, """
        import zmqfabric as zf
        node = zf.Node("svc")
        @node.reply("who")
        def who(_):
            return "svc"
        with node:
            node.serve_in_background()
            ticks = node.publisher("ticks")
            results = node.puller("results")
            print("READY", flush=True)
            seen = set()
            while len(seen) < 300:
                ticks.send("t", len(seen))
                message = results.recv_message(timeout=0.05)
                if message is not None:
                    seen.add(message.body)
            print("SINK", len(seen), flush=True)
    """)
    lan.python(h1, """
        import zmqfabric as zf
        with zf.Node("worker") as node:
            jobs = node.puller("jobs")
            out = node.pusher("results")
            print("READY", flush=True)
            for body in jobs:
                out.send(body * 10, timeout=10)
    """)
    client = lan.python(h2, """
        import zmqfabric as zf
        with zf.Node("client") as node:
            print("READY", flush=True)
            answers = {node.request("who", None, timeout=10) for _ in range(20)}
            print("ANSWERS", sorted(answers), flush=True)
            sub = node.subscribe("ticks")
            assert sub.wait_ready(10)
            topic, body = sub.recv(timeout=10)
            print("TICK", topic, flush=True)
            jobs = node.pusher("jobs")
            for i in range(300):
                jobs.send(i, timeout=10)
            print("PUSHED", flush=True)
    """)
    assert client.expect("ANSWERS", 20) == "['svc']"
    assert client.expect("TICK", 20) == "t"
    assert client.expect("PUSHED", 20) == ""
    assert sink.expect("SINK", 30) == "300"


def test_dead_nodes_leave_every_view_within_3s(lan: Lan) -> None:
    h0, h1, h2 = hosts(lan, 3)
    watcher = lan.python(h0, WATCHER.format(name="watcher"))
    killed = lan.python(h1, SERVER.format(name="killed"))
    unplugged = lan.python(h2, SERVER.format(name="unplugged"))
    wait_event(watcher, "joined", "killed", 10)
    wait_event(watcher, "joined", "unplugged", 10)

    start = time.monotonic()
    killed.kill()
    sigkill_s = wait_event(watcher, "left", "killed", 10)["t"] - start

    start = time.monotonic()
    lan.link(h2, up=False)
    link_down_s = wait_event(watcher, "left", "unplugged", 10)["t"] - start

    start = time.monotonic()
    lan.link(h2, up=True)
    back_s = wait_event(watcher, "joined", "unplugged", 15)["t"] - start

    clean = lan.python(h1, SERVER.format(name="clean"))
    wait_event(watcher, "joined", "clean", 10)
    start = time.monotonic()
    clean.stop()
    clean_s = wait_event(watcher, "left", "clean", 10)["t"] - start

    print(f"\nLAN liveness: SIGKILL {sigkill_s:.3f} s, link down {link_down_s:.3f} s, "
          f"link back {back_s:.3f} s, clean leave {clean_s:.3f} s")
    assert sigkill_s < DEAD_WITHIN_S
    assert link_down_s < PULLED_WITHIN_S
    assert clean_s < 1.0
    assert unplugged.proc.poll() is None  # it was unplugged, not dead


def test_name_conflict_across_hosts(lan: Lan) -> None:
    h0, h1 = hosts(lan, 2)
    lan.python(h0, SERVER.format(name="dup"))
    second = lan.python(h1, """
        import zmqfabric as zf
        print("READY", flush=True)
        try:
            zf.Node("dup").start()
        except zf.NameConflictError as exc:
            print("CONFLICT", exc, flush=True)
        with zf.Node("dup", on_conflict="suffix") as node:
            print("NAMED", node.name, flush=True)
    """)
    message = second.expect("CONFLICT", 15)
    assert "198.18.1.1" in message and "'dup'" in message
    assert second.expect("NAMED", 15) == "dup-2"


def test_two_subnets_joined_by_seed_peers(lan: Lan) -> None:
    switch_a, switch_b = lan.switch("a"), lan.switch("b")
    lan.router("r", [(switch_a, "198.18.1.254/24"), (switch_b, "198.18.2.254/24")])
    a1 = lan.host("a1", switch_a, "198.18.1.1/24", gateway="198.18.1.254")
    a2 = lan.host("a2", switch_a, "198.18.1.2/24", gateway="198.18.1.254")
    b1 = lan.host("b1", switch_b, "198.18.2.1/24", gateway="198.18.2.254")
    b2 = lan.host("b2", switch_b, "198.18.2.2/24", gateway="198.18.2.254")
    node = """
        import signal, time, zmqfabric as zf
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})  # for sigtimedwait below
        config = zf.NodeConfig(scope=zf.Scope.from_env(), peers={peers!r}, control_port={port})
        node = zf.Node({name!r}, config=config)
        @node.reply("where-" + {name!r})
        def where(_):
            return {name!r}
        with node:
            node.serve_in_background()
            print("READY", flush=True)
            start = time.monotonic()
            node.directory.wait_for(lambda: len(node.directory.records()) >= 4, 20)
            print("SEES", sorted(r.name for r in node.nodes()), flush=True)
            print("CALL", node.request("where-" + {other!r}, None, timeout=10), flush=True)
            signal.sigtimedwait({{signal.SIGTERM}}, 60)  # keep answering until all have called
    """
    children = [
        lan.python(b1, node.format(name="b1", peers=(), port=7400, other="a2")),
        lan.python(b2, node.format(name="b2", peers=(), port=0, other="a1")),
        lan.python(a1, node.format(name="a1", peers=("198.18.2.1:7400",), port=0, other="b2")),
        lan.python(a2, node.format(name="a2", peers=(), port=0, other="b1")),
    ]
    expected = {"b1": "a2", "b2": "a1", "a1": "b2", "a2": "b1"}
    for child, name in zip(children, ["b1", "b2", "a1", "a2"], strict=True):
        assert child.expect("SEES", 25) == "['a1', 'a2', 'b1', 'b2']"
        assert child.expect("CALL", 15) == expected[name]
    for child in children:
        child.signal(signal.SIGTERM)
    for child in children:
        assert child.wait(10) == 0, child.err_tail()
