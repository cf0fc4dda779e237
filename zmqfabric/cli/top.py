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
from .output import emit, now_iso, record_json, scope_text
from .topview import TopView

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
    """Show every node's stats, refreshed, with rates per second between refreshes: requests
    served, events published, errors, refusals and endpoints per node; then, for nodes that
    serve metrics (--metrics-port), each endpoint's messages in and out per second, errors and
    latency (p50, p99 of the handler's time for services, of the round trip for calls); task
    queues (done, pending, in flight, failed); devices (frames relayed per second).

    The first refresh comes after a discovery window of LS_LISTEN_S (1.5 s) and shows rates
    since each node started. Tables fit the terminal's width (COLUMNS). On a terminal the
    view redraws in place; piped, each refresh appends a header line and tables; with --json,
    each refresh prints one object per node (its control "stats" answer, plus "time" and
    "refresh"; a node that did not answer has an "error" field instead). Runs until Ctrl-C,
    --count refreshes (exit 4 if an explicit --timeout ends it first) or an explicit
    --timeout."""
    deadline = cfg.deadline
    redraw = not cfg.json and click.get_text_stream("stdout").isatty()
    ask_s = min(cfg.timeout, CONTROL_TIMEOUT_S)
    refreshes = 0
    view = TopView(scope_text(cfg.scope), cfg.fabric, interval)
    with cfg.observer() as node:
        pool = ThreadPoolExecutor(PARALLEL_ASKS, thread_name_prefix="zmqfabric-cli-top")
        try:
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
                    view.show(samples, redraw)
                due = max(due + interval, time.monotonic())
        finally:
            # On Ctrl-C, asks in flight are not waited for: closing the node (next) ends them
            # at once (their sockets' context is terminated), so top ends on the first Ctrl-C.
            pool.shutdown(wait=False, cancel_futures=True)
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
