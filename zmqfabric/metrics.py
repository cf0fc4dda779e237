"""Prometheus metrics of one node: ``Node(name, metrics_port=PORT)`` (CLI: ``--metrics-port``)
serves ``http://<scope address>:PORT/metrics`` (OpenMetrics when the scraper asks for it, else
Prometheus text), from a registry of the node's own: nothing is process-global.

Every series carries the label ``node``:

=====================================  =========  ==============================================
metric                                 type       what
=====================================  =========  ==============================================
zmqfabric_messages_total               counter    per endpoint (``kind``, ``endpoint``) and
                                                  ``direction``: ``service`` in = requests
                                                  handled, out = replies; ``request`` out =
                                                  calls, in = replies; ``stream`` out = events
                                                  published, in = received; ``pipeline`` the
                                                  same. Messages, not frames.
zmqfabric_endpoint_errors_total        counter    per endpoint and ``error``: handler (it
                                                  raised), remote, timeout, no_provider, refused
zmqfabric_request_duration_seconds     histogram  per ``service``: call to reply as the caller
                                                  sees it (retries included), remote errors too
zmqfabric_handler_duration_seconds     histogram  per ``service``: the handler's own time
zmqfabric_refused_total                counter    malformed or refused input by ``what`` (the
                                                  node's ``refused_*`` counters)
zmqfabric_node_events_total            counter    the node's other counters by ``event``
                                                  (stale_replies, peers_lost, *_errors ...)
zmqfabric_tasks                        gauge      per ``task``: ``state`` pending (queued or
                                                  waiting to retry) and in_flight
zmqfabric_task_events_total            counter    per ``task``: done, retried, redelivered,
                                                  dead, late (this node as producer)
zmqfabric_tasks_handled_total          counter    per ``task`` and ``result`` ok/failed (worker)
zmqfabric_device_frames_total          counter    per ``device``, ``side`` and ``direction``
zmqfabric_device_bytes_total           counter    the same, in bytes
zmqfabric_peers                        gauge      peers known; ``zmqfabric_refused_peers``: seen
                                                  but refused for security reasons
zmqfabric_uptime_seconds               gauge      since start()
=====================================  =========  ==============================================

Control-plane traffic (ping, info, stats, hello) is not counted as messages.

Costs: with metrics off the runtime's ``metrics`` is None and nothing here runs. With metrics on,
the node's counters and sections are read at scrape time; the per-message counts and the
histograms come from wrappers put on each handle's public methods when the runtime tracks it
(``instrument``) and on the reply handlers (``timed_handler``), a few hundred ns per call.
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import logging
import threading
import time
from typing import Any, Callable, Iterator, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .constants import METRICS_BUCKETS_S, METRICS_REQUEST_TIMEOUT_S, THREAD_JOIN_TIMEOUT_S
from .core.records import EndpointKind, NodeRecord
from .errors import (
    AuthorizationError,
    FabricError,
    FabricTimeoutError,
    NoProviderError,
    RemoteError,
)
from .stats import Counters

log = logging.getLogger(__name__)

__all__ = ["NodeMetrics", "Source"]


class Source(Protocol):
    """What the collector reads of its node (the node's runtime)."""

    name: str
    node_id: str
    counters: Counters
    started_at: float

    def stats_sections(self) -> dict[str, Any]: ...


class Count:
    """A counter that threads may bump without a lock: ``next()`` on ``itertools.count`` is one
    C call, atomic under the GIL."""

    __slots__ = ("_count", "add")

    def __init__(self) -> None:
        self._count = itertools.count()
        self.add: Callable[[], object] = self._count.__next__

    @property
    def value(self) -> int:
        return int(repr(self._count)[6:-1])  # "count(N)": reading it does not advance it


class Histogram:
    """Bucket counts and a sum under one lock (METRICS_BUCKETS_S, upper bounds inclusive)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(METRICS_BUCKETS_S) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(METRICS_BUCKETS_S, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[int], float]:
        """(count per bucket, the last one past the largest bound; the sum)."""
        with self._lock:
            return list(self._counts), self._sum


class EndpointCounts:
    """One endpoint's messages each way, errors by kind and durations."""

    def __init__(self) -> None:
        self.inbound = Count()
        self.outbound = Count()
        self.errors: dict[str, Count] = {}
        self.durations = Histogram()
        self._lock = threading.Lock()

    def error(self, kind: str) -> None:
        count = self.errors.get(kind)
        if count is None:
            with self._lock:
                count = self.errors.setdefault(kind, Count())
        count.add()

    def as_dict(self) -> dict[str, Any]:
        counts, total = self.durations.snapshot()
        return {"in": self.inbound.value, "out": self.outbound.value,
                "errors": {k: c.value for k, c in list(self.errors.items())},
                "duration": {"count": sum(counts), "sum": total, "buckets": counts}}


def _error_kind(exc: BaseException) -> str:
    for cls, kind in ((RemoteError, "remote"), (NoProviderError, "no_provider"),
                      (AuthorizationError, "refused"), (FabricTimeoutError, "timeout"),
                      (FabricError, "other")):
        if isinstance(exc, cls):
            return kind
    return "other"


class NodeMetrics:
    """The metrics of one node: hooks, a collector, and an HTTP server whose lifetime the node
    owns (``start`` in the node's start, ``close`` in its close). Hooks are thread-safe."""

    def __init__(self, source: Source, *, peers: Callable[[], list[NodeRecord]],
                 refused_peers: Callable[[], list[Any]]) -> None:
        """``peers``: the records the node knows (itself included); ``refused_peers``: those
        it refused. Allocates only: ``start`` serves."""
        self._source = source
        self._peers = peers
        self._refused_peers = refused_peers
        self._lock = threading.Lock()
        self._endpoints: dict[tuple[str, str], EndpointCounts] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # type: ignore[arg-type]  # a Collector by its collect()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- hooks ----------------------------------------------------------------------------

    def endpoint(self, kind: str, name: str) -> EndpointCounts:
        key = (kind, name)
        with self._lock:
            counts = self._endpoints.get(key)
            if counts is None:
                counts = self._endpoints[key] = EndpointCounts()
            return counts

    def instrument(self, handle: Any) -> None:
        """Count what ``handle`` sends and receives (requests also timed): its public methods
        are replaced by counting wrappers on the instance. Handles of other kinds (services,
        task workers, devices, control) are left alone."""
        kind, name = getattr(handle, "kind", None), getattr(handle, "name", "")
        if kind is EndpointKind.REPLY and hasattr(handle, "request"):
            handle.request = _timed_call(handle.request, self.endpoint("request", name))
        elif kind in (EndpointKind.STREAM, EndpointKind.PIPELINE):
            counts = self.endpoint(kind.noun, name)
            if hasattr(handle, "send"):
                handle.send = _counted(handle.send, counts.outbound, every=True)
            for method in ("recv", "recv_message"):
                if hasattr(handle, method):
                    setattr(handle, method,
                            _counted(getattr(handle, method), counts.inbound, every=False))

    def timed_handler(self, service: str, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``handler`` timed and counted as service ``service`` (sync or coroutine function)."""
        counts = self.endpoint("service", service)
        if inspect.iscoroutinefunction(handler):
            async def timed_async(body: Any) -> Any:
                counts.inbound.add()
                start = time.perf_counter()
                try:
                    result = await handler(body)
                except Exception:
                    counts.error("handler")
                    raise
                finally:
                    counts.durations.observe(time.perf_counter() - start)
                counts.outbound.add()
                return result
            return timed_async

        def timed(body: Any) -> Any:
            counts.inbound.add()
            start = time.perf_counter()
            try:
                result = handler(body)
            except Exception:
                counts.error("handler")
                raise
            finally:
                counts.durations.observe(time.perf_counter() - start)
            counts.outbound.add()
            return result
        return timed

    def endpoint_stats(self) -> dict[str, Any]:
        """Every endpoint's counts as ``{"<kind>:<name>": {...}}`` (the ``traffic`` section of
        the node's ``stats`` answer; ``zmqfabric top`` takes rates and latencies from it)."""
        with self._lock:
            items = list(self._endpoints.items())
        return {f"{kind}:{name}": counts.as_dict() for (kind, name), counts in items}

    # --- the collector (the scraping thread) -----------------------------------------------

    def collect(self) -> Iterator[Metric]:
        src = self._source
        node = src.name
        yield from self._endpoint_metrics(node)
        refused = CounterMetricFamily("zmqfabric_refused", "Refused or malformed input, by what",
                                      labels=["node", "what"])
        events = CounterMetricFamily("zmqfabric_node_events", "The node's other counters",
                                     labels=["node", "event"])
        for key, value in src.counters.snapshot().items():
            if key.startswith("refused_"):
                refused.add_metric([node, key[len("refused_"):]], value)
            elif key not in _TRAFFIC_COUNTERS:
                events.add_metric([node, key], value)
        yield refused
        yield events
        sections = src.stats_sections()
        yield from _task_metrics(node, sections.get("tasks"))
        yield from _device_metrics(node, sections)
        peers = GaugeMetricFamily("zmqfabric_peers", "Peers this node knows", labels=["node"])
        peers.add_metric([node], len([r for r in self._peers() if r.node_id != src.node_id]))
        yield peers
        refused_peers = GaugeMetricFamily("zmqfabric_refused_peers", "Peers seen but refused "
                                          "for security reasons", labels=["node"])
        refused_peers.add_metric([node], len(self._refused_peers()))
        yield refused_peers
        uptime = GaugeMetricFamily("zmqfabric_uptime_seconds", "Seconds since start()",
                                   labels=["node"])
        uptime.add_metric([node], time.monotonic() - src.started_at if src.started_at else 0.0)
        yield uptime

    def _endpoint_metrics(self, node: str) -> Iterator[Metric]:
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
        with self._lock:
            items = list(self._endpoints.items())
        for (kind, name), counts in items:
            messages.add_metric([node, kind, name, "in"], counts.inbound.value)
            messages.add_metric([node, kind, name, "out"], counts.outbound.value)
            for error, count in list(counts.errors.items()):
                errors.add_metric([node, kind, name, error], count.value)
            family = families.get(kind)
            if family is not None:
                buckets, total = counts.durations.snapshot()
                family.add_metric([node, name], _cumulative(buckets), total)
        yield messages
        yield errors
        yield from families.values()

    # --- the HTTP server --------------------------------------------------------------------

    def start(self, address: str, port: int) -> None:
        """Serve /metrics on ``address:port`` (0: any free port) from a node-owned thread.
        Raises FabricError when the port cannot be bound."""
        app = make_wsgi_app(self.registry)

        def metrics_only(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"metrics are at /metrics\n"]
            return app(environ, start_response)

        try:
            server = make_server(address, port, metrics_only, _Server, _QuietHandler)
        except OSError as exc:
            raise FabricError(f"cannot serve metrics on {address}:{port}: {exc}") from exc
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name=f"zmqfabric-metrics-{self._source.name}")
        self._thread.start()
        log.info("node %s serves metrics at %s", self._source.name, self.url)

    @property
    def url(self) -> str | None:
        """``http://ADDRESS:PORT/metrics`` while serving, else None."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        return f"http://{host}:{port}/metrics"

    def close(self) -> None:
        """Stop serving and join the thread (a scrape under way finishes first, bounded by
        METRICS_REQUEST_TIMEOUT_S). Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.shutdown()
        thread.join(THREAD_JOIN_TIMEOUT_S)
        server.server_close()


#: Node counters of traffic, exported per endpoint instead (and counting control replies too).
_TRAFFIC_COUNTERS = frozenset({"replies_sent", "events_sent"})


class _Server(WSGIServer):
    """One scrape at a time; a client's failure (it stalled, it hung up) is logged at debug
    level instead of socketserver's traceback on stderr."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    """No access log; a client that stalls is dropped after METRICS_REQUEST_TIMEOUT_S."""

    timeout = METRICS_REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, n in zip((*METRICS_BUCKETS_S, float("inf")), counts, strict=True):
        running += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
    return out


def _counted(method: Callable[..., Any], count: Count, *, every: bool) -> Callable[..., Any]:
    """``method`` counting each call (``every``) or each call that returned something."""
    add = count.add
    if inspect.iscoroutinefunction(method):
        async def counted_async(*args: Any, **kwargs: Any) -> Any:
            result = await method(*args, **kwargs)
            if every or result is not None:
                add()
            return result
        return counted_async

    def counted(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        if every or result is not None:
            add()
        return result
    return counted


def _timed_call(method: Callable[..., Any], counts: EndpointCounts) -> Callable[..., Any]:
    """A requester's ``request`` counted (out: calls, in: replies), timed and its errors kept."""

    def done(start: float, exc: BaseException | None) -> None:
        if exc is None or isinstance(exc, RemoteError):
            counts.inbound.add()
            counts.durations.observe(time.perf_counter() - start)
        if exc is not None:
            counts.error(_error_kind(exc))

    if inspect.iscoroutinefunction(method):
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            counts.outbound.add()
            start = time.perf_counter()
            try:
                result = await method(*args, **kwargs)
            except Exception as exc:
                done(start, exc)
                raise
            done(start, None)
            return result
        return timed_async

    def timed(*args: Any, **kwargs: Any) -> Any:
        counts.outbound.add()
        start = time.perf_counter()
        try:
            result = method(*args, **kwargs)
        except Exception as exc:
            done(start, exc)
            raise
        done(start, None)
        return result
    return timed


def _task_metrics(node: str, tasks: Any) -> Iterator[Metric]:
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


def _device_metrics(node: str, sections: dict[str, Any]) -> Iterator[Metric]:
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
