"""Request/reply across real processes, found by name through zeroconf on loopback.

Providers are child processes (``tests.procs``) that print READY once their service is advertised
and report with JSON lines. Every wait is bounded; every name is unique to this test run.
"""

from __future__ import annotations

import collections
import functools
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

#: Generous bound for anything that involves starting a process or discovery under load.
SLOW = 20.0

PRELUDE = """\
import json, os, signal, sys, threading, time
import zmqfabric as zf

def report(**fields):
    print(json.dumps(fields), flush=True)
"""

#: A provider of SVC named NAME. The body says how to behave: {"delay": s} answers late,
#: {"fail": text} raises ValueError(text). BLACKHOLE providers never answer until terminated.
#: SIGTERM releases a waiting handler and stops the serve loop, so teardown is quick.
PROVIDER = """
node = zf.Node(NAME)
release = threading.Event()
served = 0

@node.reply(SVC)
def handle(body):
    global served
    served += 1
    if BLACKHOLE:
        release.wait(60)
        return None
    if isinstance(body, dict):
        if body.get("delay"):
            release.wait(body["delay"])
        if "fail" in body:
            raise ValueError(body["fail"])
    return {"node": NAME, "pid": os.getpid(), "echo": body}

def on_term(*_):
    release.set()
    node.stop()

signal.signal(signal.SIGTERM, on_term)
node.start()
print("READY", flush=True)
node.run(handle_signals=False)
node.close()
report(event="stopped", served=served)
"""

#: A client process: calls SVC once (waiting up to 10 s for a provider) and reports the reply.
CLIENT = """
with zf.Node(NAME) as node:
    print("READY", flush=True)
    try:
        reply = node.request(SVC, {"from": NAME}, timeout=10.0)
        report(event="reply", reply=reply)
    except zf.FabricError as exc:
        report(event="error", type=type(exc).__name__, text=str(exc))
"""


def child_code(body: str, **params: Any) -> str:
    head = "".join(f"{key} = {value!r}\n" for key, value in params.items())
    return PRELUDE + head + textwrap.dedent(body)


def start_provider(
    procs: ProcessGroup, name: str, service: str, *, blackhole: bool = False
) -> Child:
    return procs.python(
        child_code(PROVIDER, NAME=name, SVC=service, BLACKHOLE=blackhole), timeout=SLOW
    )


def wait_providers(node: zf.Node, service: str, count: int, timeout: float = SLOW) -> None:
    """Wait until ``node``'s directory lists ``count`` providers of ``service``."""
    ok = node.directory.wait_for(
        lambda: len(node.directory.providers(zf.EndpointKind.REPLY, service)) >= count, timeout
    )
    assert ok, f"{count} providers of {service!r} not seen within {timeout} s: {node.nodes()}"


def stop_cleanly(child: Child) -> dict[str, Any]:
    """SIGTERM a provider; it must exit 0 after reporting how many requests it served."""
    child.signal(signal.SIGTERM)
    report = child.json_line(SLOW)
    assert child.wait(SLOW) == 0, child.err_tail()
    assert report["event"] == "stopped"
    return report


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


# --- by name, between processes ------------------------------------------------------------


def test_request_reply_between_processes(procs, make_node, name) -> None:
    service = name("echo")
    provider_name = name("provider")
    provider = start_provider(procs, provider_name, service)
    client = make_node("client")

    reply = client.request(service, {"n": 1, "text": "héllo", "raw": b"\x00\xff"}, timeout=SLOW)

    assert reply["node"] == provider_name
    assert reply["pid"] == provider.proc.pid
    assert reply["echo"] == {"n": 1, "text": "héllo", "raw": b"\x00\xff"}
    # The provider is known by name, with its service, and answers on its control endpoint.
    record = client.wait_for_node(provider_name, SLOW)
    assert record.pid == provider.proc.pid
    assert record.find(zf.EndpointKind.REPLY, service) is not None
    assert client.ping(provider_name, timeout=SLOW)["pid"] == provider.proc.pid
    assert stop_cleanly(provider)["served"] == 1


def test_child_calls_child_by_service_name(procs, name) -> None:
    """Neither side is the test process: a client process finds a provider process by name."""
    service = name("echo")
    provider_name = name("provider")
    provider = start_provider(procs, provider_name, service)
    client = procs.python(child_code(CLIENT, NAME=name("client"), SVC=service), timeout=SLOW)

    line = client.json_line(SLOW)

    assert line["event"] == "reply", line
    assert line["reply"]["node"] == provider_name
    assert line["reply"]["pid"] == provider.proc.pid
    assert client.wait(SLOW) == 0, client.err_tail()
    assert stop_cleanly(provider)["served"] == 1


