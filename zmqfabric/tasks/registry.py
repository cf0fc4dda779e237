"""Reliable tasks, the node's side: worker registration, ``submit`` and the producer's lifetime.

Workers: ``@node.task("resize")`` registers a handler; the node binds a task endpoint for it
(:class:`~zmqfabric.tasks.worker.TaskEndpoint`) and its serve loop runs the handler.

Producers: ``node.submit("resize", body)`` (or ``submit_many`` for a batch) hands the task to
the node's dispatcher thread (:mod:`zmqfabric.tasks.producer`) and returns a
:class:`~zmqfabric.tasks.handle.TaskHandle`. The dispatcher sends each task to a worker with
credit, redelivers it when the worker dies or overruns the deadline, retries it with backoff
when the handler raises, and dead-letters it after its last attempt. A body whose encoded task
is larger than workers accept (``NodeConfig.max_message_size``) raises MessageTooLargeError
before anything is queued. A key already in use (:mod:`.keys`) returns the existing handle.

**Durability.** Without a journal (the default) the unsettled tasks live only in the producer's
memory: if the *producer* process dies, tasks it had not seen completed are lost (workers dying
lose nothing). With ``TaskConfig(journal=path)``, ``submit`` returns only once the task is
committed to the journal (:mod:`.recorder`: concurrent submitters share commits), and a producer
started again with that journal resends every task that had not settled.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from ..constants import (
    MAX_TASK_KEY,
    TASK_DEDUPE_MAX_KEYS,
    TASK_FRAME_OVERHEAD,
    THREAD_JOIN_TIMEOUT_S,
)
from ..core import wire
from ..core.tasktable import Task, check_deadline
from ..core.wire import PACK_ERRORS
from ..errors import ClosedError, FabricTimeoutError, LocalProtocolError, MessageTooLargeError
from ..runtime import NodeState
from .config import TaskConfig, check_prefetch, validate_task_name
from .handle import HandleState, TaskHandle, settle
from .journal import Journal, JournalEntry
from .keys import KeyIndex
from .packing import PACKERS, new_packer, pack_all
from .producer import Dispatcher
from .recorder import Recorder
from .worker import TaskEndpoint

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

F = TypeVar("F", bound=Callable[..., Any])
_RECORDED = HandleState.RECORDED
_STARTED = NodeState.STARTED  # per submit: a module global, not an enum class attribute


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
        #: submitted and settled counts: backpressure and wait_all(). A plain Lock under the
        #: Condition: the admission of every submit takes it (``with`` on a Lock is C-level).
        self._count_lock = threading.Lock()
        self._cond = threading.Condition(self._count_lock)
        self._submitted = 0
        self._settled = 0
        self._limit = config.queue_limit
        self._prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._names: set[str] = set()
        self._closed = False
        self._keys = KeyIndex(config.dedupe_window_s, TASK_DEDUPE_MAX_KEYS)
        self._recorder: Recorder | None = None

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
                recorder, resumed = self._open_journal()
                dispatcher = Dispatcher(self._node, self, recorder)
                try:
                    dispatcher.open(resumed)
                except BaseException:
                    if recorder is not None:
                        recorder.close()
                    raise
                with self._cond:
                    self._submitted += len(resumed)
                dispatcher.start()
                self._recorder = recorder
                self._dispatcher = dispatcher
            return self._dispatcher

    def _open_journal(self) -> tuple[Recorder | None, list[tuple[str, Task]]]:
        config = self.config
        if config.journal is None:
            return None, []
        journal = Journal(config.journal, fsync=config.journal_fsync)
        entries = journal.open()
        if journal.quarantined:
            self._node.counters.add("journal_rows_quarantined", journal.quarantined)
        return Recorder(journal), [(e.name, self._resume(e)) for e in entries]

    def _resume(self, entry: JournalEntry) -> Task:
        """A task from the journal. Only keyed ones get a handle: a later submit with the key
        returns it (nobody else can ask for one)."""
        if entry.key is None:
            return Task(entry.task_id, entry.payload, None, deadline_s=entry.deadline_s,
                        max_attempts=entry.max_attempts)
        handle = TaskHandle(entry.task_id, entry.name, entry.key, self, entry.payload,
                            entry.deadline_s, entry.max_attempts)
        settle(self, [(handle, HandleState.RECORDED, None)])
        self._keys.claim(handle)
        return handle

    @property
    def journaled(self) -> bool:
        """True when submit waits for a journal commit."""
        return self.config.journal is not None

    def submit(self, name: str, body: Any, key: str | None = None,
               deadline: float | None = None, max_attempts: int | None = None,
               timeout: float | None = None) -> TaskHandle:
        """See :meth:`zmqfabric.Node.submit` (which calls this with positional arguments: one
        call per submit, no keywords). Raises ClosedError unless the node is started.
        Thread-safe."""
        if self._node.state is not _STARTED:
            self._node.check_started()  # raises
        if deadline is None and max_attempts is None and name in self._names:
            config = self.config  # the common case, the hot path: checked once, at first use
            deadline_s, attempts = config.deadline_s, config.max_attempts
        else:
            deadline_s, attempts = self._options(name, deadline, max_attempts)
        if key is None:  # the hot path: _encode inlined
            try:  # a Packer per call costs more than packing a small body: borrow one
                pack = PACKERS.pop()
            except IndexError:  # none idle
                pack = new_packer().pack
            try:
                payload = pack(body)  # (a Packer that raised is reset: it can be reused)
            except PACK_ERRORS:
                payload = wire.pack_body(body)  # raises LocalProtocolError
            finally:
                PACKERS.append(pack)
            limit = self._node.config.max_message_size
            if len(payload) + TASK_FRAME_OVERHEAD > limit:
                raise MessageTooLargeError(len(payload) + TASK_FRAME_OVERHEAD, limit)
        else:
            payload = self._encode(body, key)
        dispatcher = self._dispatcher or self._start_dispatcher()
        handle = TaskHandle(f"{self._prefix}-{next(self._ids)}", name, key, self, payload,
                            deadline_s, attempts)
        if key is not None:
            held = self._keys.claim(handle)
            if held is not handle:
                return held
        else:  # the hot path, room at once: _queue inlined
            count_lock = self._count_lock
            count_lock.acquire()  # not `with`: its __exit__ call costs twice the lock itself
            try:
                admitted = not self._closed and self._submitted - self._settled < self._limit
                if admitted:
                    self._submitted += 1
            finally:
                count_lock.release()
            if admitted:
                try:
                    recorder = self._recorder
                    if recorder is not None:
                        recorder.record_one(handle.id, name, payload, None, deadline_s,
                                            attempts)
                        handle.handle_state = _RECORDED  # nobody else has it: no lock
                    dispatcher.submit(handle)
                except BaseException as exc:
                    self._failed([handle], exc, True)
                    raise
                return handle
        self._queue(dispatcher, name, [handle], timeout)
        return handle

    def submit_many(
        self,
        name: str,
        bodies: Iterable[Any],
        *,
        keys: Iterable[str | None] | None,
        deadline: float | None,
        max_attempts: int | None,
        timeout: float | None,
    ) -> list[TaskHandle]:
        """See :meth:`zmqfabric.Node.submit_many`. Thread-safe."""
        deadline_s, attempts = self._options(name, deadline, max_attempts)
        bodies = list(bodies)
        key_list: list[str | None] = [None] * len(bodies) if keys is None else list(keys)
        if len(key_list) != len(bodies):
            raise LocalProtocolError(f"{len(key_list)} keys for {len(bodies)} bodies")
        if len(bodies) > self.config.queue_limit:
            raise LocalProtocolError(f"{len(bodies)} bodies in one call; at most "
                                     f"{self.config.queue_limit} (TaskConfig.queue_limit)")
        payloads = None if keys is not None else pack_all(
            bodies, self._node.config.max_message_size - TASK_FRAME_OVERHEAD)
        if payloads is None:  # keys, or a body that does not fit: checked one by one
            payloads = [self._encode(body, key) for body, key in zip(bodies, key_list,
                                                                       strict=True)]
        dispatcher = self._dispatcher or self._start_dispatcher()
        handles: list[TaskHandle] = []
        tasks: list[TaskHandle] = []
        prefix, ids = self._prefix, self._ids
        for payload, key in zip(payloads, key_list, strict=True):
            handle = TaskHandle(f"{prefix}-{next(ids)}", name, key, self, payload, deadline_s,
                                attempts)
            if key is not None:
                held = self._keys.claim(handle)
                if held is not handle:
                    handles.append(held)
                    continue
            handles.append(handle)
            tasks.append(handle)
        if tasks:
            self._queue(dispatcher, name, tasks, timeout)
        return handles

    def _options(
        self, name: str, deadline: float | None, max_attempts: int | None
    ) -> tuple[float, int]:
        if name not in self._names:
            self._names.add(validate_task_name(name))
        config = self.config
        deadline_s = config.deadline_s if deadline is None else check_deadline(deadline)
        if max_attempts is None:
            max_attempts = config.max_attempts
        elif type(max_attempts) is not int or max_attempts < 1:
            raise LocalProtocolError("max_attempts must be an integer >= 1")
        return deadline_s, max_attempts

    def _encode(self, body: Any, key: str | None) -> bytes:
        """The payload of a task; raises LocalProtocolError (bad key, not msgpack) and
        MessageTooLargeError (the task message would be over what workers accept)."""
        size = TASK_FRAME_OVERHEAD
        if key is not None:
            if not isinstance(key, str) or len(key) > MAX_TASK_KEY:
                raise LocalProtocolError(
                    f"key must be a string of at most {MAX_TASK_KEY} characters")
            size += len(key.encode())
        payload = wire.pack_body(body)
        size += len(payload)
        limit = self._node.config.max_message_size
        if size > limit:
            raise MessageTooLargeError(size, limit)
        return payload

    def _queue(
        self, dispatcher: Dispatcher, name: str, tasks: list[TaskHandle], timeout: float | None
    ) -> None:
        """Admit ``tasks``, record them (with a journal: returns once they are on disk) and hand
        them to the dispatcher. On any failure their handles fail with the error, their keys are
        freed, and it is raised."""
        admitted = False
        try:
            count = len(tasks)
            with self._count_lock:  # the common case, room at once: _admit inlined
                if not self._closed and self._submitted - self._settled + count <= self._limit:
                    self._submitted += count
                    admitted = True
            if not admitted:
                self._admit(count, timeout)
                admitted = True
            recorder = self._recorder
            if recorder is not None:
                rows = []  # a loop, not a comprehension: no function made per call
                for t in tasks:
                    rows.append((t.id, name, t.payload, t.key, t.deadline_s, t.max_attempts))
                recorder.record(rows)
                if count == 1 and tasks[0].key is None:  # nobody else has its handle yet
                    tasks[0].mark_recorded()
                else:  # a keyed handle may be another submitter's already: under the lock
                    settle(self, [(t, _RECORDED, None) for t in tasks])
            dispatcher.submit(tasks if count > 1 else tasks[0])
        except BaseException as exc:
            self._failed(tasks, exc, admitted)
            raise

    def _failed(self, tasks: list[TaskHandle], exc: BaseException, admitted: bool) -> None:
        """Queuing ``tasks`` raised ``exc``: fail their handles with it, free their keys and
        (``admitted``) their room. Raises ClosedError (from ``exc``) when the node closed;
        returns otherwise, for the caller to raise ``exc``."""
        for task in tasks:
            if task.key is not None:
                self._keys.release(task)
        settle(self, [(t, HandleState.FAILED, exc) for t in tasks])
        if admitted:
            self.settled(len(tasks))
        if self._closed and not isinstance(exc, ClosedError):
            raise ClosedError(f"node {self._node.name!r} is closed") from exc

    def _admit(self, count: int, timeout: float | None) -> None:
        limit = self._limit
        with self._cond:
            if self._closed:
                raise ClosedError(f"node {self._node.name!r} is closed")
            if self._submitted - self._settled + count > limit:
                if not self._cond.wait_for(
                    lambda: self._closed or self._submitted - self._settled + count <= limit,
                    timeout,
                ):
                    raise FabricTimeoutError(
                        f"{limit} tasks are unsettled (TaskConfig.queue_limit); no room for "
                        f"{count} more within {timeout:g} s", timeout=timeout)
                if self._closed:
                    raise ClosedError(f"node {self._node.name!r} is closed")
            self._submitted += count

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
