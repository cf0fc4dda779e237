"""Shared by the perf scripts: the case matrix, statistics, the table and JSON lines (the plot is
bench_plot.py).

Statistics: every latency sample is kept; percentiles are nearest-rank on the sorted array of one
run (p50, p99, p99.9, max), never averages. A case run several times (the headline cases) reports
the median over runs of each figure, and raw and fabric runs alternate (raw, fabric, fabric, raw,
...) so that drift on a noisy machine hits both alike.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

KIB = 1024
SIZES = (64, 512, 4 * KIB, 32 * KIB, 256 * KIB, 1024 * KIB)
QUICK_SIZES = (64, 1024 * KIB)
TRANSPORTS = ("tcp", "ipc", "inproc")
IMPLS = ("raw", "fabric")
#: The headline cases (targets in perf/README.md) run this many times; the rest once.
HEADLINE = {("tcp", 64), ("tcp", 1024 * KIB)}

FIELDS = (
    "bench",
    "pattern",
    "transport",
    "size",
    "impl",
    "samples",
    "p50_us",
    "p99_us",
    "p999_us",
    "max_us",
    "msgs_per_s",
    "mb_per_s",
    "ratio",
)


@dataclass
class Row:
    """One line of output: one (bench, pattern, transport, size, impl), medians over runs."""

    bench: str
    pattern: str
    transport: str
    size: int
    impl: str
    samples: int = 0
    p50_us: float | None = None
    p99_us: float | None = None
    p999_us: float | None = None
    max_us: float | None = None
    msgs_per_s: float | None = None
    mb_per_s: float | None = None
    ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in FIELDS}
        out.update(self.extra)
        return out


def percentile(sorted_samples: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..1)."""
    if not sorted_samples:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_samples)))
    return sorted_samples[min(rank, len(sorted_samples)) - 1]


def latency_figures(samples_s: list[float]) -> dict[str, float]:
    """p50/p99/p99.9/max in microseconds from one run's samples (seconds)."""
    ordered = sorted(samples_s)
    return {
        "samples": len(ordered),
        "p50_us": percentile(ordered, 0.50) * 1e6,
        "p99_us": percentile(ordered, 0.99) * 1e6,
        "p999_us": percentile(ordered, 0.999) * 1e6,
        "max_us": ordered[-1] * 1e6 if ordered else math.nan,
    }


def merge_runs(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Median over runs of every figure; ``samples`` is the total; per-run figures kept."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r.get(key) is not None]
        if key == "samples":
            out[key] = int(sum(values))
        elif values:
            out[key] = statistics.median(values)
    out["runs"] = len(runs)
    return out


def alternate(runs: int) -> list[tuple[int, str]]:
    """(run index, impl) in the order to measure: raw, fabric, fabric, raw, raw, fabric, ..."""
    order: list[tuple[int, str]] = []
    for i in range(runs):
        pair = IMPLS if i % 2 == 0 else IMPLS[::-1]
        order.extend((i, impl) for impl in pair)
    return order


def size_label(size: int) -> str:
    if size >= KIB * KIB and size % (KIB * KIB) == 0:
        return f"{size // (KIB * KIB)} MiB"
    if size >= KIB and size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size} B"


def parse_sizes(text: str | None, quick: bool) -> tuple[int, ...]:
    if not text:
        return QUICK_SIZES if quick else SIZES
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        mult = 1
        for suffix, m in (("kib", KIB), ("k", KIB), ("mib", KIB * KIB), ("m", KIB * KIB), ("b", 1)):
            if item.endswith(suffix):
                item, mult = item[: -len(suffix)], m
                break
        out.append(int(item) * mult)
    return tuple(out)


def parse_list(text: str | None, allowed: Iterable[str], default: Iterable[str]) -> tuple[str, ...]:
    if not text:
        return tuple(default)
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def add_ratios(rows: list[Row]) -> None:
    """ratio = fabric/raw on fabric rows: p50 for latency (p99 ratio in ratio_p99), msgs/s for
    throughput."""
    raw = {(r.bench, r.pattern, r.transport, r.size): r for r in rows if r.impl == "raw"}
    for row in rows:
        base = raw.get((row.bench, row.pattern, row.transport, row.size))
        if row.impl != "fabric" or base is None:
            continue
        if row.bench == "latency" and row.p50_us and base.p50_us:
            row.ratio = row.p50_us / base.p50_us
            if row.p99_us and base.p99_us:
                row.extra["ratio_p99"] = row.p99_us / base.p99_us
        elif row.msgs_per_s and base.msgs_per_s:
            row.ratio = row.msgs_per_s / base.msgs_per_s


