"""What ``zmqfabric demo`` reports: events while it runs, and the summary that proves the counts.

:func:`zmqfabric.cli.demo.run.run_demo` hands each event (:class:`Started`, :class:`Waiting`,
:class:`Ready`, :class:`Progress`) to its caller's callback and returns a :class:`DemoSummary`
made by :func:`summarize` from the children's final counts. Each event and the summary read as
text (``text()``, :func:`summary_lines`) or as JSON objects (``as_dict()``). Pure: no processes,
no printing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DemoSummary", "PatternResult", "Progress", "Ready", "Started", "Waiting",
           "summarize", "summary_lines"]


# --- events reported while the demo runs ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    run_id: str
    processes: int
    roles: tuple[str, ...]

    def text(self) -> str:
        return (f"demo {self.run_id}: starting {self.processes} processes on this host "
                f"({', '.join(self.roles)})")

    def as_dict(self) -> dict[str, Any]:
        return {"event": "started", **asdict(self)}


@dataclass(frozen=True, slots=True)
class Waiting:
    elapsed: float
    ready: int
    processes: int

    def text(self) -> str:
        return f"  {self.ready}/{self.processes} processes ready after {self.elapsed:.1f} s"

    def as_dict(self) -> dict[str, Any]:
        return {"event": "waiting", **asdict(self)}


@dataclass(frozen=True, slots=True)
class Ready:
    elapsed: float
    duration: float

    def text(self) -> str:
        return (f"all processes found each other and are ready after {self.elapsed:.1f} s; "
                f"traffic for {self.duration:g} s")

    def as_dict(self) -> dict[str, Any]:
        return {"event": "ready", **asdict(self)}


@dataclass(frozen=True, slots=True)
class Progress:
    elapsed: float
    answered: int
    published: int
    delivered: tuple[int, ...]
    produced: int
    completed: int
    phase: str = "traffic"

    def text(self) -> str:
        delivered = " + ".join(f"{n:,}" for n in self.delivered)
        return (f"{self.elapsed:5.1f} s  req/rep {self.answered:,} answered | pub/sub "
                f"{self.published:,} sent, {delivered} received | pipeline {self.produced:,} "
                f"produced, {self.completed:,} done" + ("" if self.phase == "traffic" else
                                                         f"  ({self.phase})"))

    def as_dict(self) -> dict[str, Any]:
        return {"event": "progress", **asdict(self)}


# --- the summary -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PatternResult:
    pattern: str
    sent: int
    received: tuple[int, ...]
    rate: float
    unit: str
    ok: bool
    check: str


@dataclass(frozen=True, slots=True)
class DemoSummary:
    run_id: str
    processes: int
    traffic_s: float
    startup_s: float
    patterns: tuple[PatternResult, ...]
    p50_ms: float
    p99_ms: float

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.patterns)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def summary_lines(summary: DemoSummary) -> list[str]:
    """The summary as a table for people."""
    rows = [["PATTERN", "SENT", "RECEIVED", "THROUGHPUT", "CHECK"]]
    for p in summary.patterns:
        received = (f"{len(p.received)} x {p.received[0]:,}"
                    if len(p.received) > 1 and len(set(p.received)) == 1
                    else " + ".join(f"{n:,}" for n in p.received))
        rows.append([p.pattern, f"{p.sent:,}", received, f"{p.rate:,.0f} {p.unit}",
                     ("ok: " if p.ok else "FAILED: ") + p.check])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["", f"summary of demo {summary.run_id}: {summary.processes} processes, "
             f"{summary.traffic_s:.1f} s of traffic (start-up took {summary.startup_s:.1f} s)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"request round trip: p50 {summary.p50_ms:.2f} ms, p99 {summary.p99_ms:.2f} ms")
    lines.append("result: every count matches" if summary.ok else "result: COUNTS DO NOT MATCH")
    return lines


def summarize(finals: dict[str, dict[str, Any]], run_id: str, processes: int, traffic_s: float,
              startup_s: float) -> DemoSummary:
    """The summary of a run from every child's final counts (role id -> counts)."""
    client = finals["client"]
    served = {k: v["served"] for k, v in finals.items() if k.startswith("provider")}
    req_ok = (client["failed"] == 0 and client["wrong"] == 0 and client["replies"] == client["sent"]
              and sum(served.values()) == client["replies"])
    req = PatternResult(
        "req/rep", client["sent"], (client["replies"],),
        _rate(client["replies"], client["elapsed"]), "req/s", req_ok,
        f"{client['replies']:,} answered correctly, {client['failed']} failed; "
        f"served by {_split(client['by'])}")

    pub = finals["publisher"]
    subs = [v for k, v in sorted(finals.items()) if k.startswith("subscriber")]
    lost = sum(pub["sent"] - s["received"] for s in subs)
    disorder = sum(s["gaps"] + s["disorder"] for s in subs)
    events = PatternResult(
        "pub/sub", pub["sent"], tuple(s["received"] for s in subs),
        _rate(pub["sent"], pub["elapsed"]), "msg/s", lost == 0 and disorder == 0,
        f"{len(subs)} subscribers got every event in order" if lost == disorder == 0
        else f"{lost:,} events lost, {disorder:,} out of order")

    produced = finals["producer"]["sent"]
    sink = finals["sink"]
    once = (sink["unique"] == produced and sink["duplicates"] == 0
            and sink["max_id"] == produced - 1)
    pipeline = PatternResult(
        "pipeline", produced, (sink["received"],), _rate(sink["unique"], sink["elapsed"]),
        "jobs/s", once,
        ("every job exactly once at the sink (by id); " if once else
         f"{produced - sink['unique']:,} jobs missing, {sink['duplicates']:,} duplicates; ")
        + f"done by {_split(sink['by'])}")
    return DemoSummary(run_id, processes, traffic_s, startup_s, (req, events, pipeline),
                       client["p50_ms"], client["p99_ms"])


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _split(by: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(by.items())) or "nobody"
