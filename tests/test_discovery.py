"""Discovery between real processes on loopback: how fast a newcomer is seen, how fast a node that
stops cleanly disappears, observers (advertise=False), and the control endpoint by node name.

The join and leave figures are measured with the monotonic clock, which is system-wide on Linux,
so a child's timestamps compare with ours. They are printed (``pytest -s``) and kept as
``user_properties`` of the test report.
"""

from __future__ import annotations

import logging
import signal
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import zmqfabric as zf
from tests.procs import Child, ProcessGroup

pytestmark = pytest.mark.slow

SLOW = 20.0
#: The promise under test: joins and clean leaves reach every peer within this many seconds.
QUICK = 2.0

PRELUDE = """\
import json, os, signal, sys, threading, time
import zmqfabric as zf

def report(**fields):
    print(json.dumps(fields), flush=True)
"""

#: A node that reports its timeline as JSON lines (READY comes first, so none is skipped):
#: starting/started around start(), saw_peer once it knows node PEER, run_returned and closed
#: after SIGTERM/SIGINT. It serves SVC, which answers only while run() is serving.
MEMBER = """
print("READY", flush=True)
node = zf.Node(NAME, advertise=ADVERTISE)
if ADVERTISE:
    @node.reply(SVC)
    def hello(body):
        return {"node": NAME, "pid": os.getpid()}
report(event="starting", t=time.monotonic())
node.start()
report(event="started", t=time.monotonic())
try:
    node.wait_for_node(PEER, 30.0)
    report(event="saw_peer", t=time.monotonic())
except zf.NodeNotFoundError:
    report(event="no_peer")
if CALL:
    report(event="reply", reply=node.request(CALL, {"from": NAME}, timeout=30.0),
           nodes=[n.name for n in node.nodes()])
    try:
        node.publisher("observers-cannot-publish")
    except zf.LocalProtocolError as exc:
        report(event="refused", text=str(exc))
if EARLY_STOP:  # a SIGTERM before run() installs its handlers must not kill us either
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
node.run()
report(event="run_returned", t=time.monotonic())
node.close()
report(event="closed", t=time.monotonic())
"""


def child_code(body: str, **params: Any) -> str:
    head = "".join(f"{key} = {value!r}\n" for key, value in params.items())
    return PRELUDE + head + textwrap.dedent(body)


def start_member(
    procs: ProcessGroup, name: str, peer: str, *, service: str = "", advertise: bool = True,
    call: str = "", early_stop: bool = True,
) -> Child:
    """A MEMBER child. ``early_stop=False`` leaves SIGTERM/SIGINT entirely to ``run()``."""
    code = child_code(MEMBER, NAME=name, PEER=peer, SVC=service or "unused", ADVERTISE=advertise,
                      CALL=call, EARLY_STOP=early_stop)
    return procs.python(code, timeout=SLOW)


def expect_event(child: Child, event: str, timeout: float = SLOW) -> dict[str, Any]:
    """Skip the child's JSON lines up to the one with ``event``."""
    deadline = time.monotonic() + timeout
    while True:
        line = child.json_line(max(0.01, deadline - time.monotonic()))
        if line.get("event") == event:
            return line


class Watch:
    """Records when node ``name`` joins and leaves ``node``'s directory (listener thread)."""

    def __init__(self, node: zf.Node, name: str) -> None:
        self.name = name
        self.joined = threading.Event()
        self.left = threading.Event()
        self.times: dict[str, float] = {}
        node.directory.listen(self._on_event)

    def _on_event(self, event: Any) -> None:
        if event.record.name != self.name:
            return
        now = time.monotonic()
        if event.change == "joined":
            self.times.setdefault("joined", now)
            self.joined.set()
        elif event.change == "left":
            self.times.setdefault("left", now)
            self.left.set()


def report_figure(record_property: Callable[[str, object], None], key: str, value: float) -> None:
    record_property(key, round(value, 4))
    print(f"\n[figure] {key} = {value * 1000:.1f} ms")


