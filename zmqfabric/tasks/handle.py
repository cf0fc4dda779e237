"""The submitter's side of one task: :class:`TaskHandle`, its :class:`HandleState`, and
:func:`settle`, which the dispatcher calls to move handles on.

A handle *is* the task the dispatcher's table holds (a subclass of
:class:`~zmqfabric.core.tasktable.Task`): one object per submitted task, not a task and a handle
(fewer allocations and fewer objects for the garbage collector while tasks queue).

The registry (:mod:`.registry`) creates handles and the dispatcher (:mod:`.producer`) settles them;
both import this module, and it imports neither: handles and the dispatcher see the registry
through the :class:`HandleOwner` Protocol.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Generator, Protocol

from ..constants import TASK_DEADLINE_S, TASK_MAX_ATTEMPTS
from ..core.tasktable import Task, TaskState
from ..errors import FabricTimeoutError, JournalError, LocalProtocolError

if TYPE_CHECKING:
    from .config import TaskConfig


class HandleState(enum.IntEnum):
    """Where a task stands for its submitter. Ordered: a handle only moves forward, and waiting
    for a state is satisfied by any later one. (Not the in-flight table's
    :class:`zmqfabric.core.tasktable.HandleState`, which tracks deliveries.)"""

    QUEUED = 0
    #: In the journal on disk (only with a journal).
    RECORDED = 1
    #: Settled: the handler returned.
    DONE = 2
    #: Settled: dead-lettered, refused by the journal, or the node closed first.
    FAILED = 3


#: Read for every task (submit, dispatcher thread): a module global reads ~8 times faster than
#: an enum member.
_QUEUED, _RECORDED = HandleState.QUEUED, HandleState.RECORDED
_DONE, _FAILED = HandleState.DONE, HandleState.FAILED
_PENDING = TaskState.PENDING


class HandleOwner(Protocol):
    """The registry that owns the handles (:class:`~zmqfabric.tasks.registry.NodeTasks`), as the
    handles and the dispatcher see it."""

    config: TaskConfig
    #: Guards every handle's state and waiters.
    handle_lock: threading.Lock

    def settled(self, count: int) -> None:
        """``count`` more tasks settled (dispatcher thread)."""


class TaskHandle(Task):
    """What ``submit`` returns: the task's ``id``, and its result once a worker has run it.

    Wait with ``result(timeout)`` (sync) or ``await handle`` (asyncio), or ignore it: the task runs
    either way. Thread-safe.

    It is also the task in the dispatcher's table: the fields of
    :class:`~zmqfabric.core.tasktable.Task` (``payload``, ``attempts``, ``state`` ...) belong to
    the dispatcher thread and are not part of the handle's API. Its result is the task's
    ``value`` (set by the table before the handle is settled), or the error once failed.
    """

    __slots__ = ("name", "settled_at", "_owner", "handle_state", "waiters")

    def __init__(self, task_id: str, name: str, key: str | None, owner: HandleOwner,
                 payload: bytes = b"", deadline_s: float = TASK_DEADLINE_S,
                 max_attempts: int = TASK_MAX_ATTEMPTS) -> None:
        # Task's fields (Task.FIELDS) set here, not by Task.__init__: one call per submit.
        self.id = task_id
        self.payload = payload
        self.key = key
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.attempts = self.charged = 0
        self.suspect = False
        self.hung_on = self.worker = self.value = self.error = None
        self.state = _PENDING
        self.name = name
        self._owner = owner
        #: Where it stands for its submitter (read ``done()``): moved on by :func:`settle` and
        #: :func:`settle_done` only, under the owner's handle_lock.
        self.handle_state = _QUEUED
        #: time.monotonic() when it became done (idempotency keys are kept a while after that)
        self.settled_at = 0.0
        #: (state, callback) to call once it reaches that state; guarded as ``handle_state``.
        self.waiters: list[tuple[HandleState, Callable[[], Any]]] | None = None

    def done(self) -> bool:
        """True once the task succeeded, failed for good, or its node closed first."""
        return self.handle_state >= _DONE

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
        if self.handle_state is _FAILED:
            raise self.value
        return self.value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error ``result()`` would raise, or None. Raises FabricTimeoutError."""
        if not self._wait(HandleState.DONE, timeout):
            raise FabricTimeoutError(
                f"task {self.id} of {self.name!r} not done within {timeout:g} s", timeout=timeout
            )
        if self.handle_state is HandleState.FAILED:
            return self.value  # type: ignore[no-any-return]
        return None

    def wait_recorded(self, timeout: float | None = None) -> bool:
        """Wait until the task is in the journal on disk (it then survives a producer crash);
        False after ``timeout``. ``submit`` returns only once its task is recorded, so this is
        true at once for its handle (kept for code written when it was not). Raises
        LocalProtocolError when the node has no journal, JournalError when writing failed."""
        if self._owner.config.journal is None:
            raise LocalProtocolError("this node has no task journal (TaskConfig(journal=...))")
        if not self._wait(HandleState.RECORDED, timeout):
            return False
        if self.handle_state is HandleState.FAILED and isinstance(self.value, JournalError):
            raise self.value
        return True

    def add_done_callback(self, callback: Callable[[TaskHandle], Any]) -> None:
        """Call ``callback(handle)`` once done: at once if it is, else in the dispatcher thread
        (keep it short; it must not block)."""
        with self._owner.handle_lock:
            if self.handle_state < HandleState.DONE:
                if self.waiters is None:
                    self.waiters = []
                self.waiters.append((HandleState.DONE, lambda: callback(self)))
                return
        callback(self)

    def __await__(self) -> Generator[Any, None, Any]:
        """``await handle``: the result, or the error ``result()`` would raise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def copy() -> None:
            if future.done():
                return  # the awaiting task was cancelled
            if self.handle_state is HandleState.FAILED:
                future.set_exception(self.value)
            else:
                future.set_result(self.value)

        def on_done(_: TaskHandle) -> None:
            try:
                loop.call_soon_threadsafe(copy)
            except RuntimeError:
                pass  # the loop is closed: nobody awaits any more

        self.add_done_callback(on_done)
        return future.__await__()

    def _wait(self, level: HandleState, timeout: float | None) -> bool:
        if self.handle_state >= level:
            return True
        event = threading.Event()
        with self._owner.handle_lock:
            if self.handle_state >= level:
                return True
            if self.waiters is None:
                self.waiters = []
            self.waiters.append((level, event.set))
        return event.wait(timeout)

    def mark_recorded(self) -> None:
        """In the journal now: for a handle no other thread can have yet (not returned by
        ``submit``, no key), so without the lock and with no waiter to wake."""
        if self.handle_state is _QUEUED:
            self.handle_state = _RECORDED

    def advance(self, state: HandleState, value: Any, fire: list[Callable[[], Any]]) -> None:
        """Move to ``state`` (call with the owner's handle_lock held); collect due waiters. A
        settled handle's value is set before its state: readers check the state without the
        lock."""
        if state <= self.handle_state:
            return
        if state >= _DONE:
            self.value = value
            if self.key is not None:
                self.settled_at = time.monotonic()
        self.handle_state = state
        waiters = self.waiters
        if waiters:
            due = [w for w in waiters if w[0] <= state]
            self.waiters = [w for w in waiters if w[0] > state] or None
            fire.extend(fn for _, fn in due)

    def __repr__(self) -> str:
        return f"<TaskHandle {self.name!r} {self.id} {self.handle_state.name.lower()}>"


def settle(owner: HandleOwner, changes: list[tuple[TaskHandle, HandleState, Any]]) -> None:
    """Advance many handles under one lock, then wake their waiters (dispatcher thread)."""
    fire: list[Callable[[], Any]] = []
    with owner.handle_lock:
        for handle, state, value in changes:
            handle.advance(state, value, fire)
    for fn in fire:
        fn()


def settle_done(owner: HandleOwner, tasks: list[Task]) -> None:
    """Settle the handles of tasks done (their ``value`` set by the table); a task that is not a
    handle (resumed from a journal without a key) has nobody to tell. :func:`settle` without a
    tuple or a call per task (dispatcher thread, hot path)."""
    fire: list[Callable[[], Any]] = []
    with owner.handle_lock:
        for task in tasks:
            if type(task) is TaskHandle:
                if task.waiters is None and task.key is None and task.handle_state < _DONE:
                    task.handle_state = _DONE  # advance() without a call: nobody to wake
                else:
                    task.advance(_DONE, task.value, fire)
    for fn in fire:
        fn()
