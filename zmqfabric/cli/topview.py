"""What ``zmqfabric top`` draws: rates from successive samples of each node's ``stats`` answer,
per-endpoint rates and latencies from its ``traffic`` section (nodes with metrics on), tables
that fit the terminal (rich; COLUMNS when set, 80 when not a terminal).

Rates are per second over the node's own uptime between two samples; the first refresh, with
no earlier sample, shows rates since the node started. Latency percentiles are read from the
duration histograms' buckets over the same span, interpolated inside a bucket as Prometheus'
``histogram_quantile`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from rich.table import Table

from ..constants import METRICS_BUCKETS_S
from ..core.records import NodeRecord
from .output import console, endpoints_text, new_table, now_iso, plural

Sample = tuple[NodeRecord, "dict[str, Any] | None", "str | None"]  # record, answer, error


@dataclass(frozen=True, slots=True)
class Span:
    """Two samples of one node: now, and the one before (or None on the first refresh)."""

    now: dict[str, Any]
    before: dict[str, Any] | None

    @property
    def seconds(self) -> float:
        up = _num(self.now.get("uptime_s"))
        was = _num(self.before.get("uptime_s")) if self.before else 0.0
        return up - was

    def rate(self, *path: str) -> float | None:
        """Per second of the counter at ``path`` over the span (None: no time passed)."""
        seconds = self.seconds
        if seconds <= 0:
            return None
        was = _dig(self.before, path) if self.before is not None else 0
        return max(_num(_dig(self.now, path)) - _num(was), 0.0) / seconds

    def rate_sum(self, paths: Iterable[tuple[str, ...]]) -> float | None:
        rates = [self.rate(*path) for path in paths]
        known = [r for r in rates if r is not None]
        return sum(known) if known else None


class TopView:
    """Remembers each node's last sample and draws a refresh. Call from one thread."""

    def __init__(self, scope_label: str, fabric: str, interval: float) -> None:
        """``scope_label``: where the nodes are (e.g. "this host (127.0.0.1)")."""
        self._scope = scope_label
        self._fabric = fabric
        self._interval = interval
        self._last: dict[str, dict[str, Any]] = {}
        self.console = console()

    def show(self, samples: list[Sample], redraw: bool) -> None:
        spans: list[tuple[NodeRecord, Span | None, str | None]] = []
        for record, answer, error in samples:
            if answer is None:
                spans.append((record, None, error))
                continue
            before = self._last.get(record.node_id)
            if before is not None and _num(before.get("uptime_s")) > _num(answer.get("uptime_s")):
                before = None  # the node restarted under the same id: start over
            spans.append((record, Span(answer, before), None))
            self._last[record.node_id] = answer
        out = self.console
        if redraw:
            out.clear()
        answered = [span for _, span, _ in spans if span is not None]
        new = sum(span.before is None for span in answered)
        if answered and new == len(answered):
            over = "since each node started"
        else:
            over = f"over the last {self._interval:g} s"
            if new:
                over += f" (since start for {plural(new, 'node')} new here)"
        out.print(f"--- {now_iso()[11:]}  {plural(len(samples), 'node')} of fabric "
                  f"{self._fabric!r} in {self._scope}")
        out.print(f"rates {over}; Ctrl-C to stop")
        hosts = {record.host for record, _, _ in spans}
        out.print(_nodes_table(spans, show_host=len(hosts) > 1, wide=out.width >= WIDE))
        for table in (_endpoints_table(spans), _tasks_table(spans), _devices_table(spans)):
            if table.row_count:
                out.print()
                out.print(table)
        if spans and not any(s is not None and s.now.get("traffic") for _, s, _ in spans):
            out.print("(per-endpoint rates, latency: for nodes with --metrics-port)")


# --- tables ---------------------------------------------------------------------------------

#: Below this width the node table leaves out ENDPOINTS (the endpoint table and `ls` list them).
WIDE = 110


def _nodes_table(spans: list[tuple[NodeRecord, Span | None, str | None]], show_host: bool,
                 wide: bool) -> Table:
    headers = ["NAME", *(["HOST"] if show_host else []), "UP", "REQ/S", "PUB/S", "ERR/S",
               "REFUSED", *(["ENDPOINTS"] if wide else [])]
    table = new_table(headers, flexible="ENDPOINTS" if wide else "NAME",
                      numeric={"REQ/S", "PUB/S", "ERR/S", "REFUSED"})
    for record, span, _error in spans:
        host = [record.host] if show_host else []
        listed = [endpoints_text(record) or "-"] if wide else []
        if span is None:
            table.add_row(record.name, *host, "no answer", "-", "-", "-", "-", *listed)
            continue
        counters = span.now.get("counters")
        counters = counters if isinstance(counters, dict) else {}
        traffic = span.now.get("traffic")
        if isinstance(traffic, dict) and traffic:
            served = span.rate_sum(("traffic", k, "in") for k in traffic
                                   if k.startswith("service:"))
            published = span.rate_sum(("traffic", k, "out") for k in traffic
                                      if k.startswith("stream:"))
            errors = span.rate_sum(("traffic", k, "errors", e) for k, v in traffic.items()
                                   if isinstance(v, dict) and isinstance(v.get("errors"), dict)
                                   for e in v["errors"])
        else:
            served = span.rate("counters", "replies_sent")
            published = span.rate("counters", "events_sent")
            errors = span.rate_sum(("counters", k) for k in counters if k.endswith("_errors"))
        refused = sum(_num(v) for k, v in counters.items() if k.startswith("refused_"))
        table.add_row(record.name, *host, _uptime(_num(span.now.get("uptime_s"))),
                      _rate(served), _rate(published), _rate(errors), f"{refused:,.0f}",
                      *listed)
    return table


