"""Reliable tasks, the worker side: a bound ROUTER per task name, served by the node's ``run()``.

A producer's dispatcher connects a DEALER to each worker and opens with a credit request; the
worker answers with its prefetch (how many tasks that producer may have here at once) and its
slots (how many run at once: ``concurrency``). Task batches then arrive within that window; the
worker starts them in the order received, at most ``slots`` at a time, and sends the results
back, batching those of fast handlers for at most TASK_RESULT_FLUSH_S. A result is the
acknowledgement: a task is done when its handler has returned and the producer has the result. A
handler that raises a BaseException other than Exception (``SystemExit``) sends no result: the
node leaves, and the producer gives the task to another worker. The wire format is specified in
:mod:`zmqfabric.core.task_frames`.

Inside a handler, :func:`current_task` tells which task (id, attempt, idempotency key) is running,
so that handlers can drop repeats: delivery is at least once.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import zmq

from ..constants import TASK_DEADLINE_S, TASK_RESULT_FLUSH_S
from ..core import task_frames, wire
from ..core.records import EndpointKind
from ..errors import LocalProtocolError, RemoteProtocolError
from ..patterns.base import Bound
from ..patterns.handlers import FATAL, OK, Handler, Job, SlotBoard, Status, outcome
from ..transport.frames import NOBLOCK, send_frames
from ..transport.sockets import sync_view

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

log = logging.getLogger(__name__)
#: A result this long in the making is sent at once, with those waiting for its producer.
_SLOW_S = TASK_RESULT_FLUSH_S / 10
_monotonic = time.monotonic
#: Read per message: module globals, not enum class attributes (slow on Python 3.11).
_TASK, _RESULT = wire.Kind.TASK, wire.Kind.RESULT

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
    """One task name served by this node: a bound ROUTER, its handler, its prefetch and its
    ``concurrency`` handler slots.

    A :class:`~zmqfabric.patterns.handlers.Served` endpoint: ``accept``, ``done`` and ``flush``
    belong to the socket's owner, ``enter``/``leave`` to the slot running the handler; ``stats``
    is thread-safe."""

    kind = EndpointKind.TASK
    noun = "task"
    #: Results wait in ``_pending`` for ``flush`` (those of the messages that arrived together).
    flushes = True

    def __init__(
        self,
        node: NodeRuntime,
        name: str,
        handler: Handler,
        prefetch: int,
        allow: Iterable[str] | None = None,
        concurrency: int = 1,
        hung_after_s: float = TASK_DEADLINE_S,
    ) -> None:
        super().__init__(node, name, zmq.ROUTER, allow)
        self.handler = handler
        self.prefetch = prefetch
        self.concurrency = concurrency
        #: A handler slower than the task deadline is hung: its producer has given the task
        #: to another worker.
        self.slots = SlotBoard(concurrency, hung_after_s)
        self.socket = self._sock
        self._out = sync_view(self._sock)
        self._credit = task_frames.pack_credit(prefetch, concurrency)
        #: Slot 0's start in ``slots`` (serve_batch writes it itself).
        self._started = self.slots.started
        #: Results not sent yet, per producer (its routing id): (route, results, oldest at).
        self._pending: dict[bytes, tuple[list[bytes], list[list[Any]], float]] = {}
        self.handled = 0
        self.failed = 0
        self.undeliverable = 0
        self._advertise()

    # --- Served -------------------------------------------------------------------------------

    def accept(self, frames: list[bytes]) -> list[Job]:
        """The tasks in ``frames`` as jobs, in order; a credit request is answered here."""
        try:
            if len(frames) == 4 and not frames[1]:  # [identity, "", header, body]: a DEALER
                route, payload = frames[:2], frames[2:]
            else:
                route, payload = wire.split_route(frames)
            kind, items = task_frames.parse_to_worker(payload)
        except RemoteProtocolError as exc:
            self._refused("task", exc)
            return []
        if kind is wire.Kind.CREDIT:
            self._send(route, wire.Kind.CREDIT, self._credit)
            return []
        return [Job(route, item, item[2]) for item in items]

    def serve_batch(self, frames: list[bytes]) -> tuple[Status, Any] | None:
        """The inline driver's hot path (slot 0, the driver's thread): a task message from a
        DEALER, ``[identity, "", header, body]``, served whole, as ``accept``, ``call`` and
        ``done`` would for each of its tasks, with fewer Python calls. Returns None for any other
        message (``accept`` then handles it, refusals included), FATAL and the exception when a
        handler raised SystemExit or the like (the rest of the batch is not run, so not
        acknowledged: it goes elsewhere), else OK. Never raises."""
        if len(frames) != 4 or frames[1]:
            return None
        try:
            kind, items = task_frames.parse_to_worker(frames[2:])
        except RemoteProtocolError:
            return None  # refused by accept, the general way
        if kind is not _TASK:
            return None
        route = frames[:2]
        peer = route[0]
        started, handler, name = self._started, self.handler, self.name
        results: list[list[Any]] | None = None
        oldest = 0.0
        now = _monotonic()
        # One Job for the batch, following the task that runs: the SlotBoard describes it if
        # its slot hangs, and a failure's log names it. Slot 0's start is written directly.
        job = Job(route, None, None)
        board = self.slots
        board.begin(0, job, now)
        try:
            for item in items:
                if results is None:
                    pending = self._pending.get(peer)
                    if pending is None:
                        pending = self._pending[peer] = (route, [], now)
                    results, oldest = pending[1], pending[2]
                job.ref, job.arg, job.started = item, item[2], now
                started[0] = now
                token = _CURRENT.set((name, item))  # enter/leave inlined
                try:
                    results.append([item[0], item[1], True, handler(item[2])])
                except BaseException as exc:
                    status, error = outcome(self, job, exc)
                    if status is FATAL:
                        return FATAL, error  # nothing sent: the task goes to another worker
                    self.failed += 1
                    results.append([item[0], item[1], False, wire.error_body(error)])
                finally:
                    _CURRENT.reset(token)
                    started[0] = 0.0
                self.handled += 1
                end = _monotonic()
                if end - now >= _SLOW_S or end - oldest >= TASK_RESULT_FLUSH_S:
                    del self._pending[peer]
                    self._send_results(route, results)
                    results = None
                now = end
        finally:
            board.end(0)
        return OK, None

    def enter(self, job: Job) -> contextvars.Token[tuple[str, list[Any]]]:
        return _CURRENT.set((self.name, job.ref))

    def leave(self, token: contextvars.Token[tuple[str, list[Any]]]) -> None:
        _CURRENT.reset(token)

    def done(self, job: Job, status: Status, value: Any) -> None:
        """Queue the task's result for its producer; sent at once when the handler was slow or
        the oldest result waiting has waited TASK_RESULT_FLUSH_S, else at the next ``flush``.
        FATAL sends nothing: the task goes to another worker."""
        if status is FATAL:
            return
        item = job.ref
        self.handled += 1
        if status is OK:
            result = [item[0], item[1], True, value]
        else:
            self.failed += 1
            result = [item[0], item[1], False, wire.error_body(value)]
        key = job.route[0]
        now = time.monotonic()
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = (job.route, [], now)
        pending[1].append(result)
        if now - job.started >= _SLOW_S or now - pending[2] >= TASK_RESULT_FLUSH_S:
            del self._pending[key]
            self._send_results(job.route, pending[1])

    def flush(self) -> None:
        """Send every result waiting."""
        if self._pending:
            pending, self._pending = self._pending, {}
            for route, results, _ in pending.values():
                self._send_results(route, results)

    def describe(self, job: Job) -> str:
        return f" on task {job.ref[0]} (attempt {job.ref[1]})"

    # --- sending -------------------------------------------------------------------------------

    def _send_results(self, route: list[bytes], results: list[list[Any]]) -> None:
        self._send(route, _RESULT, task_frames.pack_results(results))

    def _send(self, route: list[bytes], kind: wire.Kind, body: bytes) -> None:
        try:
            send_frames(self._out, route + [wire.pack_header(kind, 0, time.time()), body],
                        NOBLOCK)
        except zmq.ZMQError:  # the producer vanished (ROUTER_MANDATORY) or its queue is full:
            self.undeliverable += 1  # it redelivers what it did not hear back about
            self._rt.counters.add("task_results_undeliverable")

    def stats(self) -> dict[str, int]:
        """Counters and slots (``slots``, ``busy``, ``hung``). Thread-safe."""
        return {"handled": self.handled, "failed": self.failed, "prefetch": self.prefetch,
                "undeliverable": self.undeliverable, **self.slots.stats()}
