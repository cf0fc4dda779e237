"""Reliable tasks, the worker side: a bound ROUTER per task name, served by the node's serve loop.

A producer's dispatcher connects a DEALER to each worker and opens with a credit request; the
worker answers with its prefetch (how many tasks that producer may have here at once). Task
batches then arrive within that window; the worker runs the handler of each task in order and
sends the results back, batching those of fast handlers for at most TASK_RESULT_FLUSH_S. A
result is the acknowledgement: a task is done when its handler has returned and the producer has
the result. The wire format is specified in :mod:`zmqfabric.core.wire`.

Inside a handler, :func:`current_task` tells which task (id, attempt, idempotency key) is running,
so that handlers can drop repeats: delivery is at least once.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import zmq

from ..constants import TASK_RESULT_FLUSH_S
from ..core import task_frames, wire
from ..core.records import EndpointKind
from ..errors import LocalProtocolError, RemoteProtocolError
from ..patterns.base import Bound
from ..transport.sockets import sync_view

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

log = logging.getLogger(__name__)
Handler = Callable[[Any], Any]

#: (task name, wire item [task_id, attempt, payload, key]) of the task being handled.
_CURRENT: contextvars.ContextVar[tuple[str, list[Any]]] = contextvars.ContextVar("zmqfabric_task")


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """The task a handler is running: ``id`` (the same on every delivery), ``attempt`` (from 1),
    the submitter's idempotency ``key`` (or None) and the task ``name``."""

    id: str
    attempt: int
    key: str | None
    name: str


def current_task() -> TaskInfo:
    """The task the calling handler runs. Raises LocalProtocolError outside a task handler."""
    try:
        name, item = _CURRENT.get()
    except LookupError:
        raise LocalProtocolError("current_task() is only known inside a task handler") from None
    return TaskInfo(item[0], item[1], item[3], name)


class TaskEndpoint(Bound):
    """One task name served by this node: a bound ROUTER, its handler and its prefetch.

    Served by the node's serve loop (``run()``); ``serve``/``serve_async`` take one message."""

    kind = EndpointKind.TASK
    noun = "task"

    def __init__(
        self,
        node: NodeRuntime,
        name: str,
        handler: Handler,
        prefetch: int,
        allow: Iterable[str] | None = None,
    ) -> None:
        super().__init__(node, name, zmq.ROUTER, allow)
        self.handler = handler
        self.prefetch = prefetch
        self.socket = self._sock
        self._out = sync_view(self._sock)
        self._credit = task_frames.pack_credit(prefetch)
        self.handled = 0
        self.failed = 0
        self.undeliverable = 0
        self._advertise()

    def _parse(self, frames: list[bytes]) -> tuple[list[bytes], wire.Kind, Any] | None:
        try:
            if len(frames) == 4 and not frames[1]:  # [identity, "", header, body]: a DEALER
                route, payload = frames[:2], frames[2:]
            else:
                route, payload = wire.split_route(frames)
            kind, body = task_frames.parse_to_worker(payload)
        except RemoteProtocolError as exc:
            self._refused("task", exc)
            return None
        return route, kind, body

    def serve(self, frames: list[bytes]) -> None:
        """Handle one message with the (sync) handler. Never raises for bad input."""
        parsed = self._parse(frames)
        if parsed is None:
            return
        route, kind, items = parsed
        if kind is wire.Kind.CREDIT:
            self._send(route, wire.Kind.CREDIT, self._credit)
            return
        handler, name = self.handler, self.name
        results: list[list[Any]] = []
        flush_at = 0.0
        for item in items:
            started = time.monotonic()
            token = _CURRENT.set((name, item))
            try:
                results.append([item[0], item[1], True, handler(item[2])])
            except Exception as exc:
                results.append(self._failure(item, exc))
            finally:
                _CURRENT.reset(token)
            flush_at = self._after_one(route, results, started, flush_at)
        if results:
            self._send_results(route, results)

    async def serve_async(self, frames: list[bytes]) -> None:
        """Handle one message; the handler may be a coroutine function (tasks run one by one)."""
        parsed = self._parse(frames)
        if parsed is None:
            return
        route, kind, items = parsed
        if kind is wire.Kind.CREDIT:
            self._send(route, wire.Kind.CREDIT, self._credit)
            return
        handler, name = self.handler, self.name
        results: list[list[Any]] = []
        flush_at = 0.0
        for item in items:
            started = time.monotonic()
            token = _CURRENT.set((name, item))
            try:
                value = handler(item[2])
                if inspect.isawaitable(value):
                    value = await value
                results.append([item[0], item[1], True, value])
            except Exception as exc:
                results.append(self._failure(item, exc))
            finally:
                _CURRENT.reset(token)
            flush_at = self._after_one(route, results, started, flush_at)
        if results:
            self._send_results(route, results)

    def _failure(self, item: list[Any], exc: Exception) -> list[Any]:
        self.failed += 1
        log.debug("task %s %s (attempt %s) raised", self.name, item[0], item[1], exc_info=True)
        return [item[0], item[1], False, wire.error_body(exc)]

    def _after_one(
        self, route: list[bytes], results: list[list[Any]], started: float, flush_at: float
    ) -> float:
        """Send the results so far when a handler was slow or the oldest waited long enough;
        returns the new flush time (0: nothing waiting)."""
        self.handled += 1
        now = time.monotonic()
        if not flush_at:
            flush_at = started + TASK_RESULT_FLUSH_S
        if now >= flush_at or now - started >= TASK_RESULT_FLUSH_S / 10:
            self._send_results(route, results)
            results.clear()
            return 0.0
        return flush_at

    def _send_results(self, route: list[bytes], results: list[list[Any]]) -> None:
        self._send(route, wire.Kind.RESULT, task_frames.pack_results(results))

    def _send(self, route: list[bytes], kind: wire.Kind, body: bytes) -> None:
        try:
            self._out.send_multipart(
                route + [wire.pack_header(kind, 0, time.time()), body], zmq.NOBLOCK
            )
        except zmq.ZMQError:  # the producer vanished (ROUTER_MANDATORY) or its queue is full:
            self.undeliverable += 1  # it redelivers what it did not hear back about
            self._rt.counters.add("task_results_undeliverable")

    def stats(self) -> dict[str, int]:
        return {"handled": self.handled, "failed": self.failed, "prefetch": self.prefetch,
                "undeliverable": self.undeliverable}
