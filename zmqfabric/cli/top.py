"""``zmqfabric top``: every node's stats, asked from its control endpoint and shown again every
``--interval`` seconds. On a terminal the view redraws in place; otherwise each refresh appends
plain lines; with ``--json`` each refresh prints one object per node."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click

from ..constants import CONTROL_TIMEOUT_S
from ..core.records import NodeRecord
from ..errors import FabricError, FabricTimeoutError
from ..node import Node
from .config import CliConfig, Seconds, common, pass_config
from .fabric import LS_LISTEN_S
from .output import (
    echo_table,
    emit,
    endpoints_text,
    now_iso,
    plural,
    record_json,
    scope_text,
)

#: Nodes asked at once; a node that does not answer costs one control timeout of one thread.
PARALLEL_ASKS = 8
#: How often top sleeps before checking its deadline and the next refresh time (s).
TICK_S = 0.2

Sample = tuple[NodeRecord, dict[str, Any] | None, str | None]  # record, answer, error


@click.command("top")
@click.option("--interval", type=Seconds(), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--count", type=click.IntRange(min=1), help="Exit after N refreshes.")
@common
@pass_config
def top_cmd(cfg: CliConfig, interval: float, count: int | None) -> None:
    """Show every node's stats, refreshed: name, host, uptime, counters (replies sent, events
    sent, refusals, errors), devices, task pipelines and endpoints.

    The first refresh comes after a discovery window of LS_LISTEN_S (1.5 s). On a terminal the
    view redraws in place; piped, each refresh appends a header line and a table; with --json,
    each refresh prints one object per node (its control "stats" answer, plus "time" and
    "refresh"; a node that did not answer has an "error" field instead). Runs until Ctrl-C,
    --count refreshes (exit 4 if an explicit --timeout ends it first) or an explicit
    --timeout."""
    deadline = cfg.deadline
    redraw = not cfg.json and click.get_text_stream("stdout").isatty()
    ask_s = min(cfg.timeout, CONTROL_TIMEOUT_S)
    refreshes = 0
    with cfg.observer() as node, ThreadPoolExecutor(
        PARALLEL_ASKS, thread_name_prefix="zmqfabric-cli-top"
    ) as pool:
        due = time.monotonic() + LS_LISTEN_S
        while count is None or refreshes < count:
            if not _sleep_until(due, deadline):
                break
            refreshes += 1
            samples = _sample(node, pool, ask_s)
            if cfg.json:
                stamp = now_iso()
                for sample in samples:
                    emit(_sample_json(sample, stamp, refreshes))
            else:
                _show(cfg, samples, interval, redraw)
            due = max(due + interval, time.monotonic())
    if count is not None and refreshes < count:
        raise FabricTimeoutError(f"{refreshes} of {count} refreshes within {cfg.timeout:g} s",
                                 timeout=cfg.timeout)


def _sleep_until(due: float, deadline: float | None) -> bool:
    """Sleep until ``due``; False if ``deadline`` comes first."""
    while (now := time.monotonic()) < due:
        if deadline is not None and now >= deadline:
            return False
        time.sleep(min(TICK_S, due - now))
    return deadline is None or time.monotonic() < deadline


def _sample(node: Node, pool: ThreadPoolExecutor, ask_s: float) -> list[Sample]:
    records = [r for r in node.nodes() if r.node_id != node.node_id]

    def ask(record: NodeRecord) -> Sample:
        try:
            return record, node.stats(record.name, timeout=ask_s), None
        except FabricError as exc:
            return record, None, str(exc)

    return list(pool.map(ask, records))


def _sample_json(sample: Sample, stamp: str, refresh: int) -> dict[str, Any]:
    record, answer, error = sample
    if answer is None:
        row = record_json(record)
        return {"time": stamp, "refresh": refresh, "node": row.pop("name"), **row,
                "error": error}
    return {"time": stamp, "refresh": refresh, **answer}


HEADERS = ["NAME", "HOST", "UP", "REPLIES", "EVENTS", "REFUSED", "ERRORS", "DEVICES", "TASKS",
           "ENDPOINTS"]


def _show(cfg: CliConfig, samples: list[Sample], interval: float, redraw: bool) -> None:
    if redraw:
        click.clear()
    click.echo(f"--- {now_iso()[11:]}  {plural(len(samples), 'node')} in "
               f"{scope_text(cfg.scope)}; every {interval:g} s, Ctrl-C to stop")
    echo_table(HEADERS, [_row(*sample) for sample in samples])


def _row(record: NodeRecord, answer: dict[str, Any] | None, error: str | None) -> list[str]:
    if answer is None:
        return [record.name, record.host, "no answer", "-", "-", "-", "-", "-", "-",
                endpoints_text(record)]
    counters: dict[str, int] = answer.get("counters", {})
    refused = sum(v for k, v in counters.items() if k.startswith("refused_"))
    errors = sum(v for k, v in counters.items() if k.endswith("_errors"))
    return [
        record.name,
        str(answer.get("host", record.host)),
        _uptime(float(answer.get("uptime_s", 0.0))),
        str(counters.get("replies_sent", 0)),
        str(counters.get("events_sent", 0)),
        str(refused),
        str(errors),
        _devices_text(answer),
        _tasks_text(answer.get("tasks")),
        endpoints_text(record),
    ]


def _uptime(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _devices_text(answer: dict[str, Any]) -> str:
    """Device sections are named "<kind>:<name>" (e.g. "forwarder:prices")."""
    parts = []
    for key, value in answer.items():
        if ":" in key and isinstance(value, dict) and "relays" in value:
            relayed = value.get("front_frames_in", 0) + value.get("back_frames_in", 0)
            parts.append(f"{key}({value.get('state', '?')}, {relayed} parts)")
    return " ".join(parts) or "-"


def _tasks_text(tasks: Any) -> str:
    if not isinstance(tasks, dict):
        return "-"
    parts = []
    for name, s in (tasks.get("submit") or {}).items():
        parts.append(f"{name}(submit: {s.get('queued', 0)} queued, {s.get('in_flight', 0)} "
                     f"in flight, {s.get('done', 0)} done, {s.get('dead', 0)} dead)")
    for name, s in (tasks.get("serve") or {}).items():
        parts.append(f"{name}(serve: {s.get('handled', 0)} handled, {s.get('failed', 0)} "
                     "failed)")
    return " ".join(parts) or "-"
