"""Prometheus metrics (zmqfabric/metrics.py): real nodes on loopback with ``metrics_port``, real
traffic, a scrape with urllib, parsed with prometheus_client's own parsers, numbers checked
exactly. Also the server's lifetime, a port already taken, and that nothing runs when off."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import zmqfabric as zf
import zmqfabric.aio
from tests.helpers import wait_until
from tests.procs import ROOT
from zmqfabric.constants import METRICS_REQUEST_TIMEOUT_S
from zmqfabric.metrics import Count

SCRAPE_TIMEOUT_S = 10.0


def scrape(node: zf.Node | zmqfabric.aio.Node, accept: str | None = None) -> str:
    url = node.metrics_url
    assert url is not None and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_S) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as {(name, labels without "node"): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "node"))] = s.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_a_scrape_counts_every_kind_of_traffic_exactly(
    make_node: Callable[..., zf.Node], name: Callable[[str], str],
) -> None:
    svc, stream, pipeline, task = name("svc"), name("prices"), name("frames"), name("work")
    server = zf.Node(name("msrv"), metrics_port=0)

    @server.reply(svc)
    def echo(body: Any) -> Any:
        if body == "boom":
            raise ValueError("boom")
        return body

    @server.task(task)
    def work(body: Any) -> Any:
        return body

    server.serve_in_background()
    try:
        client = make_node("mcli", metrics_port=0)
        puller = server.puller(pipeline)
        publisher = server.publisher(stream)
        subscription = client.subscribe(stream)
        # One thread owns both ends: the subscription connects only while its owner calls it.
        assert subscription.wait_ready(10.0)
        assert publisher.wait_subscribers(1, 10.0) == 1

        for i in range(10):
            assert client.request(svc, i, timeout=10.0) == i
        with pytest.raises(zf.RemoteError):
            client.request(svc, "boom", timeout=10.0)
        with pytest.raises(zf.NoProviderError):
            client.request(name("nobody"), 1, timeout=0.05)
        pusher = client.pusher(pipeline)
        assert pusher.wait_ready(10.0)
        for i in range(7):
            pusher.send(i)
        assert [puller.recv(timeout=10.0) for _ in range(7)] == list(range(7))
        for i in range(5):
            publisher.send("EUR", i)
        assert [subscription.recv(timeout=10.0)[1] for _ in range(5)] == list(range(5))
        handles = [client.submit(task, i) for i in range(3)]
        assert [h.result(timeout=10.0) for h in handles] == [0, 1, 2]
        for _ in range(3):  # control traffic is not counted as messages
            client.stats(server.name, timeout=10.0)

        s = samples(scrape(server))
        c = samples(scrape(client))
    finally:
        server.close()

    messages = "zmqfabric_messages_total"
    assert value(s, messages, kind="service", endpoint=svc, direction="in") == 11
    assert value(s, messages, kind="service", endpoint=svc, direction="out") == 10
    assert value(s, "zmqfabric_endpoint_errors_total", kind="service", endpoint=svc,
                 error="handler") == 1
    assert value(s, "zmqfabric_handler_duration_seconds_count", service=svc) == 11
    assert value(s, "zmqfabric_handler_duration_seconds_bucket", service=svc, le="+Inf") == 11
    assert value(c, messages, kind="request", endpoint=svc, direction="out") == 11
    assert value(c, messages, kind="request", endpoint=svc, direction="in") == 11
    assert value(c, "zmqfabric_endpoint_errors_total", kind="request", endpoint=svc,
                 error="remote") == 1
    assert value(c, "zmqfabric_request_duration_seconds_count", service=svc) == 11
    assert 0 < value(c, "zmqfabric_request_duration_seconds_sum", service=svc) < 11 * 10.0
    assert value(c, "zmqfabric_endpoint_errors_total", kind="request",
                 endpoint=next(e for (n, ls) in c if n == "zmqfabric_endpoint_errors_total"
                               for k, e in ls if k == "endpoint" and e != svc),
                 error="no_provider") == 1
    assert value(c, messages, kind="pipeline", endpoint=pipeline, direction="out") == 7
    assert value(s, messages, kind="pipeline", endpoint=pipeline, direction="in") == 7
    assert value(s, messages, kind="stream", endpoint=stream, direction="out") == 5
    assert value(c, messages, kind="stream", endpoint=stream, direction="in") == 5
    assert value(c, "zmqfabric_task_events_total", task=task, event="done") == 3
    assert value(c, "zmqfabric_tasks", task=task, state="pending") == 0
    assert value(s, "zmqfabric_tasks_handled_total", task=task, result="ok") == 3
    assert not [key for key in s if ("kind", "control") in key[1]]
    assert value(s, "zmqfabric_peers") >= 1 and value(c, "zmqfabric_peers") >= 1
    assert value(s, "zmqfabric_uptime_seconds") > 0
    # The same numbers reach `stats` (``zmqfabric top`` reads them there).
    section = client.stats(client.name, timeout=10.0)["traffic"][f"request:{svc}"]
    assert section["out"] == 11 and section["errors"] == {"remote": 1}


def test_openmetrics_for_scrapers_that_ask(make_node: Callable[..., zf.Node]) -> None:
    node = make_node("mom", metrics_port=0)
    text = scrape(node, accept="application/openmetrics-text; version=1.0.0")
    assert text.rstrip().endswith("# EOF")
    names = {family.name for family in openmetrics_families(text)}
    assert {"zmqfabric_peers", "zmqfabric_uptime_seconds", "zmqfabric_messages"} <= names


def test_the_server_lives_and_dies_with_its_node(make_node: Callable[..., zf.Node]) -> None:
    node = make_node("mlife", metrics_port=0)
    url = node.metrics_url
    assert url is not None
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=SCRAPE_TIMEOUT_S)
    assert err.value.code == 404
    assert any(t.name.startswith("zmqfabric-metrics-") for t in threading.enumerate())
    node.close()
    assert node.metrics_url is None
    assert not any(t.name == f"zmqfabric-metrics-{node.name}" for t in threading.enumerate())
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S)


def test_a_taken_port_fails_start_and_leaves_nothing_open(
    make_node: Callable[..., zf.Node], name: Callable[[str], str],
) -> None:
    first = make_node("mport", metrics_port=0)
    assert first.metrics_url is not None
    port = int(first.metrics_url.rsplit(":", 1)[1].split("/")[0])
    second = zf.Node(name("mport"), metrics_port=port)
    with pytest.raises(zf.FabricError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
        second.start()
    assert second.state.value == "closed"
    with pytest.raises(zf.LocalProtocolError):
        zf.Node(name("mbad"), metrics_port=70000)
    with pytest.raises(zf.LocalProtocolError):
        first.serve_metrics(0)  # after start


def test_off_by_default(make_node: Callable[..., zf.Node], name: Callable[[str], str]) -> None:
    node = make_node("moff")
    assert node.runtime.metrics is None and node.metrics_url is None
    assert "traffic" not in node.stats(node.name, timeout=10.0)
    with node.pusher(name("p")) as pusher:
        assert "send" not in vars(pusher)  # no wrapper on the hot path


def test_asyncio_handlers_and_requests_are_counted(
    aio_make_node: Callable[..., zmqfabric.aio.Node], name: Callable[[str], str],
) -> None:
    svc = name("asvc")
    server = aio_make_node("amsrv", metrics_port=0)

    @server.reply(svc)
    async def echo(body: Any) -> Any:
        await asyncio.sleep(0.002)
        return body

    async def main() -> tuple[str, str]:
        async with server, aio_make_node("amcli", metrics_port=0) as client:
            serving = asyncio.create_task(server.run())
            try:
                for i in range(4):
                    assert await client.request(svc, i, timeout=10.0) == i
                loop = asyncio.get_running_loop()
                return (await loop.run_in_executor(None, scrape, server),
                        await loop.run_in_executor(None, scrape, client))
            finally:
                server.stop()
                await serving

    server_text, client_text = asyncio.run(main())
    s, c = samples(server_text), samples(client_text)
    assert value(s, "zmqfabric_handler_duration_seconds_count", service=svc) == 4
    # each handler slept 2 ms: its time is the coroutine's, not the call's
    assert value(s, "zmqfabric_handler_duration_seconds_sum", service=svc) >= 4 * 0.002
    assert value(c, "zmqfabric_request_duration_seconds_count", service=svc) == 4


def test_counts_from_many_threads_are_all_kept() -> None:
    count = Count()

    def bump() -> None:
        for _ in range(50_000):
            count.add()

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    wait_until(lambda: count.value == 200_000, 5.0, "every increment counted")


def test_the_grafana_dashboard_asks_for_metrics_that_exist(
    make_node: Callable[..., zf.Node],
) -> None:
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    asked = {re.sub(r"_(bucket|total)$", "", m)
             for e in exprs for m in re.findall(r"\bzmqfabric_\w+", e)}
    node = make_node("mgraf", metrics_port=0)
    exported = {family.name for family in text_string_to_metric_families(scrape(node))}
    assert asked and asked <= exported, asked - exported
    assert all('node=~"$node"' in e for e in exprs), exprs


def test_a_stalled_scraper_is_dropped_and_prints_nothing(
    make_node: Callable[..., zf.Node], capfd: pytest.CaptureFixture[str],
) -> None:
    """The server answers one scrape at a time: one that stalls is dropped after
    METRICS_REQUEST_TIMEOUT_S, the next is answered, and nothing is printed about it."""
    node = make_node("mstall", metrics_port=0)
    url = node.metrics_url
    assert url is not None
    host, port = url[len("http://"):].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=5.0) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        start = time.monotonic()
        assert "zmqfabric_peers" in scrape(node)
        waited = time.monotonic() - start
    assert METRICS_REQUEST_TIMEOUT_S - 1.0 < waited < METRICS_REQUEST_TIMEOUT_S + 5.0, waited
    start = time.monotonic()
    node.close()
    assert time.monotonic() - start < 5.0
    assert "Traceback" not in capfd.readouterr().err
