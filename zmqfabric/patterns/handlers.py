"""Calling handlers: jobs, outcomes, an endpoint's slots and the threads that run them.

An endpoint that calls a handler (a reply service, a task worker) is :class:`Served`. Its owner (a
thread of the sync node or the asyncio loop, see :mod:`zmqfabric.patterns.drivers`) receives
messages and turns them into jobs (``accept``); a *slot* calls the handler for each job
(:func:`call` or :func:`acall`); the owner sends the outcome (``done``, then ``flush``). So the
protocol of each endpoint is written once, and only the way a slot runs differs:

- inline: the owner itself calls the handler (sync node, ``concurrency=1``, a plain function):
  the hot path, no thread hop; every endpoint has a thread of its own, so only it waits;
- :class:`ThreadSlots`: N threads (plain functions otherwise); each outcome goes back to the
  owner through ``deliver``, which posts to the owner's inbox or to the loop. Handler threads
  never touch a socket;
- N coroutines of the loop (coroutine functions on an asyncio node).

Outcomes. A handler that returns gives ``OK`` and its value. One that raises an ``Exception``
gives ``FAILED``: logged at ERROR where it ran (type, message, traceback; rate-limited per
endpoint) and answered as an error. Any other ``BaseException`` (``SystemExit``,
``KeyboardInterrupt``) gives ``FATAL``: logged, a task gets no result (its producer gives it to
another worker), and the node leaves the fabric (the shells' ``run()`` closes it and re-raises).

Hung handlers. A :class:`SlotBoard` records when each slot began its call; a slot busy for longer
than the endpoint's ``hung_after_s`` is *hung*. ``stats()`` counts busy and hung slots (any
thread); ``watch()`` (the thread of ``run()``) logs once when a slot hangs and when all do.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import logging
import threading
import time
from typing import Any, Callable, Protocol

from ..constants import MAX_CONCURRENCY
from ..errors import LocalProtocolError
from ..stats import RateLimitedLog

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)
Handler = Callable[[Any], Any]


class Status(enum.IntEnum):
    OK = 0
    FAILED = 1
    FATAL = 2


OK, FAILED, FATAL = Status.OK, Status.FAILED, Status.FATAL


class Job:
    """One handler call: ``arg`` for the handler, and what the endpoint needs to answer it
    (``route``, ``ref``: a request's message id, a task's wire item). ``started``: monotonic
    time the handler was called (0.0 before)."""

    __slots__ = ("route", "ref", "arg", "started")

    def __init__(self, route: list[bytes], ref: Any, arg: Any) -> None:
        self.route = route
        self.ref = ref
        self.arg = arg
        self.started = 0.0


class Served(Protocol):
    """What a driver needs of an endpoint whose handler it runs. ``accept``, ``done`` and
    ``flush`` run in the socket's owner; ``enter``/``leave`` in the slot, around the call."""

    name: str
    noun: str
    handler: Handler
    concurrency: int
    slots: SlotBoard
    socket: Any
    #: ``done`` may hold outcomes until ``flush`` (False: ``flush`` does nothing; the inline
    #: driver then never asks the socket whether more input waits).
    flushes: bool
    # Optional (looked up with getattr by the inline driver, for endpoints that do not flush):
    # ``serve_one(frames) -> (status, value) | None``, the endpoint's hot path for a message it
    # serves whole (accept, call in slot 0, done); None hands the message to ``accept``.

    def accept(self, frames: list[bytes]) -> list[Job]: ...

    def enter(self, job: Job) -> Any: ...

    def leave(self, token: Any) -> None: ...

    def done(self, job: Job, status: Status, value: Any) -> None: ...

    def flush(self) -> None: ...

    def describe(self, job: Job) -> str: ...


def check_concurrency(concurrency: object) -> int:
    """``concurrency`` if it is a valid slot count; raises LocalProtocolError otherwise."""
    if type(concurrency) is not int or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise LocalProtocolError(f"concurrency must be an integer from 1 to {MAX_CONCURRENCY}")
    return concurrency