def _by_node(spans: list[tuple[NodeRecord, Span | None, str | None]], table: Table,
             rows: Any) -> Table:
    """Rows grouped under a line with each node's name: ``rows(span)`` yields each row's cells
    after the first (the row's own name, indented under its node)."""
    for record, span, _ in spans:
        if span is None:
            continue
        lines = list(rows(span))
        if lines:
            table.add_row(record.name)
            for cells in lines:
                table.add_row(f"  {cells[0]}", *cells[1:])
    return table


def _endpoints_table(spans: list[tuple[NodeRecord, Span | None, str | None]]) -> Table:
    table = new_table(["NODE / ENDPOINT", "IN/S", "OUT/S", "ERR/S", "P50", "P99"],
                      flexible="NODE / ENDPOINT", numeric={"IN/S", "OUT/S", "ERR/S", "P50", "P99"})

    def rows(span: Span) -> Iterable[list[str]]:
        found = span.now.get("traffic")
        traffic: dict[str, Any] = found if isinstance(found, dict) else {}
        for key in sorted(traffic):
            now = traffic[key] if isinstance(traffic[key], dict) else {}
            before = _dig(span.before, ("traffic", key)) if span.before else None
            listed = now.get("errors")
            errors: dict[str, Any] = listed if isinstance(listed, dict) else {}
            failed = span.rate_sum(("traffic", key, "errors", e) for e in errors)
            p50, p99 = _percentiles(now.get("duration"), _dig(before, ("duration",)))
            yield [key, _rate(span.rate("traffic", key, "in")),
                   _rate(span.rate("traffic", key, "out")), _rate(failed), _seconds(p50),
                   _seconds(p99)]

    return _by_node(spans, table, rows)


def _tasks_table(spans: list[tuple[NodeRecord, Span | None, str | None]]) -> Table:
    table = new_table(["NODE / TASK", "AS", "DONE/S", "PENDING", "IN FLIGHT", "FAILED/S"],
                      flexible="NODE / TASK",
                      numeric={"DONE/S", "PENDING", "IN FLIGHT", "FAILED/S"})

    def rows(span: Span) -> Iterable[list[str]]:
        tasks = span.now.get("tasks")
        tasks = tasks if isinstance(tasks, dict) else {}
        for name, s in sorted((tasks.get("submit") or {}).items()):
            yield [name, "producer", _rate(span.rate("tasks", "submit", name, "done")),
                   f"{_num(s.get('queued')):,.0f}", f"{_num(s.get('in_flight')):,.0f}",
                   _rate(span.rate("tasks", "submit", name, "dead"))]
        for name in sorted(tasks.get("serve") or {}):
            yield [name, "worker", _rate(span.rate("tasks", "serve", name, "handled")), "-",
                   "-", _rate(span.rate("tasks", "serve", name, "failed"))]

    return _by_node(spans, table, rows)


def _devices_table(spans: list[tuple[NodeRecord, Span | None, str | None]]) -> Table:
    """Device sections are named "<kind>:<name>" and hold the device's frame counters."""
    table = new_table(["NODE / DEVICE", "STATE", "FRAMES/S", "PROVIDERS"],
                      flexible="NODE / DEVICE", numeric={"FRAMES/S", "PROVIDERS"})

    def rows(span: Span) -> Iterable[list[str]]:
        for key, value in sorted(span.now.items()):
            if ":" in key and isinstance(value, dict) and "relays" in value:
                frames = span.rate_sum([(key, "front_frames_in"), (key, "back_frames_in")])
                yield [key, str(value.get("state", "?")), _rate(frames),
                       f"{_num(value.get('providers')):,.0f}"]

    return _by_node(spans, table, rows)


# --- numbers --------------------------------------------------------------------------------


def _percentiles(now: Any, before: Any) -> tuple[float | None, float | None]:
    """p50 and p99 (s) of the observations between two histogram snapshots."""
    counts = _buckets(now)
    if counts is None:
        return None, None
    earlier = _buckets(before)
    if earlier is not None and len(earlier) == len(counts):
        counts = [max(a - b, 0) for a, b in zip(counts, earlier, strict=True)]
    return quantile(counts, 0.5), quantile(counts, 0.99)


def quantile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of bucket ``counts`` (METRICS_BUCKETS_S, then the overflow bucket),
    interpolated inside its bucket; None without observations. The overflow bucket answers
    with the largest bound."""
    total = sum(counts)
    if total <= 0 or len(counts) != len(METRICS_BUCKETS_S) + 1:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(METRICS_BUCKETS_S):
                return METRICS_BUCKETS_S[-1]
            low = METRICS_BUCKETS_S[i - 1] if i else 0.0
            return low + (METRICS_BUCKETS_S[i] - low) * (rank - seen) / n
        seen += n
    return METRICS_BUCKETS_S[-1]


def _buckets(histogram: Any) -> list[int] | None:
    buckets = histogram.get("buckets") if isinstance(histogram, dict) else None
    if isinstance(buckets, list) and all(isinstance(n, int) for n in buckets):
        return buckets
    return None


def _dig(value: Any, path: Iterable[str]) -> Any:
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.001:
        return f"{value * 1e6:.0f}µs"
    if value < 1:
        return f"{value * 1000:.1f}ms"
    return f"{value:.2f}s"


def _uptime(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"