def test_two_providers_share_the_load(procs, make_node, name) -> None:
    service = name("work")
    names = [name("provider-a"), name("provider-b")]
    providers = [start_provider(procs, n, service) for n in names]
    client = make_node("client")
    wait_providers(client, service, 2)
    # Round robin covers the providers whose connection is up; a fresh client's second
    # connection may come up a little later. Count only once both have answered.
    warmup: set[str] = set()
    deadline = time.monotonic() + SLOW
    while warmup != set(names):
        assert time.monotonic() < deadline, f"only {warmup} answered"
        warmup.add(client.request(service, {"warmup": True}, timeout=SLOW)["node"])
        time.sleep(0.01)

    counts: collections.Counter[str] = collections.Counter()
    for i in range(200):
        reply = client.request(service, {"i": i}, timeout=SLOW)
        assert reply["echo"] == {"i": i}
        counts[reply["node"]] += 1

    assert set(counts) == set(names), counts
    assert min(counts.values()) >= 50, f"unfair split of 200 requests: {dict(counts)}"
    served = [stop_cleanly(child)["served"] for child in providers]
    assert sum(served) - sum(counts.values()) >= 2  # the warm-up calls
    assert all(s >= counts[n] for s, n in zip(served, names, strict=True))


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 2])
def test_no_provider_raises_within_its_timeout(make_node, name, retries: int) -> None:
    client = make_node("client")
    service = name("nobody")

    start = time.monotonic()
    with pytest.raises(zf.NoProviderError) as info:
        client.request(service, {}, timeout=0.5, retries=retries)
    elapsed = time.monotonic() - start

    err = info.value
    assert err.service == service and err.kind == "service" and err.timeout == 0.5
    assert service in str(err)
    assert isinstance(err, zf.FabricTimeoutError) and isinstance(err, LookupError)
    assert 0.45 <= elapsed < 3.0, f"NoProviderError after {elapsed:.3f} s for a 0.5 s timeout"


def test_request_without_timeout_uses_the_configured_default(make_node, name) -> None:
    """``timeout=None`` means the node's request timeout, never forever."""
    client = make_node("client", config=zf.NodeConfig(request_timeout_s=0.4))
    service = name("nobody")
    start = time.monotonic()
    with pytest.raises(zf.NoProviderError) as info:
        client.request(service, {})
    elapsed = time.monotonic() - start
    assert info.value.timeout == 0.4
    assert 0.35 <= elapsed < 3.0, f"NoProviderError after {elapsed:.3f} s for a 0.4 s default"


def test_slow_provider_times_out_and_its_late_reply_is_dropped(procs, make_node, name) -> None:
    service = name("slow")
    provider = start_provider(procs, name("provider"), service)
    client = make_node("client")
    wait_providers(client, service, 1)

    start = time.monotonic()
    with pytest.raises(zf.RequestTimeoutError) as info:
        client.request(service, {"tag": "late", "delay": 1.0}, timeout=0.3)
    elapsed = time.monotonic() - start

    err = info.value
    assert err.service == service and err.timeout == 0.3
    assert err.attempts == 1 and err.providers == 1
    assert isinstance(err, zf.FabricTimeoutError) and not isinstance(err, zf.NoProviderError)
    assert 0.25 <= elapsed < 3.0, f"timed out after {elapsed:.3f} s for a 0.3 s timeout"
    # The provider answers the abandoned request first; that late reply must not be returned
    # as the answer to the next call.
    reply = client.request(service, {"tag": "next"}, timeout=SLOW)
    assert reply["echo"] == {"tag": "next"}
    assert client.counters.get("stale_replies") == 1
    assert stop_cleanly(provider)["served"] == 2


def test_handler_error_raises_remote_error(procs, make_node, name) -> None:
    service = name("fails")
    provider_name = name("provider")
    provider = start_provider(procs, provider_name, service)
    client = make_node("client")

    with pytest.raises(zf.RemoteError) as info:
        client.request(service, {"fail": "bad input 42"}, timeout=SLOW)

    err = info.value
    assert err.service == service
    assert err.type == "ValueError"
    assert err.text == "bad input 42"
    assert "ValueError" in str(err) and "bad input 42" in str(err)
    # One failing call does not break the provider or the client's socket.
    assert client.request(service, {"ok": 1}, timeout=SLOW)["echo"] == {"ok": 1}
    assert stop_cleanly(provider)["served"] == 2


