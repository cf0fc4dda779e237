"""``zmqfabric top`` and ``ls`` as real processes: rates from successive samples, per-endpoint
latency from the metrics histograms, tables that fit 80 columns; the JSON lines unchanged. And
the percentile arithmetic, as a unit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from typing import Any, Callable, Iterator

import pytest

import zmqfabric as zf
from tests.procs import ROOT
from zmqfabric.cli.topview import quantile
from zmqfabric.constants import METRICS_BUCKETS_S

pytestmark = pytest.mark.slow


def cli(*args: str, columns: int = 80, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS=str(columns),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "zmqfabric", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(ROOT), check=False)


@pytest.fixture
def busy_service(name: Callable[[str], str]) -> Iterator[tuple[zf.Node, str]]:
    """A node with metrics serving a service that a client thread calls all the time; every
    tenth call raises."""
    svc = name("thumbnail")
    server = zf.Node(name("a-long-server-name-for-columns"), metrics_port=0)

    @server.reply(svc)
    def thumbnail(body: Any) -> Any:
        if body % 10 == 9:
            raise ValueError("nine")
        return body

    server.serve_in_background()
    stop = threading.Event()

    def call() -> None:
        with zf.Node(name("caller"), advertise=False) as caller:
            i = 0
            while not stop.is_set():
                try:
                    caller.request(svc, i, timeout=5.0)
                except zf.RemoteError:
                    pass
                i += 1
                stop.wait(0.002)

    thread = threading.Thread(target=call)
    thread.start()
    try:
        yield server, svc
    finally:
        stop.set()
        thread.join(30.0)
        server.close()


def test_top_shows_rates_and_latency_within_80_columns(
    busy_service: tuple[zf.Node, str],
) -> None:
    server, svc = busy_service
    done = cli("top", "--count", "2", "--interval", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    too_long = [line for line in lines if len(line) > 80]
    assert not too_long, too_long
    assert sum(line.startswith("--- ") for line in lines) == 2
    assert any("rates over the last 1 s" in line for line in lines), done.stdout
    second = done.stdout[done.stdout.rindex("--- "):]
    node_row = next(line for line in second.splitlines() if line.startswith(server.name))
    # NAME UP REQ/S PUB/S ERR/S REFUSED: about a tenth of the requests fail; it publishes
    # nothing ("-": no stream).
    cells = node_row.split()
    req_s, err_s = (float(cells[i].replace(",", "")) for i in (2, 4))
    assert cells[3] == "-", node_row
    assert req_s > 10 and 0 < err_s < req_s, node_row
    service_row = next(line for line in second.splitlines()
                       if line.strip().startswith(f"service:{svc}"))
    p50, p99 = service_row.split()[-2:]
    assert re.fullmatch(r"[\d.]+(µs|ms|s)", p50) and re.fullmatch(r"[\d.]+(µs|ms|s)", p99), \
        service_row


def test_top_json_is_one_stats_line_per_node_per_refresh(
    busy_service: tuple[zf.Node, str],
) -> None:
    server, svc = busy_service
    done = cli("--json", "top", "--count", "2", "--interval", "0.5")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    ours = [row for row in rows if row.get("node") == server.name]
    assert [row["refresh"] for row in ours] == [1, 2]
    assert {"time", "refresh", "node", "id", "host", "pid", "uptime_s", "address",
            "endpoints", "counters", "tasks", "traffic"} <= set(ours[1])
    assert ours[1]["traffic"][f"service:{svc}"]["in"] >= ours[0]["traffic"][f"service:{svc}"]["in"]


def test_ls_fits_80_columns(busy_service: tuple[zf.Node, str]) -> None:
    server, svc = busy_service
    done = cli("ls")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("fabric ")
    assert not [line for line in lines if len(line) > 80]
    assert any(line.startswith(server.name) for line in lines), done.stdout


def test_quantiles_interpolate_inside_a_bucket() -> None:
    counts = [0] * (len(METRICS_BUCKETS_S) + 1)
    assert quantile(counts, 0.5) is None
    i = METRICS_BUCKETS_S.index(0.001)  # observations in (0.5 ms, 1 ms]
    counts[i] = 100
    assert quantile(counts, 0.5) == pytest.approx(0.00075)
    assert quantile(counts, 0.99) == pytest.approx(0.0005 + 0.0005 * 0.99)
    counts[-1] = 900  # beyond the largest bound: that bound is the answer
    assert quantile(counts, 0.99) == METRICS_BUCKETS_S[-1]
    assert quantile(counts, 0.05) == pytest.approx(0.0005 + 0.0005 * 0.5)