def is_coroutine_handler(handler: Handler) -> bool:
    """True for ``async def`` functions, also behind ``functools.partial`` or ``__call__``."""
    method = getattr(type(handler), "__call__", None)  # noqa: B004 - an async __call__
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(method)


# --- one call -------------------------------------------------------------------------------


def call(ep: Served, job: Job, slot: int) -> tuple[Status, Any]:
    """Call ``ep``'s (plain) handler for ``job`` in slot ``slot`` of the calling thread; never
    raises (a BaseException becomes FATAL)."""
    board = ep.slots
    job.started = started = time.monotonic()
    board.begin(slot, job, started)
    token = ep.enter(job)
    try:
        return OK, ep.handler(job.arg)
    except BaseException as exc:
        return outcome(ep, job, exc)
    finally:
        ep.leave(token)
        board.end(slot)


def outcome(ep: Served, job: Job, exc: BaseException) -> tuple[Status, BaseException]:
    """The outcome of a handler call for ``job`` that raised ``exc``, logged: FAILED for an
    ``Exception``, FATAL for any other BaseException (see the module docstring). Call inside
    the ``except``, in the thread that called the handler (the traceback is logged). Never
    raises."""
    if isinstance(exc, Exception):
        _log_failure(ep, job, exc)
        return FAILED, exc
    _log_fatal(ep, job, exc)
    return FATAL, exc


async def acall(ep: Served, job: Job, slot: int) -> tuple[Status, Any]:
    """:func:`call` for a coroutine handler, in the loop. Raises only asyncio.CancelledError."""
    board = ep.slots
    job.started = started = time.monotonic()
    board.begin(slot, job, started)
    token = ep.enter(job)
    try:
        value = ep.handler(job.arg)
        if inspect.isawaitable(value):
            value = await value
        return OK, value
    except Exception as exc:
        _log_failure(ep, job, exc)
        return FAILED, exc
    except asyncio.CancelledError:
        raise  # the node stops serving: the job gets no answer
    except BaseException as exc:
        _log_fatal(ep, job, exc)
        return FATAL, exc
    finally:
        ep.leave(token)
        board.end(slot)


def _log_failure(ep: Served, job: Job, exc: Exception) -> None:
    """ERROR with the traceback (call inside the ``except``), at most LOG_RATE_PER_MINUTE lines
    per endpoint and minute."""
    _rlog.exception(f"{ep.noun} {ep.name}", "%s %s: the handler raised %s: %s%s", ep.noun,
                    ep.name, type(exc).__name__, _text(exc), ep.describe(job))


def _log_fatal(ep: Served, job: Job, exc: BaseException) -> None:
    log.error("%s %s: the handler raised %s%s: the node stops serving and leaves the fabric",
              ep.noun, ep.name, _repr(exc), ep.describe(job), exc_info=True)


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the failure
        return f"<unprintable {type(exc).__name__}>"


def _repr(exc: BaseException) -> str:
    try:
        return repr(exc)
    except Exception:
        return type(exc).__name__


# --- slots ----------------------------------------------------------------------------------


