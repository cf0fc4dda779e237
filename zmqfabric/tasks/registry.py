"""Reliable tasks, the node's side: worker registration, ``submit`` and the task handle.

Workers: ``@node.task("resize")`` registers a handler; the node binds a task endpoint for it
(:class:`~zmqfabric.patterns.tasks.TaskEndpoint`) and its serve loop runs the handler.

Producers: ``node.submit("resize", body)`` hands the task to the node's dispatcher thread
(:mod:`zmqfabric.dispatcher`) and returns a :class:`TaskHandle` at once. The dispatcher sends each
task to a worker with credit, redelivers it when the worker dies or overruns the deadline, retries
it with backoff when the handler raises, and dead-letters it after its last attempt.

**Durability.** Without a journal (the default) the unsettled tasks live only in the producer's
memory: if the *producer* process dies, tasks it had not seen completed are lost (workers dying
lose nothing). With ``TaskConfig(journal=path)`` every task is recorded on disk before it is sent
and resent when a producer with that journal starts again (see :mod:`zmqfabric.journal`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterable, TypeVar

from ..constants import (
    MAX_TASK_CREDIT,
    MAX_TASK_KEY,
    TASK_BACKOFF_MAX_S,
    TASK_BACKOFF_S,
    TASK_DEADLINE_S,
    TASK_MAX_ATTEMPTS,
    TASK_PREFETCH,
    TASK_QUEUE_LIMIT,
    THREAD_JOIN_TIMEOUT_S,
)
from ..core import wire
from ..core.records import validate_endpoint_name
from ..core.tasktable import RetryPolicy, Task, check_deadline
from ..errors import (
    ClosedError,
    FabricTimeoutError,
    InvalidNameError,
    JournalError,
    LocalProtocolError,
)
from ..runtime import NodeState
from .deadletters import SUFFIX as DEAD_SUFFIX
from .worker import TaskEndpoint

if TYPE_CHECKING:
    from ..runtime import NodeRuntime
    from .producer import Dispatcher

F = TypeVar("F", bound=Callable[..., Any])
#: Task names leave room for the dead-letter stream "<name>.dead" (endpoint names: 64 chars).
MAX_TASK_NAME = 64 - len(DEAD_SUFFIX)


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """How a node submits and serves reliable tasks. Every default is in :mod:`.constants`.

    ``journal``: path of the producer's journal (None: tasks live in memory only).
    ``dead_letter_file``: JSON-lines file of dead letters; None means ``<journal>.dead.jsonl``
    with a journal, and no file without one (dead letters still go to the stream
    ``<name>.dead`` and the log). ``deadline_s``, ``max_attempts``: per-task defaults that
    ``submit`` may override. ``prefetch``: a worker's default credit.
    """

    journal: str | None = None
    journal_fsync: bool = False
    dead_letter_file: str | None = None
    deadline_s: float = TASK_DEADLINE_S
    max_attempts: int = TASK_MAX_ATTEMPTS
    backoff_s: float = TASK_BACKOFF_S
    backoff_max_s: float = TASK_BACKOFF_MAX_S
    prefetch: int = TASK_PREFETCH
    queue_limit: int = TASK_QUEUE_LIMIT

    def __post_init__(self) -> None:
        for field in ("journal", "dead_letter_file"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, os.fspath(value))
        check_deadline(self.deadline_s)
        RetryPolicy(self.max_attempts, self.backoff_s, self.backoff_max_s)  # raises if bad
        _check_prefetch(self.prefetch)
        if type(self.queue_limit) is not int or self.queue_limit < 1:
            raise LocalProtocolError("queue_limit must be an integer >= 1")

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.backoff_s, self.backoff_max_s)

    @property
    def dead_letter_path(self) -> str | None:
        if self.dead_letter_file is not None:
            return self.dead_letter_file
        return None if self.journal is None else self.journal + ".dead.jsonl"


def _check_prefetch(prefetch: object) -> int:
    if type(prefetch) is not int or not 1 <= prefetch <= MAX_TASK_CREDIT:
        raise LocalProtocolError(f"prefetch must be an integer from 1 to {MAX_TASK_CREDIT}")
    return prefetch


def validate_task_name(name: object) -> str:
    valid = validate_endpoint_name(name, "task")
    if len(valid) > MAX_TASK_NAME:
        raise InvalidNameError("task", name, f"use at most {MAX_TASK_NAME} characters (the "
                               f"dead-letter stream is named <task>{DEAD_SUFFIX})")
    return valid


_QUEUED, _RECORDED, _DONE, _FAILED = 0, 1, 2, 3


class TaskHandle:
    """What ``submit`` returns: the task's ``id``, and its result once a worker has run it.

    Wait with ``result(timeout)`` (sync) or ``await handle`` (asyncio), or ignore it: the task runs
    either way. Thread-safe.
    """

    __slots__ = ("id", "name", "key", "_owner", "_state", "_value", "_waiters")

    def __init__(self, task_id: str, name: str, key: str | None, owner: NodeTasks) -> None:
        self.id = task_id
        self.name = name
        self.key = key
        self._owner = owner
        self._state = _QUEUED
        self._value: Any = None
        self._waiters: list[tuple[int, Callable[[], Any]]] | None = None

    def done(self) -> bool:
        """True once the task succeeded, failed for good, or its node closed first."""
        return self._state >= _DONE

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until ``done()``; False after ``timeout`` seconds."""
        return self._wait(_DONE, timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The handler's return value. Raises TaskFailedError (dead-lettered), ClosedError (the
        node closed before the task settled), FabricTimeoutError (not done within ``timeout``)."""
        if not self._wait(_DONE, timeout):
            raise FabricTimeoutError(
                f"task {self.id} of {self.name!r} not done within {timeout:g} s", timeout=timeout
            )
        if self._state == _FAILED:
            raise self._value
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error ``result()`` would raise, or None. Raises FabricTimeoutError."""
        if not self._wait(_DONE, timeout):
            raise FabricTimeoutError(
                f"task {self.id} of {self.name!r} not done within {timeout:g} s", timeout=timeout
            )
        if self._state == _FAILED:
            return self._value  # type: ignore[no-any-return]
        return None

    def wait_recorded(self, timeout: float | None = None) -> bool:
        """Wait until the task is in the journal on disk (it then survives a producer crash);
        False after ``timeout``. Tasks are recorded in submission order. Raises
        LocalProtocolError when the node has no journal, JournalError when writing failed."""
        if self._owner.config.journal is None:
            raise LocalProtocolError("this node has no task journal (TaskConfig(journal=...))")
        if not self._wait(_RECORDED, timeout):
            return False
        if self._state == _FAILED and isinstance(self._value, JournalError):
            raise self._value
        return True

    def add_done_callback(self, callback: Callable[[TaskHandle], Any]) -> None:
        """Call ``callback(handle)`` once done: at once if it is, else in the dispatcher thread
        (keep it short; it must not block)."""
        with self._owner.handle_lock:
            if self._state < _DONE:
                if self._waiters is None:
                    self._waiters = []
                self._waiters.append((_DONE, lambda: callback(self)))
                return
        callback(self)

    def __await__(self) -> Generator[Any, None, Any]:
        """``await handle``: the result, or the error ``result()`` would raise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def copy() -> None:
            if future.done():
                return  # the awaiting task was cancelled
            if self._state == _FAILED:
                future.set_exception(self._value)
            else:
                future.set_result(self._value)

        def on_done(_: TaskHandle) -> None:
            try:
                loop.call_soon_threadsafe(copy)
            except RuntimeError:
                pass  # the loop is closed: nobody awaits any more

        self.add_done_callback(on_done)
        return future.__await__()

    def _wait(self, level: int, timeout: float | None) -> bool:
        if self._state >= level:
            return True
        event = threading.Event()
        with self._owner.handle_lock:
            if self._state >= level:
                return True
            if self._waiters is None:
                self._waiters = []
            self._waiters.append((level, event.set))
        return event.wait(timeout)

    def _advance(self, state: int, value: Any, fire: list[Callable[[], Any]]) -> None:
        """Move to ``state`` (call with the owner's handle_lock held); collect due waiters."""
        if state <= self._state:
            return
        self._state = state
        if state >= _DONE:
            self._value = value
        waiters = self._waiters
        if waiters:
            due = [w for w in waiters if w[0] <= state]
            self._waiters = [w for w in waiters if w[0] > state] or None
            fire.extend(fn for _, fn in due)

    def __repr__(self) -> str:
        state = ("queued", "recorded", "done", "failed")[self._state]
        return f"<TaskHandle {self.name!r} {self.id} {state}>"


def settle(owner: NodeTasks, changes: list[tuple[TaskHandle, int, Any]]) -> None:
    """Advance many handles under one lock, then wake their waiters (dispatcher thread)."""
    fire: list[Callable[[], Any]] = []
    with owner.handle_lock:
        for handle, state, value in changes:
            handle._advance(state, value, fire)
    for fn in fire:
        fn()


class NodeTasks:
    """A node's reliable tasks: its workers' endpoints and, once used, its dispatcher."""

    def __init__(self, node: NodeRuntime, config: TaskConfig) -> None:
        self._node = node
        self.config = config
        self._handlers: dict[str, tuple[Callable[[Any], Any], int, tuple[str, ...] | None]] = {}
        self._endpoints: dict[str, TaskEndpoint] = {}
        self._dispatcher: Dispatcher | None = None
        self._start_lock = threading.Lock()
        self.handle_lock = threading.Lock()
        #: submitted and settled counts: backpressure and wait_all()
        self._cond = threading.Condition()
        self._submitted = 0
        self._settled = 0
        self._prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._names: set[str] = set()
        self._closed = False

    # --- workers -------------------------------------------------------------------------------

    def register(
        self, name: str, prefetch: int | None, allow: Iterable[str] | None = None
    ) -> Callable[[F], F]:
        validate_task_name(name)
        prefetch = _check_prefetch(self.config.prefetch if prefetch is None else prefetch)
        allowed = None if allow is None else tuple(allow)

        def register(handler: F) -> F:
            if name in self._handlers:
                raise LocalProtocolError(f"node {self._node.name!r} already serves task {name!r}")
            if self._endpoints or self._closed or self._node.state is not NodeState.NEW:
                raise LocalProtocolError("register tasks before the node starts")
            self._handlers[name] = (handler, prefetch, allowed)
            return handler

        return register

    def open(self) -> None:
        """Bind the workers' endpoints; with a journal, start the dispatcher (it resends what
        the journal holds). Raises JournalError."""
        for name, (handler, prefetch, allow) in self._handlers.items():
            self._endpoints[name] = TaskEndpoint(self._node, name, handler, prefetch, allow)
        if self.config.journal is not None:
            self._start_dispatcher()

    def endpoints(self) -> list[TaskEndpoint]:
        return list(self._endpoints.values())

    # --- producers -----------------------------------------------------------------------------

    def _start_dispatcher(self) -> Dispatcher:
        from .producer import Dispatcher

        with self._start_lock:
            if self._closed:
                raise ClosedError(f"node {self._node.name!r} is closed")
            if self._dispatcher is None:
                dispatcher = Dispatcher(self._node, self)
                resumed = dispatcher.open()
                with self._cond:
                    self._submitted += resumed
                dispatcher.start()
                self._dispatcher = dispatcher
            return self._dispatcher

    def submit(
        self,
        name: str,
        body: Any,
        *,
        key: str | None,
        deadline: float | None,
        max_attempts: int | None,
        timeout: float | None,
    ) -> TaskHandle:
        """See :meth:`zmqfabric.Node.submit`. Thread-safe."""
        if name not in self._names:
            self._names.add(validate_task_name(name))
        if key is not None and (not isinstance(key, str) or len(key) > MAX_TASK_KEY):
            raise LocalProtocolError(f"key must be a string of at most {MAX_TASK_KEY} characters")
        config = self.config
        deadline_s = config.deadline_s if deadline is None else check_deadline(deadline)
        if max_attempts is None:
            max_attempts = config.max_attempts
        elif type(max_attempts) is not int or max_attempts < 1:
            raise LocalProtocolError("max_attempts must be an integer >= 1")
        payload = wire.pack_body(body)
        dispatcher = self._dispatcher or self._start_dispatcher()
        task_id = f"{self._prefix}-{next(self._ids)}"
        handle = TaskHandle(task_id, name, key, self)
        task = Task(task_id, payload, key, deadline_s=deadline_s, max_attempts=max_attempts,
                    ref=handle)
        self._admit(timeout)
        try:
            dispatcher.submit(name, task)
        except ClosedError:
            self.settled(1)
            raise
        return handle

    def _admit(self, timeout: float | None) -> None:
        limit = self.config.queue_limit
        with self._cond:
            if self._submitted - self._settled >= limit:
                if not self._cond.wait_for(
                    lambda: self._closed or self._submitted - self._settled < limit, timeout
                ):
                    raise FabricTimeoutError(
                        f"{limit} tasks are unsettled (TaskConfig.queue_limit); none settled "
                        f"within {timeout:g} s", timeout=timeout)
                if self._closed:
                    raise ClosedError(f"node {self._node.name!r} is closed")
            self._submitted += 1

    def settled(self, count: int) -> None:
        """``count`` more tasks settled (dispatcher thread)."""
        with self._cond:
            self._settled += count
            self._cond.notify_all()

    def wait_all(self, timeout: float | None) -> bool:
        """Wait until no submitted task is unsettled; False after ``timeout``. Thread-safe."""
        with self._cond:
            return self._cond.wait_for(lambda: self._settled >= self._submitted, timeout)

    def unsettled(self) -> int:
        with self._cond:
            return self._submitted - self._settled

    # --- both ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters per task name: ``submit`` (this node as producer), ``serve`` (as worker)."""
        dispatcher = self._dispatcher
        submit = {} if dispatcher is None else {
            name: asdict(stats) for name, stats in dispatcher.stats().items()
        }
        serve = {name: ep.stats() for name, ep in list(self._endpoints.items())}
        return {"submit": submit, "serve": serve}

    def close(self) -> None:
        """Stop the dispatcher (unsettled tasks fail with ClosedError; the journal keeps them).
        Call before the node closes its handles. Idempotent."""
        with self._start_lock:
            self._closed = True
            dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.close(THREAD_JOIN_TIMEOUT_S)
        with self._cond:
            self._cond.notify_all()
