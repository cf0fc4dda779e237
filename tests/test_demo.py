"""``zmqfabric demo``: real processes on loopback, counts proven, nothing left behind."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.procs import Child, ProcessGroup
from zmqfabric.cli.demo.report import DemoSummary, PatternResult, summary_lines

pytestmark = pytest.mark.slow


def children_of(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from /proc), except multiprocessing's resource tracker,
    which the standard library starts and stops by itself."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"resource_tracker" not in cmdline:
            found.add(int(entry.name))
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids of ``pids`` still running (zombies count as gone)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def wait_for_children(demo: Child, count: int, timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while len(pids := children_of(demo.proc.pid)) < count:
        assert time.monotonic() < deadline, f"only {len(pids)} demo children appeared"
        time.sleep(0.05)
    return pids


def test_demo_runs_and_proves_every_count(procs: ProcessGroup) -> None:
    demo = procs.cli("--json", "demo", "--duration", "1.5", "--workers", "2")
    started = json.loads(demo.readline(timeout=15))
    assert started["event"] == "started" and started["processes"] == 10
    pids = wait_for_children(demo, 10)
    assert demo.wait(40) == 0, demo.err_tail()
    events = []
    while True:
        try:
            events.append(json.loads(demo.readline(timeout=1)))
        except EOFError:
            break
    assert [e["event"] for e in events][-1] == "summary"
    assert "ready" in [e["event"] for e in events]
    summary = events[-1]
    assert summary["ok"] is True, summary
    rows = {p["pattern"]: p for p in summary["patterns"]}
    assert set(rows) == {"req/rep", "pub/sub", "pipeline"}
    assert rows["req/rep"]["received"] == [rows["req/rep"]["sent"]] and rows["req/rep"]["sent"] > 0
    assert rows["pub/sub"]["received"] == [rows["pub/sub"]["sent"]] * 2
    assert rows["pipeline"]["received"] == [rows["pipeline"]["sent"]] and "exactly once" in \
        rows["pipeline"]["check"]
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert alive(pids) == set(), "demo children outlived the demo"


def test_ctrl_c_stops_every_demo_process(procs: ProcessGroup) -> None:
    demo = procs.cli("demo", "--duration", "25")
    demo.expect("all processes found each other", timeout=25)
    pids = children_of(demo.proc.pid)
    assert len(pids) == 11
    demo.signal(signal.SIGINT)
    assert demo.wait(15) == 130, demo.err_tail()
    assert alive(pids) == set(), "demo children outlived the demo"


def test_summary_table_for_people() -> None:
    summary = DemoSummary(
        "abc123", 11, 6.0, 1.2,
        (PatternResult("req/rep", 10, (10,), 100.0, "req/s", True, "10 answered"),
         PatternResult("pub/sub", 20, (20, 20), 5000.0, "msg/s", True, "in order"),
         PatternResult("pipeline", 30, (29,), 3000.0, "jobs/s", False, "1 jobs missing")),
        0.5, 2.25)
    text = "\n".join(summary_lines(summary))
    assert "PATTERN" in text and "THROUGHPUT" in text
    assert "2 x 20" in text and "5,000 msg/s" in text
    assert "FAILED: 1 jobs missing" in text
    assert "p50 0.50 ms, p99 2.25 ms" in text
    assert text.endswith("result: COUNTS DO NOT MATCH")
    assert not summary.ok



def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (checked by binding each)."""
    for first in range(20000 + (time.monotonic_ns() // 1000) % 20000, 60000, count):
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no run of free ports")


def test_demo_nodes_serve_metrics_on_consecutive_ports(procs: ProcessGroup) -> None:
    """``zmqfabric --metrics-port P demo``: node i serves /metrics on P+i while traffic runs; the
    providers count the requests they handled, the publisher its events."""
    first = free_port_run(10)
    demo = procs.cli("--metrics-port", str(first), "demo", "--duration", "3", "--workers", "2")
    demo.expect("all processes found each other", timeout=25)
    served: dict[str, float] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len([v for v in served.values() if v > 0]) < 3:
        for port in range(first, first + 10):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("zmqfabric_messages_total{") and 'direction="out"' in line \
                        and ('kind="service"' in line or 'kind="stream"' in line):
                    node = line.split('node="', 1)[1].split('"', 1)[0]
                    served[node] = float(line.rsplit(" ", 1)[1])
        time.sleep(0.3)
    assert demo.wait(40) == 0, f"{demo.out_rest()}\n{demo.err_tail()}"
    busy = sorted(node.rsplit("-", 2)[-2] if node[-1].isdigit() else node.rsplit("-", 1)[-1]
                  for node, value in served.items() if value > 0)
    assert busy == ["provider", "provider", "publisher"], served
