"""What the metrics hooks count with: counters that threads bump without a lock, histograms
under one, the counts of one endpoint, and the wrappers put on handles' methods and on reply
handlers. Thread-safe."""

from __future__ import annotations

import bisect
import inspect
import itertools
import threading
import time
from typing import Any, Callable

from ..constants import METRICS_BUCKETS_S
from ..errors import (
    AuthorizationError,
    FabricError,
    FabricTimeoutError,
    NoProviderError,
    RemoteError,
)


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


def error_kind(exc: BaseException) -> str:
    for cls, kind in ((RemoteError, "remote"), (NoProviderError, "no_provider"),
                      (AuthorizationError, "refused"), (FabricTimeoutError, "timeout"),
                      (FabricError, "other")):
        if isinstance(exc, cls):
            return kind
    return "other"


def counted(method: Callable[..., Any], count: Count, *, every: bool) -> Callable[..., Any]:
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


def timed_call(method: Callable[..., Any], counts: EndpointCounts) -> Callable[..., Any]:
    """A requester's ``request`` counted (out: calls, in: replies), timed and its errors kept."""

    def done(start: float, exc: BaseException | None) -> None:
        if exc is None or isinstance(exc, RemoteError):
            counts.inbound.add()
            counts.durations.observe(time.perf_counter() - start)
        if exc is not None:
            counts.error(error_kind(exc))

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


def timed_handler(handler: Callable[[Any], Any], counts: EndpointCounts) -> Callable[[Any], Any]:
    """A reply handler counted (in: requests, out: replies) and timed (sync or coroutine)."""
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
