"""Reliable tasks, the node's side: worker registration, ``submit`` and the producer's lifetime.

Workers: ``@node.task("resize")`` registers a handler; the node binds a task endpoint for it
(:class:`~zmqfabric.tasks.worker.TaskEndpoint`) and its serve loop runs the handler.

Producers: ``node.submit("resize", body)`` hands the task to the node's dispatcher thread
(:mod:`zmqfabric.tasks.producer`) and returns a :class:`~zmqfabric.tasks.handle.TaskHandle` at
once. The dispatcher sends each task to a worker with credit, redelivers it when the worker dies or
overruns the deadline, retries it with backoff when the handler raises, and dead-letters it after
its last attempt.

**Durability.** Without a journal (the default) the unsettled tasks live only in the producer's
memory: if the *producer* process dies, tasks it had not seen completed are lost (workers dying
lose nothing). With ``TaskConfig(journal=path)`` every task is recorded on disk before it is sent
and resent when a producer with that journal starts again (see :mod:`zmqfabric.tasks.journal`).
"""

from __future__ import annotations

import itertools
import secrets
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from ..constants import MAX_TASK_KEY, THREAD_JOIN_TIMEOUT_S
from ..core import wire
from ..core.tasktable import Task, check_deadline
from ..errors import ClosedError, FabricTimeoutError, LocalProtocolError
from ..runtime import NodeState
from .config import TaskConfig, check_prefetch, validate_task_name
from .handle import TaskHandle
from .producer import Dispatcher
from .worker import TaskEndpoint

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

F = TypeVar("F", bound=Callable[..., Any])


class NodeTasks:
    """A node's reliable tasks: its workers' endpoints and, once used, its dispatcher."""

    def __init__(self, node: NodeRuntime, config: TaskConfig) -> None:
        self._node = node
        self.config = config
        #: name -> (handler, prefetch, allow, concurrency)
        self._handlers: dict[str, tuple[Callable[[Any], Any], int, tuple[str, ...] | None,
                                        int]] = {}
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
        self, name: str, prefetch: int | None, allow: Iterable[str] | None = None,
        concurrency: int = 1,
    ) -> Callable[[F], F]:
        validate_task_name(name)
        # The default window keeps every slot busy: at least one task per slot.
        default = max(self.config.prefetch, concurrency)
        prefetch = check_prefetch(default if prefetch is None else prefetch)
        allowed = None if allow is None else tuple(allow)

        def register(handler: F) -> F:
            if name in self._handlers:
                raise LocalProtocolError(f"node {self._node.name!r} already serves task {name!r}")
            if self._endpoints or self._closed or self._node.state is not NodeState.NEW:
                raise LocalProtocolError("register tasks before the node starts")
            self._handlers[name] = (handler, prefetch, allowed, concurrency)
            return handler

        return register

    def open(self) -> None:
        """Bind the workers' endpoints; with a journal, start the dispatcher (it resends what
        the journal holds). Raises JournalError."""
        for name, (handler, prefetch, allow, concurrency) in self._handlers.items():
            self._endpoints[name] = TaskEndpoint(self._node, name, handler, prefetch, allow,
                                                 concurrency, self.config.deadline_s)
        if self.config.journal is not None:
            self._start_dispatcher()

    def endpoints(self) -> list[TaskEndpoint]:
        return list(self._endpoints.values())

    # --- producers -----------------------------------------------------------------------------

    def _start_dispatcher(self) -> Dispatcher:
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
