"""Commands that look at the fabric: ``ls [--watch]``, ``ping``, ``stats`` (``top`` is in
:mod:`.top`). They run an observer node, which finds and asks others but is not listed."""

from __future__ import annotations

import queue
import time
from typing import Any

import click

from ..core.records import NodeRecord
from ..discovery.directory import DirectoryEvent
from .config import CliConfig, NodeName, common, next_wait, pass_config
from .output import (
    console,
    dumps,
    echo_table,
    emit,
    endpoints_text,
    new_table,
    node_line,
    now_iso,
    printable,
    record_json,
    scope_text,
)

#: The longest `ls` listens for nodes answering discovery (and `top` before its first refresh):
#: the browser's second query, a second after the first, is answered by multicast.
LS_LISTEN_S = 1.5
#: The least time a ping gets after finding its node took up most of --timeout (s).
MIN_PING_S = 0.05
#: ...but `ls` stops once no node has joined for this long (s): every responder answers a new
#: node's first query at once (discovery/quickquery.py), so the answers come in a burst.
LS_QUIET_S = 0.25


@click.command("ls")
@click.option("--watch", is_flag=True,
              help="Print nodes joining, updating and leaving as it happens.")
@click.option("--count", type=click.IntRange(min=1), help="With --watch: stop after N events.")
@common
@pass_config
def ls_cmd(cfg: CliConfig, watch: bool, count: int | None) -> None:
    """List the nodes of the fabric (name, host, address, secured, endpoints), then the peers
    refused for security reasons (name, host, reason).

    A node is secured when its record carries a CURVE key. Secured and plain nodes refuse each
    other: run with --keys DIR to see the secured ones. With --json, one object per node; refused
    peers come last, with the reason in their "refused" field (null for the others).

    Without --watch, listens until the answers stop (no node joined for LS_QUIET_S, 0.25 s; at
    most LS_LISTEN_S, 1.5 s), or for --timeout if given: give one to wait for slow hosts. With
    --watch, runs until Ctrl-C, --count events, or an explicit --timeout."""
    if count is not None and not watch:
        raise click.UsageError("--count needs --watch")
    if watch:
        _watch(cfg, count)
        return
    node = cfg.observer()
    last = [time.monotonic()]  # when a node last joined or changed (discovery's thread sets it)
    unlisten = node.directory.listen(lambda _event: last.__setitem__(0, time.monotonic()))
    try:
        with node:
            if cfg.timeout_given:
                time.sleep(cfg.timeout)  # a listening window
            else:
                _until_quiet(last, time.monotonic() + LS_LISTEN_S)
            records = [r for r in node.nodes() if r.node_id != node.node_id]
            refused = node.refused_peers()
    finally:
        unlisten()
    if cfg.json:
        for record in records:
            emit({**record_json(record), "refused": None})
        for record, reason in refused:
            emit({**record_json(record), "refused": reason})
        return
    out = console()
    out.print(f"fabric {cfg.fabric!r} on {scope_text(cfg.scope)}")
    nodes = new_table(["NAME", "HOST", "PID", "ADDRESS", "SECURED", "ENDPOINTS"],
                      flexible="ENDPOINTS", numeric={"PID"})
    for r in records:
        nodes.add_row(r.name, r.host, str(r.pid), r.address, _secured(r),
                      endpoints_text(r) or "-")
    out.print(nodes)
    if refused:
        out.print()
        out.print("refused (seen, but no traffic with them):")
        others = new_table(["NAME", "HOST", "ADDRESS", "REASON"], flexible="REASON")
        for r, reason in refused:
            others.add_row(r.name, r.host, r.address, reason)
        out.print(others)
    if not records:
        click.echo(f"(no nodes of fabric {cfg.fabric!r} found in this scope)", err=True)


def _until_quiet(last: list[float], deadline: float) -> None:
    """Sleep until ``last[0]`` (the time of the latest directory event) is LS_QUIET_S old, or
    until ``deadline``."""
    while (now := time.monotonic()) < deadline:
        quiet_at = last[0] + LS_QUIET_S
        if now >= quiet_at:
            return
        time.sleep(min(quiet_at, deadline) - now)


def _secured(record: NodeRecord) -> str:
    return "yes" if record.curve_key is not None else "no"


def _watch(cfg: CliConfig, count: int | None) -> None:
    events: queue.Queue[DirectoryEvent] = queue.Queue()
    node = cfg.observer()
    unlisten = node.directory.listen(events.put)  # discovery's thread: only hand over
    deadline = cfg.deadline
    seen = 0
    try:
        with node:
            click.echo(f"watching nodes of fabric {cfg.fabric!r} in {scope_text(cfg.scope)} "
                       "(Ctrl-C to stop)", err=True)
            while count is None or seen < count:
                slice_s = next_wait(deadline)
                if slice_s is None:
                    return
                try:
                    event = events.get(timeout=slice_s)
                except queue.Empty:
                    continue
                if event.record.node_id == node.node_id:
                    continue
                seen += 1
                now = now_iso()
                if cfg.json:
                    emit({"event": event.change.value, "time": now,
                          "node": record_json(event.record)})
                else:
                    r = event.record
                    click.echo(f"{now[11:]}  {event.change.value:<7}  {r.name}  {r.address}  "
                               f"{endpoints_text(r)}")
    finally:
        unlisten()


@click.command("ping")
@click.argument("node_name", metavar="NODE", type=NodeName())
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True)
@common
@pass_config
def ping_cmd(cfg: CliConfig, node_name: str, count: int) -> None:
    """Ping NODE on its control endpoint and print the round trip time. Finding NODE and the
    first ping share one --timeout; each later ping has a --timeout of its own."""
    with cfg.observer() as node:
        ends = time.monotonic() + cfg.timeout
        node.wait_for_node(node_name, cfg.timeout)
        for i in range(count):
            timeout = cfg.timeout if i else max(ends - time.monotonic(), MIN_PING_S)
            start = time.perf_counter()
            answer = node.ping(node_name, timeout=timeout)
            rtt_ms = (time.perf_counter() - start) * 1000
            if cfg.json:
                emit({**answer, "rtt_ms": round(rtt_ms, 3)})
            else:
                click.echo(f"{node_line(answer)}: {rtt_ms:.2f} ms")


@click.command("stats")
@click.argument("node_name", metavar="NODE", type=NodeName())
@common
@pass_config
def stats_cmd(cfg: CliConfig, node_name: str) -> None:
    """Print NODE's endpoints and counters."""
    with cfg.observer() as node:
        answer = node.stats(node_name, timeout=cfg.timeout)
    if cfg.json:
        emit(answer)
        return
    click.echo(f"{node_line(answer)} at {printable(answer.get('address', '?'))}")
    endpoints = [[str(e.get("kind")), str(e.get("name")), str(e.get("port"))]
                 for e in _list(answer.get("endpoints")) if isinstance(e, dict)]
    echo_table(["KIND", "ENDPOINT", "PORT"], endpoints)
    counters = [[str(k), str(v)] for k, v in _dict(answer.get("counters")).items()]
    echo_table(["COUNTER", "VALUE"], counters)
    for section, value in answer.items():  # devices ("forwarder:prices"), tasks
        if section not in _BASE_FIELDS and _has_content(value):
            click.echo(f"{printable(section)}: {dumps(value)}")


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _has_content(value: object) -> bool:
    """False for empty sections, e.g. the tasks of a node that never used tasks."""
    if isinstance(value, dict):
        return any(_has_content(v) for v in value.values())
    return value is not None


_BASE_FIELDS = frozenset({"node", "id", "host", "pid", "uptime_s", "address", "endpoints",
                          "counters"})