# --- output ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def print_table(rows: list[Row], out: Any = sys.stdout) -> None:
    if not rows:
        return
    latency = rows[0].bench == "latency"
    if latency:
        head = (
            f"{'pattern':8} {'transport':9} {'size':>8} {'impl':6} {'samples':>8} {'p50 us':>9} "
            f"{'p99 us':>9} {'p99.9 us':>9} {'max us':>9} {'ratio':>6} {'p99 r':>6}"
        )
    else:
        head = (
            f"{'pattern':8} {'transport':9} {'size':>8} {'impl':6} {'messages':>9} "
            f"{'msgs/s':>11} {'MB/s':>9} {'ratio':>6}"
        )
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        runs = r.extra.get("runs", 1)
        mark = f" (median of {runs})" if runs > 1 else ""
        if latency:
            print(
                f"{r.pattern:8} {r.transport:9} {size_label(r.size):>8} {r.impl:6} {r.samples:>8} "
                f"{_fmt(r.p50_us, '9.1f')} {_fmt(r.p99_us, '9.1f')} {_fmt(r.p999_us, '9.1f')} "
                f"{_fmt(r.max_us, '9.0f')} {_fmt(r.ratio, '6.2f')} "
                f"{_fmt(r.extra.get('ratio_p99'), '6.2f')}{mark}",
                file=out,
            )
        else:
            print(
                f"{r.pattern:8} {r.transport:9} {size_label(r.size):>8} {r.impl:6} {r.samples:>9} "
                f"{_fmt(r.msgs_per_s, '11,.0f')} {_fmt(r.mb_per_s, '9.1f')} "
                f"{_fmt(r.ratio, '6.2f')}{mark}",
                file=out,
            )
    out.flush()


def markdown_table(rows: list[Row]) -> str:
    """The rows of one bench as a markdown table (fabric rows carry the ratio)."""
    if not rows:
        return ""
    latency = rows[0].bench == "latency"
    if latency:
        out = [
            "| pattern | transport | size | impl | samples | p50 µs | p99 µs | p99.9 µs | max µs "
            "| p50 ratio | p99 ratio |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        out = [
            "| pattern | transport | size | impl | messages | msgs/s | MB/s | ratio |",
            "|---|---|---:|---|---:|---:|---:|---:|",
        ]
    for r in rows:
        runs = r.extra.get("runs", 1)
        size = size_label(r.size) + (f" (×{runs})" if runs > 1 else "")
        if latency:
            out.append(
                f"| {r.pattern} | {r.transport} | {size} | {r.impl} | {r.samples} | "
                f"{_fmt(r.p50_us, '.1f')} | {_fmt(r.p99_us, '.1f')} | "
                f"{_fmt(r.p999_us, '.1f')} | {_fmt(r.max_us, '.0f')} | "
                f"{_fmt(r.ratio, '.2f')} | {_fmt(r.extra.get('ratio_p99'), '.2f')} |"
            )
        else:
            out.append(
                f"| {r.pattern} | {r.transport} | {size} | {r.impl} | {r.samples} | "
                f"{_fmt(r.msgs_per_s, ',.0f')} | {_fmt(r.mb_per_s, '.1f')} | "
                f"{_fmt(r.ratio, '.2f')} |"
            )
    return "\n".join(out)


def print_targets(
    lines: list[tuple[str, float | None, str, bool | None]], out: Any = sys.stdout
) -> None:
    """Headline figures against their targets: (what, value, target text, met)."""
    if not lines:
        return
    print("\nheadline (tcp loopback, medians of runs):", file=out)
    for what, value, target, met in lines:
        verdict = "-" if met is None else ("met" if met else "MISSED")
        print(f"  {what:44} {_fmt(value, '6.2f')}   target {target:8} {verdict}", file=out)
    out.flush()


def emit_json(rows: list[Row], out: Any = sys.stdout) -> None:
    for row in rows:
        print(json.dumps(_clean(row.as_json())), file=out)
    out.flush()


def _clean(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, float):
            value = None if math.isnan(value) else round(value, 3)
        out[key] = value
    return out


def read_json_rows(paths: Iterable[str]) -> list[Row]:
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    data = json.loads(line)
                    known = {k: data.pop(k) for k in FIELDS if k in data}
                    rows.append(Row(**known, extra=data))
    return rows


def note(text: str, quiet: bool = False) -> None:
    """Progress on stderr (stdout stays a table or JSON lines)."""
    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPUs, load {load:.1f}, python {sys.version.split()[0]}"


Summarize = Callable[[str, str, str, int, str, list[dict[str, Any]]], Row]
