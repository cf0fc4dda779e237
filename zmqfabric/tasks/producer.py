"""Reliable tasks, the producer side: the node's dispatcher thread ("zmqfabric-tasks-<node>").

It owns every socket it uses: one DEALER per worker of each task name (so it chooses the worker of
every task), a socket monitor on each (:mod:`.links`) and the dead-letter publishers; it shares
the journal with the submitters (:mod:`.recorder`: they record, it forgets). Other threads only
hand it work: ``submit`` (any thread) appends tasks, already on disk when there is a journal, to
a deque, and posts one ``_take`` per batch of them to its
:class:`~zmqfabric.transport.inbox.Inbox` (a deque of callables, and a pipe written once per
sleep); the directory's watchers (discovery's thread) post the connection to a worker, or its
loss. Tasks handed over once the thread has ended fail in the submitter's thread.

Each round: wait or nap (:meth:`Dispatcher._wait`), read results and credit, then monitor events
(a worker whose connection drops is lost: its tasks are redelivered at once), then new tasks,
deadlines and retry timers, then dispatch to workers with credit (task messages split to stay
under the size workers accept), then completions (:mod:`.settling`: journal deletes batched,
handles and waiters). The decisions are the pure state machine's
(:class:`zmqfabric.core.tasktable.TaskTable`).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq

from ..constants import TASK_FRAME_OVERHEAD, TASK_NAP_MS, TASK_TICK_MS
from ..core import task_frames, wire
from ..core.records import EndpointKind
from ..core.tasktable import Task, TaskTable
from ..errors import (
    ClosedError,
    FabricError,
    MessageTooLargeError,
    RemoteProtocolError,
)
from ..stats import RateLimitedLog
from ..transport.frames import NOBLOCK, recv_frames
from ..transport.inbox import Inbox
from .deadletters import DeadLetters
from .handle import HandleOwner, TaskHandle
from .links import Links, WorkerLink
from .recorder import Recorder
from .settling import Settler

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)

_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
#: Messages read from one worker per round, and submitted tasks taken per round (fairness).
_READ_BATCH = 256
_RESULT = wire.Kind.RESULT  # per message: a module global, not an enum class attribute
_TAKE_BATCH = 8192


class Dispatcher:
    """Allocates in the caller's thread; ``open()`` opens the wake pipe, ``start()`` the thread.
    ``recorder``: the open journal, if any (closed with the dispatcher)."""

    def __init__(self, node: NodeRuntime, tasks: HandleOwner, recorder: Recorder | None) -> None:
        self._node = node
        self._tasks = tasks
        config = tasks.config
        self._retry = config.retry
        self._size_limit = node.config.max_message_size
        self._dead = DeadLetters(node, config.dead_letter_path)
        self._settler = Settler(tasks, recorder, self._dead, node.name)
        self._collect = self._settler.collect
        self._thread = threading.Thread(target=self._run, name=f"zmqfabric-tasks-{node.name}")
        self._inbox = Inbox()
        self._stopping = False
        self.closed = False
        self._tables: dict[str, TaskTable] = {}
        self._unwatch: list[Callable[[], None]] = []
        self._poller = zmq.Poller()
        self._links = Links(self._poller)
        self._resumed: list[tuple[str, Task]] = []
        #: How many tasks this round's ``_take`` took (queued in their tables already).
        self._took = 0
        #: Submitted tasks not taken yet (see ``submit``): a handle, or a list of them from one
        #: ``submit_many``; a ``_take`` is posted for them.
        self._incoming: collections.deque[TaskHandle | list[TaskHandle]] = collections.deque()
        self._take_posted = False
        self._hello = wire.pack_body({"from": node.name})
        self._napping = False
        #: Tasks wait for credit (after the round's dispatch): a nap ends with a result.
        self._starved = False
        self._last_new = -math.inf
        #: Polled while napping: only the inbox's pipe, which only ``wake()`` writes then.
        self._nap = zmq.Poller()

    # --- any thread ----------------------------------------------------------------------------

    def open(self, resumed: list[tuple[str, Task]]) -> None:
        """Open the wake pipe; ``resumed``: (name, task) from the journal, sent once the thread
        runs."""
        self._resumed = resumed
        fd = self._inbox.open()
        self._poller.register(fd, zmq.POLLIN)
        self._nap.register(fd, zmq.POLLIN)

    def start(self) -> None:
        self._thread.start()

    def submit(self, tasks: TaskHandle | list[TaskHandle]) -> None:
        """Hand a task, or a list of tasks, to the thread (each handle knows its task name).
        Raises ClosedError once closing. Thread-safe.

        The tasks go to a deque the thread empties each round; the inbox carries one post
        (``_take``) per such batch, not one per call. Appended before ``_take_posted`` is read
        and lowered by ``_take`` before it empties the deque, so a batch is either taken by a
        ``_take`` under way or posts one itself (at worst a spare one)."""
        if self._stopping:
            raise ClosedError(f"node {self._node.name!r} is closing")
        self._incoming.append(tasks)
        if not self._take_posted:
            self._take_posted = True
            if not self._inbox.post(self._take):
                self._fail_incoming()  # the inbox is closed: the thread is long gone
                return
        if self.closed:  # the thread ended between our check and the append
            self._fail_incoming()

    def _post(self, op: str, name: str, url: str) -> None:
        # discovery's thread: queue and wake (even a napping thread), never touch a socket
        if not self._stopping:
            self._inbox.post(self._connect if op == "connect" else self._drop, name, url)
            self._inbox.wake()

    def stats(self) -> dict[str, Any]:
        return {name: t.stats() for name, t in list(self._tables.items())}

    def close(self, timeout: float) -> None:
        """Stop the thread: unsettled tasks fail with ClosedError (a journal keeps them)."""
        self._stopping = True
        self._inbox.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("task dispatcher of %s did not stop within %s s",
                          self._node.name, timeout)
                return
        elif not self.closed:
            self._shutdown()  # never started
        self._inbox.close(drop=False)  # a submit racing with this close fails its own tasks

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._resume()
            while not self._stopping:
                try:
                    self._round()
                except Exception:  # a bug here must not strand every task
                    self._node.counters.add("task_dispatcher_errors")
                    log.exception("%s: error in the task dispatcher", self._node.name)
                    time.sleep(TASK_TICK_MS / 1000)
        finally:
            self._shutdown()

    def _round(self) -> None:
        inbox = self._inbox
        events = self._wait(inbox)
        now = time.monotonic()
        monitors = []
        for sock in events:
            link = self._links.with_socket(sock)
            if link is not None:
                self._read(link, now)
            elif sock != inbox.fd:  # the inbox's pipe: poll() emptied it
                monitors.append(sock)
        for sock in monitors:
            link = self._links.with_monitor(sock)
            if link is not None:
                self._on_monitor(link, now)
        self._took = 0
        self._take_posts()
        if self._took:  # tasks that follow others while those are unsettled: nap (see _wait)
            self._node.counters.add("task_takes")
            self._napping = (now - self._last_new < TASK_NAP_MS / 1000
                             and sum(t.unsettled for t in self._tables.values()) > self._took)
            self._last_new = now
        else:
            self._napping = False
        for table in self._tables.values():
            if now >= table.next_due:
                self._collect(table.name, table.tick(now))
        self._dispatch(now)
        self._starved = any(t.waiting for t in self._tables.values())
        self._settler.finish(now)

    def _wait(self, inbox: Inbox) -> dict[Any, int]:
        """Sleep until a post, a result or a timer, or nap (TASK_NAP_MS): a round, sends and
        receives per task would fight the submitter for the GIL. A lone task, the first of a
        burst and the next of a caller that waits for each result leave at once and their
        results are read at once. A nap is deaf to posts, and to results unless tasks wait for
        credit; ``wake()`` ends it."""
        timeout = self._timeout(time.monotonic())
        if not self._napping:
            return inbox.poll(self._poller, timeout)
        self._node.counters.add("task_naps")
        # Tasks wait for credit: a result ends the nap. Posts do not (they are not written).
        (self._poller if self._starved else self._nap).poll(min(timeout, TASK_NAP_MS))
        return inbox.poll(self._poller, 0, wake=False)  # what is ready now; empties the pipe

    def _timeout(self, now: float) -> int:
        due = min((t.next_due for t in self._tables.values()), default=math.inf)
        if due == math.inf:
            return TASK_TICK_MS
        return min(TASK_TICK_MS, max(1, math.ceil((due - now) * 1000)))

    def _take_posts(self) -> None:
        """Run what was posted (``_take``, ``_connect``, ``_drop``); ``_take`` takes what was
        submitted up to then, so a busy submitter's tasks leave in large batches."""
        self._inbox.run_pending()

    def _take(self) -> None:
        """Posted by ``submit``: queue the new tasks (already in the journal, if there is one)
        in their tables, up to _TAKE_BATCH (the rest at the next round): one ``submit_many``
        per run of a task name, not a call per task. Once the thread has ended (a leftover, run
        by any thread), they fail instead."""
        self._take_posted = False  # before emptying: see submit
        if self.closed:
            self._fail_incoming()
            return
        incoming = self._incoming
        run: list[TaskHandle] = []  # submitted one by one, of one name
        name = ""
        taken = 0
        while incoming and taken < _TAKE_BATCH:
            item = incoming.popleft()
            if isinstance(item, list):  # a submit_many: one name
                if run:
                    self._queue(name, run)
                    run = []
                self._queue(item[0].name, item)
                taken += len(item)
                continue
            if item.name != name:
                if run:
                    self._queue(name, run)
                    run = []
                name = item.name
            run.append(item)
            taken += 1
        if run:
            self._queue(name, run)
        self._took += taken
        if incoming and not self._take_posted:
            self._take_posted = True
            self._inbox.post(self._take)

    def _fail_incoming(self) -> None:
        """Fail what ``submit`` queued (any thread, once the dispatcher is gone): each batch is
        taken by one thread only."""
        incoming = self._incoming
        while True:
            try:
                item = incoming.popleft()
            except IndexError:
                return
            self._settler.fail_submitted(item if isinstance(item, list) else [item])

    def _queue(self, name: str, handles: list[TaskHandle]) -> None:
        """Queue submitted ``handles`` of task ``name`` in its table. If the table cannot be
        made, they fail with the reason: a task whose ``submit`` returned is never dropped, and
        the tasks behind them are still taken."""
        table = self._table_or_error(name)
        if isinstance(table, str):
            self._settler.fail_submitted(handles, FabricError(
                f"node {self._node.name!r} cannot queue task {name!r}: {table}"))
            return
        table.submit_many(handles)

    def _table_or_error(self, name: str) -> TaskTable | str:
        """The table of task ``name``, made if need be, or why it cannot be made (a bug, or the
        node closing under us: counted, logged rate-limited)."""
        table = self._tables.get(name)
        if table is not None:
            return table
        try:
            return self._table(name)
        except Exception as exc:
            self._node.counters.add("task_dispatcher_errors")
            _rlog.exception("task-queue", "%s: cannot queue tasks of %r", self._node.name, name)
            return f"{type(exc).__name__}: {exc}"

    def _table(self, name: str) -> TaskTable:
        """Make the table of task ``name`` (it has none yet)."""
        table = TaskTable(name, self._retry)
        self._dead.open(name)
        self._unwatch.append(self._node.directory.watch(
            EndpointKind.TASK, name, lambda op, url: self._post(op, name, url)))
        self._tables[name] = table  # last: a table is listed once it has its watch
        return table

    # --- workers -------------------------------------------------------------------------------

    def _connect(self, name: str, url: str) -> None:
        """Posted by the directory's watcher: a worker of ``name`` at ``url`` appeared."""
        if self.closed or self._links.get(name, url) is not None:
            return
        factory = self._node.sockets
        sock = factory.socket(zmq.DEALER, sync=True)
        monitor = factory.monitor(sock, _EVENTS, sync=True)
        link = WorkerLink(name, url, sock, monitor, self._tables[name])
        try:
            self._node.connect(sock, url)  # with the worker's CURVE key on a secured fabric
        except (zmq.ZMQError, FabricError) as exc:
            log.warning("%s: cannot connect to task %r at %s: %s", self._node.name, name, url, exc)
            link.close()
            return
        self._links.add(link)

    def _drop(self, name: str, url: str) -> None:
        """Posted by the directory's watcher: the worker of ``name`` at ``url`` is gone."""
        link = None if self.closed else self._links.get(name, url)
        if link is not None:
            self._disconnect(link, time.monotonic())

    def _disconnect(self, link: WorkerLink, now: float) -> None:
        self._read(link, now)  # what arrived before it left still counts
        self._collect(link.name, link.table.lose_worker(link.url, now))
        self._links.remove(link)

    def _on_monitor(self, link: WorkerLink, now: float) -> None:
        for event in link.events():
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.send_hello(self._hello)
            elif event == zmq.EVENT_DISCONNECTED:
                self._read(link, now)  # results that arrived before the drop count
                self._collect(link.name, link.table.lose_worker(link.url, now))

    def _read(self, link: WorkerLink, now: float) -> None:
        sock, table, url = link.sock, link.table, link.url
        for _ in range(_READ_BATCH):
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, body = task_frames.read_from_worker(frames)
            except RemoteProtocolError as exc:
                self._refused(link, f"dropped a malformed message: {exc}")
                continue
            if kind is _RESULT:
                refused = table.refused  # the table checks each result as it takes it
                self._collect(link.name, table.on_results(url, body, now))
                if table.refused != refused:
                    self._refused(link, f"dropped {table.refused - refused} malformed results")
            else:
                table.set_credit(url, body[0], now, body[1])

    def _refused(self, link: WorkerLink, what: str) -> None:
        self._node.counters.add("refused_task_results")
        _rlog.warning("task-results", "task %r: %s from %s", link.name, what, link.url)

    # --- tasks ---------------------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        links = self._links
        for name, table in self._tables.items():
            for url, tasks in table.assign(now):
                link = links.get(name, url)
                if link is None:
                    table.unassign(url, tasks, now)
                    continue
                if link.hello_due:
                    link.send_hello(self._hello)
                self._send_tasks(link, table, tasks, now)
        for link in self._links:
            if link.hello_due:
                link.send_hello(self._hello)

    def _send_tasks(self, link: WorkerLink, table: TaskTable, tasks: list[Task],
                    now: float) -> None:
        """Send ``tasks`` to ``link``'s worker; what cannot leave goes back to the table."""
        sent = link.send_tasks(tasks, self._size_limit)
        if sent < len(tasks):
            table.unassign(link.url, tasks[sent:], now)

    def _resume(self) -> None:
        """Queue the tasks the journal held; one that no longer fits this node's
        ``max_message_size`` (lowered since it was submitted) is dead-lettered now, not sent.
        Tasks whose table cannot be made stay in the journal; the thread goes on."""
        for name, task in self._resumed:
            table = self._table_or_error(name)
            if isinstance(table, str):
                continue  # it stays in the journal, for the next producer
            if len(task.payload) + TASK_FRAME_OVERHEAD <= self._size_limit:
                table.submit(task)
                continue
            self._collect(name, table.refuse(task, (
                MessageTooLargeError.__name__,
                f"the journaled task's body of {len(task.payload)} bytes exceeds this node's "
                f"max_message_size of {self._size_limit}")))
        self._resumed = []

    # --- closing -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch = []
        self._settler.close(list(self._tables.values()), time.monotonic())
        self._links.close()
        self.closed = True
        self._inbox.run_leftovers()  # posted after the thread's last look: _take fails them
        self._fail_incoming()