class SlotBoard:
    """When each of an endpoint's ``size`` slots began its current call (0.0: idle).

    ``begin``/``end`` are called by the slot that runs the call; ``busy``, ``hung`` and ``stats``
    from any thread (list items are read and written whole); ``watch`` from one watcher thread.
    """

    __slots__ = ("size", "hung_after_s", "started", "_jobs", "_reported", "_all_hung")

    def __init__(self, size: int, hung_after_s: float) -> None:
        self.size = size
        self.hung_after_s = hung_after_s
        #: When each slot began its call (0.0: idle), written by the slot itself: ``begin`` and
        #: ``end``, or an endpoint's hot path writing its item directly (its job is then not
        #: recorded: a hung slot is logged without the job's description).
        self.started = [0.0] * size
        self._jobs: list[Job | None] = [None] * size
        self._reported: dict[int, float] = {}
        self._all_hung = False

    def begin(self, slot: int, job: Job, now: float) -> None:
        self._jobs[slot] = job
        self.started[slot] = now

    def end(self, slot: int) -> None:
        self.started[slot] = 0.0
        self._jobs[slot] = None

    def busy(self) -> int:
        return sum(1 for t in self.started if t)

    def hung(self, now: float) -> int:
        limit = now - self.hung_after_s
        return sum(1 for t in self.started if t and t < limit)

    def stats(self) -> dict[str, int]:
        """``{"slots", "busy", "hung"}`` now. Thread-safe."""
        return {"slots": self.size, "busy": self.busy(), "hung": self.hung(time.monotonic())}

    def watch(self, ep: Served, now: float) -> None:
        """Log a slot that has become hung since the last call (WARNING, once per call), all
        slots hung (ERROR, once until one is free again) and recovery (INFO). One thread."""
        limit = now - self.hung_after_s
        hung = 0
        for slot, started in enumerate(self.started):
            if not started or started >= limit:
                continue
            hung += 1
            if self._reported.get(slot) != started:
                self._reported[slot] = started
                job = self._jobs[slot]
                log.warning("%s %s: a handler has been running for %.0f s%s; its slot is hung "
                            "(more than %g s)", ep.noun, ep.name, now - started,
                            ep.describe(job) if job is not None else "", self.hung_after_s)
        if hung == self.size and not self._all_hung:
            self._all_hung = True
            log.error("%s %s: every handler slot (%d) is hung: nothing more is handled here "
                      "until one returns", ep.noun, ep.name, self.size)
        elif hung < self.size and self._all_hung:
            self._all_hung = False
            log.info("%s %s: a handler slot is free again", ep.noun, ep.name)


Deliver = Callable[[Job, Status, Any], None]


class ThreadSlots:
    """``size`` threads that call an endpoint's plain handler, taking jobs in the order given.

    ``submit`` (the owner) queues a job; a free thread calls the handler and gives the outcome to
    ``deliver(job, status, value)`` from its own thread: ``deliver`` must be thread-safe and must
    not block (it posts to the owner). ``stop()`` drops the jobs not started and lets each thread
    end once it is idle; ``join`` waits for them, bounded.

    The threads are daemons only so that a handler that never returns cannot keep the process
    alive at exit; ``stop`` and ``join`` are the shutdown plan, and ``join`` reports a thread
    it had to leave behind.
    """

    def __init__(self, ep: Served, deliver: Deliver, thread_name: str) -> None:
        self._ep = ep
        self._deliver = deliver
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._run, args=(slot,), name=f"{thread_name}-{slot + 1}",
                             daemon=True)
            for slot in range(ep.concurrency)
        ]

    @property
    def waiting(self) -> int:
        """Jobs queued and not started. Any thread."""
        return len(self._queue)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` (ignored after ``stop``). Thread-safe."""
        with self._cond:
            if self._stopping:
                return
            self._queue.append(job)
            self._cond.notify()

    def stop(self) -> list[Job]:
        """Start no more jobs; returns the ones dropped. Thread-safe; idempotent."""
        with self._cond:
            self._stopping = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        return dropped

    def join(self, deadline: float) -> bool:
        """Wait until every thread has ended, at most until ``deadline`` (monotonic); False if
        one is still in a handler then."""
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self, slot: int) -> None:
        queue, cond, ep, deliver = self._queue, self._cond, self._ep, self._deliver
        while True:
            with cond:
                while not queue and not self._stopping:
                    cond.wait()
                if self._stopping:
                    return
                job = queue.popleft()
            status, value = call(ep, job, slot)
            try:
                deliver(job, status, value)
            except Exception:  # the owner is gone (its loop closed): nobody takes the outcome
                log.debug("%s %s: outcome dropped", ep.noun, ep.name, exc_info=True)