def test_retry_moves_to_another_provider(procs, make_node, name) -> None:
    """One provider swallows requests (its connection stays healthy); with retries=1 every call
    is answered by the other one.

    The good provider is connected first and the black hole joins later, so round robin, which
    alternates between connected providers, sends one of any two consecutive attempts to the black
    hole: the failover path is taken as soon as the black hole's connection is up."""
    service = name("flaky")
    good_name = name("good")
    good = start_provider(procs, good_name, service)
    client = make_node("client")
    requester = client.requester(service)
    assert requester.request({"i": -1}, timeout=SLOW)["node"] == good_name
    blackhole = start_provider(procs, name("blackhole"), service, blackhole=True)
    wait_providers(client, service, 2)

    timeout = 1.0
    durations: list[float] = []
    deadline = time.monotonic() + SLOW
    while not durations or durations[-1] < timeout * 0.9:
        assert time.monotonic() < deadline, f"no call went through the black hole: {durations}"
        i = len(durations)
        reply, elapsed = timed(functools.partial(requester.request, {"i": i}, timeout, retries=1))
        assert reply["node"] == good_name and reply["echo"] == {"i": i}
        assert elapsed < 2 * timeout + 2.0
        durations.append(elapsed)
        time.sleep(0.02)  # quick answers: give the black hole's connection time to come up

    # Without retries, the next call that lands on the black hole fails: the retry saved it.
    for i in range(3):
        try:
            requester.request({"i": i}, timeout=timeout)
        except zf.RequestTimeoutError as exc:
            assert exc.attempts == 1 and exc.providers == 2
            break
    else:
        pytest.fail("three calls without retries never reached the black hole")
    stop_cleanly(blackhole)
    assert stop_cleanly(good)["served"] >= len(durations) + 1


def test_retry_reaches_a_provider_that_connected_during_the_first_attempt(
    procs, make_node, name
) -> None:
    """The good provider is frozen (SIGSTOP) while the client connects, so attempt 1 can only go
    to the black hole; it thaws during attempt 1, so attempt 2 has a provider to move to."""
    service = name("flaky")
    good_name = name("good")
    blackhole = start_provider(procs, name("blackhole"), service, blackhole=True)
    good = start_provider(procs, good_name, service)
    client = make_node("client")
    wait_providers(client, service, 2)

    good.signal(signal.SIGSTOP)
    thaw = threading.Timer(0.3, good.signal, args=(signal.SIGCONT,))
    try:
        thaw.start()
        reply = client.request(service, {"i": 0}, timeout=1.0, retries=1)
    finally:
        thaw.cancel()
        good.signal(signal.SIGCONT)
    assert reply["node"] == good_name
    stop_cleanly(blackhole)
    stop_cleanly(good)


def test_request_from_many_threads(procs, make_node, name) -> None:
    """``request`` is thread-safe: each thread gets its own socket, replies never cross."""
    service = name("echo")
    provider = start_provider(procs, name("provider"), service)
    client = make_node("client")
    wait_providers(client, service, 1)
    results: dict[int, list[Any]] = {}
    failures: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            results[t] = [
                client.request(service, {"t": t, "i": i}, timeout=SLOW)["echo"] for i in range(50)
            ]
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SLOW * 2)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures
    for t in range(4):
        assert results[t] == [{"t": t, "i": i} for i in range(50)]
    assert stop_cleanly(provider)["served"] == 200


def test_reply_body_round_trips_msgpack_types(make_node, name) -> None:
    """In one process: a provider node and a client node, bodies of every msgpack type."""
    service = name("echo")
    provider = zf.Node(name("provider"))
    provider.reply(service)(lambda body: body)
    provider.start()
    try:
        provider.serve_in_background()
        client = make_node("client")
        body = {"none": None, "t": True, "i": -(2**40), "f": 1.5, "s": "x" * 1000,
                "b": bytes(range(256)), "l": [1, [2, [3]]], "d": {"k": {"k": "v"}}}
        assert client.request(service, body, timeout=SLOW) == body
        assert client.request(service, None, timeout=SLOW) is None
        big = b"\x01" * (256 * 1024)
        assert client.request(service, big, timeout=SLOW) == big
    finally:
        provider.close()