def test_newcomer_is_seen_quickly(procs, make_node, name, record_property) -> None:
    existing = make_node("existing")
    newcomer = name("newcomer")
    watch = Watch(existing, newcomer)

    child = start_member(procs, newcomer, existing.name)
    starting = expect_event(child, "starting")["t"]
    started = expect_event(child, "started")["t"]
    assert watch.joined.wait(SLOW), f"{newcomer} never appeared in {existing.name}'s directory"
    saw_peer = expect_event(child, "saw_peer")["t"]

    seen_by_existing = watch.times["joined"] - starting
    newcomer_saw_existing = saw_peer - starting
    report_figure(record_property, "join_seen_by_existing_s", seen_by_existing)
    report_figure(record_property, "join_newcomer_saw_existing_s", newcomer_saw_existing)
    report_figure(record_property, "newcomer_start_s", started - starting)
    assert seen_by_existing < QUICK, f"newcomer seen after {seen_by_existing:.3f} s"
    assert newcomer_saw_existing < QUICK, f"existing node seen after {newcomer_saw_existing:.3f} s"
    record = existing.directory.get(newcomer)
    assert record is not None and record.pid == child.proc.pid
    assert newcomer in [n.name for n in existing.nodes()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_stop_disappears_quickly(procs, make_node, name, record_property, signum) -> None:
    existing = make_node("existing")
    leaver, service = name("leaver"), name("svc")
    watch = Watch(existing, leaver)
    child = start_member(procs, leaver, existing.name, service=service, early_stop=False)
    assert watch.joined.wait(SLOW)
    # Answered only inside run(): the child has its signal handlers installed now.
    assert existing.request(service, {}, timeout=SLOW)["node"] == leaver
    assert existing.wait_for_endpoint("rep", service, SLOW) == 1

    sent = time.monotonic()
    child.signal(signum)
    assert watch.left.wait(SLOW), f"{leaver} still listed {SLOW} s after {signum.name}"
    gone = watch.times["left"] - sent

    report_figure(record_property, f"leave_after_{signum.name}_s", gone)
    assert gone < QUICK, f"{leaver} disappeared {gone:.3f} s after {signum.name}"
    assert leaver not in [n.name for n in existing.nodes()]
    assert existing.directory.providers(zf.EndpointKind.REPLY, service) == []
    returned = expect_event(child, "run_returned")["t"] - sent
    closed = expect_event(child, "closed")["t"] - sent
    report_figure(record_property, f"run_returned_after_{signum.name}_s", returned)
    report_figure(record_property, f"closed_after_{signum.name}_s", closed)
    assert child.wait(SLOW) == 0, child.err_tail()
    with pytest.raises(zf.NoProviderError):
        existing.request(service, {}, timeout=0.2)


def test_a_killed_node_leaves_in_one_log_line_that_says_why(procs, make_node, name,
                                                             caplog) -> None:
    """A SIGKILLed node is dropped with one INFO line that names it, its id and why ("dead"
    and how it was found), not a line for the death and another for the directory."""
    caplog.set_level(logging.INFO, logger="zmqfabric")
    existing = make_node("existing")
    victim = name("victim")
    watch = Watch(existing, victim)
    child = start_member(procs, victim, existing.name)
    assert watch.joined.wait(SLOW)
    node_id = existing.directory.get(victim).node_id
    child.kill()
    assert watch.left.wait(SLOW), f"{victim} still listed {SLOW} s after SIGKILL"
    lines = [r.getMessage() for r in caplog.records
             if r.name.startswith("zmqfabric") and victim in r.getMessage()
             and "joined" not in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"{existing.name}: node {victim} left (id {node_id}): dead (" in lines[0], lines


def test_observer_is_not_listed_but_can_call(procs, make_node, name) -> None:
    provider = zf.Node(name("provider"))
    service = name("svc")
    provider.reply(service)(lambda body: {"echo": body})
    try:
        provider.start()
        provider.serve_in_background()
        observer_name, witness_name = name("observer"), name("witness")

        observer = start_member(procs, observer_name, provider.name, advertise=False, call=service)
        reply = expect_event(observer, "reply")
        assert reply["reply"] == {"echo": {"from": observer_name}}
        assert provider.name in reply["nodes"] and observer_name in reply["nodes"]
        refused = expect_event(observer, "refused")
        assert "advertise" in refused["text"]
        # A node started after the observer is seen: discovery traffic after the observer's start
        # has been processed, and the observer is still not among the nodes.
        witness = start_member(procs, witness_name, provider.name)
        provider.wait_for_node(witness_name, SLOW)
        expect_event(witness, "saw_peer")
        listed = [n.name for n in provider.nodes()]
        assert witness_name in listed
        assert observer_name not in listed
        # Nor does the witness, which the provider did not introduce to anyone, see it.
        assert provider.info(witness_name, timeout=SLOW)["pid"] == witness.proc.pid
        assert observer_name not in provider.info(witness_name, timeout=SLOW)["peers"]
        for child in (observer, witness):
            child.signal(signal.SIGTERM)
            expect_event(child, "closed")
            assert child.wait(SLOW) == 0, child.err_tail()
    finally:
        provider.close()


def test_observer_in_process(make_node, name) -> None:
    service = name("svc")
    provider = zf.Node(name("provider"))
    provider.reply(service)(lambda body: body * 2)
    try:
        provider.start()
        provider.serve_in_background()
        observer = make_node("observer", advertise=False)
        assert observer.request(service, 21, timeout=SLOW) == 42
        other = make_node("other")
        provider.wait_for_node(other.name, SLOW)
        assert observer.name not in [n.name for n in provider.nodes()]
        assert observer.name not in [n.name for n in other.nodes()]
        assert observer.name in [n.name for n in observer.nodes()]
        for make in (observer.publisher, observer.puller):
            with pytest.raises(zf.LocalProtocolError):
                make(name("x"))
    finally:
        provider.close()


def test_control_ops_by_node_name(procs, make_node, name) -> None:
    me = make_node("me")
    member, service = name("member"), name("svc")
    child = start_member(procs, member, me.name, service=service)

    ping = me.ping(member, timeout=SLOW)
    assert ping["node"] == member and ping["pid"] == child.proc.pid
    info = me.info(member, timeout=SLOW)
    assert {"kind": "rep", "name": service} in [
        {"kind": ep["kind"], "name": ep["name"]} for ep in info["endpoints"]
    ]
    me.wait_for_node(member, SLOW)
    assert expect_event(child, "saw_peer")
    assert me.name in me.info(member, timeout=SLOW)["peers"]
    assert isinstance(me.stats(member, timeout=SLOW)["counters"], dict)

    start = time.monotonic()
    with pytest.raises(zf.NodeNotFoundError) as err:
        me.ping(name("nobody"), timeout=0.3)
    assert time.monotonic() - start < 3.0
    assert isinstance(err.value, LookupError)


def test_wait_for_endpoint_of_each_kind(procs, make_node, name) -> None:
    stream, pipeline, service = name("stream"), name("pipe"), name("svc")
    code = child_code(
        """
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        with zf.Node(NAME) as node:
            publisher = node.publisher(STREAM)
            puller = node.puller(PIPE)
            print("READY", flush=True)
            done.wait(60)
        """,
        NAME=name("offers"), STREAM=stream, PIPE=pipeline,
    )
    procs.python(code, timeout=SLOW)
    me = make_node("me")
    assert me.wait_for_endpoint("pub", stream, SLOW) == 1
    assert me.wait_for_endpoint(zf.EndpointKind.PIPELINE, pipeline, SLOW) == 1
    start = time.monotonic()
    with pytest.raises(zf.NoProviderError) as err:
        me.wait_for_endpoint("rep", service, 0.3)
    assert 0.25 <= time.monotonic() - start < 3.0
    assert err.value.name == service
