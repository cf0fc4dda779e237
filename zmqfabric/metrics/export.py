"""The metric families a node exports, built at scrape time from what it holds: the hooks'
endpoint counts, the node's counters, its tasks, devices and peers (see the table in
:mod:`zmqfabric.metrics`)."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..constants import METRICS_BUCKETS_S
from .counts import EndpointCounts

#: Node counters of traffic: exported per endpoint instead (zmqfabric_messages_total).
TRAFFIC_COUNTERS = frozenset({"replies_sent", "events_sent"})


def endpoint_metrics(node: str, items: list[tuple[tuple[str, str], EndpointCounts]]
                     ) -> Iterator[Metric]:
    """Messages, errors and the duration histograms of every endpoint."""
    messages = CounterMetricFamily(
        "zmqfabric_messages", "Messages per endpoint and direction (not frames; control "
        "traffic excluded)", labels=["node", "kind", "endpoint", "direction"])
    errors = CounterMetricFamily("zmqfabric_endpoint_errors", "Failed calls and handlers",
                                 labels=["node", "kind", "endpoint", "error"])
    families = {
        "request": HistogramMetricFamily(
            "zmqfabric_request_duration_seconds", "Request to reply, as the caller sees "
            "it (retries included)", labels=["node", "service"]),
        "service": HistogramMetricFamily(
            "zmqfabric_handler_duration_seconds", "Time in the service's handler",
            labels=["node", "service"]),
    }
    for (kind, name), counts in items:
        messages.add_metric([node, kind, name, "in"], counts.inbound.value)
        messages.add_metric([node, kind, name, "out"], counts.outbound.value)
        for error, count in list(counts.errors.items()):
            errors.add_metric([node, kind, name, error], count.value)
        family = families.get(kind)
        if family is not None:
            buckets, total = counts.durations.snapshot()
            family.add_metric([node, name], cumulative(buckets), total)
    yield messages
    yield errors
    yield from families.values()


def counter_metrics(node: str, counters: dict[str, int]) -> Iterator[Metric]:
    """The node's counters: refusals by what, the others as events (traffic is per endpoint)."""
    refused = CounterMetricFamily("zmqfabric_refused", "Refused or malformed input, by what",
                                  labels=["node", "what"])
    events = CounterMetricFamily("zmqfabric_node_events", "The node's other counters",
                                 labels=["node", "event"])
    for key, value in counters.items():
        if key.startswith("refused_"):
            refused.add_metric([node, key[len("refused_"):]], value)
        elif key not in TRAFFIC_COUNTERS:
            events.add_metric([node, key], value)
    yield refused
    yield events


def cumulative(counts: list[int]) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, n in zip((*METRICS_BUCKETS_S, float("inf")), counts, strict=True):
        running += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
    return out


def task_metrics(node: str, tasks: Any) -> Iterator[Metric]:
    states = GaugeMetricFamily("zmqfabric_tasks", "Tasks this node submitted, by state",
                               labels=["node", "task", "state"])
    events = CounterMetricFamily("zmqfabric_task_events", "Task outcomes as producer",
                                 labels=["node", "task", "event"])
    handled = CounterMetricFamily("zmqfabric_tasks_handled", "Tasks handled here as worker",
                                  labels=["node", "task", "result"])
    tasks = tasks if isinstance(tasks, dict) else {}
    for name, s in (tasks.get("submit") or {}).items():
        states.add_metric([node, name, "pending"], s.get("queued", 0))
        states.add_metric([node, name, "in_flight"], s.get("in_flight", 0))
        for event in ("done", "retried", "redelivered", "dead", "late"):
            events.add_metric([node, name, event], s.get(event, 0))
    for name, s in (tasks.get("serve") or {}).items():
        failed = s.get("failed", 0)
        handled.add_metric([node, name, "ok"], s.get("handled", 0) - failed)
        handled.add_metric([node, name, "failed"], failed)
    yield states
    yield events
    yield handled


def device_metrics(node: str, sections: dict[str, Any]) -> Iterator[Metric]:
    """Device sections are named "<kind>:<name>" and hold the DeviceStats counters."""
    labels = ["node", "device", "side", "direction"]
    frames = CounterMetricFamily("zmqfabric_device_frames", "Frames relayed by devices",
                                 labels=labels)
    sizes = CounterMetricFamily("zmqfabric_device_bytes", "Bytes relayed by devices",
                                labels=labels)
    for key, value in sections.items():
        if ":" not in key or not isinstance(value, dict) or "relays" not in value:
            continue
        for side in ("front", "back"):
            for direction in ("in", "out"):
                frames.add_metric([node, key, side, direction],
                                  value.get(f"{side}_frames_{direction}", 0))
                sizes.add_metric([node, key, side, direction],
                                 value.get(f"{side}_bytes_{direction}", 0))
    yield frames
    yield sizes
