"""The synchronous node: ``zmqfabric.Node``."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Iterable

import zmq

from .constants import CONTROL_TIMEOUT_S, SLOT_WATCH_S, THREAD_JOIN_TIMEOUT_S
from .core.records import EndpointKind, NodeRecord, validate_endpoint_name, validate_node_name
from .nodebase import NodeBase, NodeState
from .patterns.drivers import ThreadDriver
from .patterns.pipeline import Puller, Pusher
from .patterns.plan import BLOCKING, drive
from .patterns.pubsub import Publisher, Subscription
from .patterns.reqrep import Requester
from .tasks.handle import TaskHandle
from .transport.inbox import Inbox

log = logging.getLogger(__name__)
#: Stopping waits this long (s) for the endpoints' drivers: their running handlers get
#: THREAD_JOIN_TIMEOUT_S to return, and the drivers a moment more to end.
_STOP_S = THREAD_JOIN_TIMEOUT_S + 1.0


class Node(NodeBase):
    """A named process on the fabric (synchronous API).

    ``Node(name)`` only allocates; ``start()`` or ``with Node(name) as node:`` opens it. Handles
    returned by ``publisher``/``subscribe``/``pusher``/``puller``/``requester`` belong to the
    thread that made them. ``request`` may be called from any thread (one socket per thread).
    ``stop()`` and ``close()`` are thread-safe.

    ``run()`` serves each service and task queue in a thread of its own (handlers with
    ``concurrency`` > 1 in as many more), so handlers of different endpoints run at once, in
    other threads than the one calling ``run()``.
    """

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._local = threading.local()
        #: The inbox of run()'s thread: ``stop()`` and the drivers post to it; its pipe is also
        #: the signal wakeup fd.
        self._inbox = Inbox()
        self._halted = False
        self._serving = threading.Event()
        self._serve_done = threading.Event()
        self._serve_done.set()
        self._background: threading.Thread | None = None

    # --- lifetime --------------------------------------------------------------------------

    def start(self) -> Node:
        """Open sockets, discovery and the control endpoint. Idempotent. Returns self."""
        self._open()
        return self

    def _open_services(self) -> None:
        self._inbox.open()
        super()._open_services()

    def close(self) -> None:
        """Stop serving, say goodbye on discovery, close every socket. Idempotent."""
        if self.state is NodeState.CLOSED:
            return
        self.stop()
        if self._background is not None and self._background is not threading.current_thread():
            self._background.join(_STOP_S + 1.0)
        elif not self._serve_done.wait(_STOP_S + 1.0):
            log.error("node %s: serve loop did not stop within %s s", self.name, _STOP_S + 1.0)
        self._close()
        self._inbox.close()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- serving ---------------------------------------------------------------------------

    def run(self, timeout: float | None = None, *, handle_signals: bool = True) -> None:
        """Serve this node's services and task queues until ``stop()``, SIGINT/SIGTERM or
        ``timeout`` s; then let running handlers finish (at most THREAD_JOIN_TIMEOUT_S) and
        return.

        Starts the node if needed. Signal handlers are installed only in the main thread. Raises
        what a handler raised that is not an Exception (SystemExit, KeyboardInterrupt), after
        closing the node: it says goodbye, and its unacknowledged tasks go to other workers.
        """
        fatal = self._run(timeout, handle_signals)
        if fatal is not None:
            raise fatal

    def _run(self, timeout: float | None, handle_signals: bool) -> BaseException | None:
        self.start()
        if self._serving.is_set():
            raise RuntimeError(f"node {self.name!r} is already serving in another thread")
        self._serving.set()
        self._serve_done.clear()
        restore = _install_signals(self.stop, self._inbox.wakeup_fd) if handle_signals else {}
        try:
            self._serve(None if timeout is None else time.monotonic() + timeout)
        finally:
            _restore_signals(restore)
            self._serving.clear()
            self._serve_done.set()
        fatal, self._fatal = self._fatal, None
        if fatal is not None:
            self.close()
        return fatal

    def _run_background(self) -> None:
        if self._run(None, False) is not None:
            log.error("node %s closed: a handler raised (logged above)", self.name)

    def serve_in_background(self) -> threading.Thread:
        """Run ``run()`` in a node-owned thread; ``close()`` stops and joins it. A handler that
        raises SystemExit or KeyboardInterrupt closes the node (and ends the thread)."""
        self.start()
        self._background = threading.Thread(
            target=self._run_background, name=f"zmqfabric-serve-{self.name}"
        )
        self._background.start()
        self._serving.wait(THREAD_JOIN_TIMEOUT_S)
        return self._background

    def stop(self) -> None:
        """Make ``run()`` return soon (or the next one at once, if none runs now). Thread-safe
        and signal-safe; idempotent. Ignored before ``start()`` and after ``close()``."""
        self._inbox.post(self._halt)

    def _halt(self) -> None:
        self._halted = True  # the serve loop's thread

    def _serve(self, deadline: float | None) -> None:
        """Start a driver per endpoint, watch until stopped, stop and join the drivers."""
        drivers: list[ThreadDriver] = []
        try:
            for ep in self._served():
                driver = ThreadDriver(ep, self.name, self._fatal_from_driver)
                driver.start()
                drivers.append(driver)
            self._watch(deadline)
        finally:
            for driver in drivers:
                driver.stop()
            join_by = time.monotonic() + _STOP_S
            for driver in drivers:
                driver.join(join_by)

    def _watch(self, deadline: float | None) -> None:
        """Wait for stop(), a fatal handler outcome or ``deadline``; look for hung handler slots
        every SLOT_WATCH_S meanwhile."""
        inbox = self._inbox
        poller = zmq.Poller()
        poller.register(inbox.fd, zmq.POLLIN)
        watch_at = time.monotonic() + SLOT_WATCH_S
        while True:
            now = time.monotonic()
            if now >= watch_at:
                self._watch_slots(now)
                watch_at = now + SLOT_WATCH_S
            until = watch_at if deadline is None else min(watch_at, deadline)
            inbox.poll(poller, max(1, int((until - now) * 1000)))
            inbox.run_pending()
            if self._halted:
                self._halted = False
                return
            if self._fatal is not None or (deadline is not None and time.monotonic() >= deadline):
                return

    def _fatal_from_driver(self, exc: BaseException) -> None:
        self._inbox.post(self._set_fatal, exc)  # a driver's thread: hand it to run()'s

    # --- clients ---------------------------------------------------------------------------

    def request(
        self,
        service: str,
        body: Any = None,
        timeout: float | None = None,
        retries: int = 0,
        *,
        via: str | None = None,
    ) -> Any:
        """Call ``service`` on any provider (or through the queue device node ``via``) and return
        the reply body. Thread-safe.

        Raises NoProviderError, RequestTimeoutError, RemoteError, AuthorizationError,
        ClosedError. See :meth:`Requester.request` for ``timeout`` and ``retries``.
        """
        self._check_started()
        cache: dict[tuple[str, str | None], Requester] | None = getattr(
            self._local, "requesters", None
        )
        if cache is None:
            cache = self._local.requesters = {}
        requester = cache.get((service, via))
        if requester is None or requester.closed:
            requester = cache[(service, via)] = self.requester(service, via=via)
        return requester.request(body, timeout, retries)

    def requester(self, service: str, *, via: str | None = None) -> Requester:
        """A handle that calls ``service`` (through device node ``via``, if given); owned by the
        calling thread."""
        self._check_started()
        return Requester(self.runtime, _valid(service, "service"), _via(via))

    def publisher(self, stream: str, *, allow: Iterable[str] | None = None) -> Publisher:
        """Publish ``stream`` from this node (one publisher per stream and node). ``allow``
        (secured nodes): only these public keys may subscribe."""
        self._check_started()
        return Publisher(self.runtime, _valid(stream, "stream"), allow)

    def subscribe(
        self, stream: str, topics: Iterable[str] | None = None, *, via: str | None = None
    ) -> Subscription:
        """Subscribe to ``stream`` from every publisher, now and later (or through the forwarder
        device node ``via``), with topic prefixes."""
        self._check_started()
        return Subscription(self.runtime, _valid(stream, "stream"), topics, _via(via))

    def pusher(self, pipeline: str, *, via: str | None = None) -> Pusher:
        """Send into ``pipeline``, round robin over its pullers (or into the streamer device node
        ``via``)."""
        self._check_started()
        return Pusher(self.runtime, _valid(pipeline, "pipeline"), _via(via))

    def puller(self, pipeline: str, *, allow: Iterable[str] | None = None,
               copy: bool = True) -> Puller:
        """Receive from ``pipeline`` (one puller per pipeline and node). ``allow`` (secured
        nodes): only these public keys may push. ``copy=False``: a raw body of 64 KiB or more
        arrives as a memoryview over the received frame, without a copy (as pyzmq's
        ``recv(copy=False)``); by default every body is bytes."""
        self._check_started()
        return Puller(self.runtime, _valid(pipeline, "pipeline"), allow, copy)

    def submit(
        self,
        name: str,
        body: Any = None,
        *,
        key: str | None = None,
        deadline: float | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> TaskHandle:
        """Submit reliable task ``name``; returns its handle at once (``handle.id``, and
        ``handle.result(timeout)`` for the handler's return value). Thread-safe.

        The task goes to a worker with credit, is redelivered when its worker dies or spends
        more than ``deadline`` s on it, and is retried with backoff when the handler raises, up
        to ``max_attempts`` deliveries; then it is dead-lettered. ``key``: an idempotency key
        handed to the handler with the task. Waits up to ``timeout`` s (None: forever) while
        ``TaskConfig.queue_limit`` tasks are unsettled. A ``key`` already used for ``name`` by
        a task unsettled or settled within ``TaskConfig.dedupe_window_s`` returns that task's
        handle instead. Raises LocalProtocolError (bad name or unencodable body),
        MessageTooLargeError (bigger than workers accept: NodeConfig.max_message_size),
        FabricTimeoutError, ClosedError, JournalError.

        Without a journal (``Node(..., tasks=TaskConfig(journal=path))``) unsettled tasks live
        only in this process: if it dies, they are lost. With one, ``submit`` returns once the
        task is on disk, and a producer started again with that journal resends what did not
        settle.
        """
        # NodeTasks.submit checks that the node is started: one call per task, not three.
        return self._tasks.submit(name, body, key, deadline, max_attempts, timeout)

    def submit_many(
        self,
        name: str,
        bodies: Iterable[Any],
        *,
        keys: Iterable[str | None] | None = None,
        deadline: float | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> list[TaskHandle]:
        """Submit one task of ``name`` per body (``keys``: one key or None per body); returns
        their handles in order, with one journal commit for all. Checks every body before
        queuing any; at most ``TaskConfig.queue_limit`` bodies. Raises as :meth:`submit`."""
        self._check_started()
        return self._tasks.submit_many(name, bodies, keys=keys, deadline=deadline,
                                       max_attempts=max_attempts, timeout=timeout)

    def wait_tasks(self, timeout: float | None = None) -> bool:
        """Wait until every task this node submitted (or resent from its journal) is settled;
        False after ``timeout`` s. Thread-safe."""
        return self._tasks.wait_all(timeout)

    # --- directory and control ------------------------------------------------------------

    def wait_for_node(self, name: str, timeout: float | None) -> NodeRecord:
        """Wait until node ``name`` is known (its record verified). Raises NodeNotFoundError,
        AuthorizationError (its control endpoint refused our key), FabricTimeoutError (it is
        advertised but did not answer for its record). Thread-safe."""
        return drive(self._wait_for_node(name, timeout), BLOCKING)

    def wait_for_endpoint(self, kind: EndpointKind | str, name: str, timeout: float | None) -> int:
        """Wait until ``kind`` endpoint ``name`` has a provider; returns how many. Raises
        NoProviderError. Thread-safe."""
        return drive(self._wait_for_endpoint(kind, name, timeout), BLOCKING)

    def ping(self, node: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        """Ping node ``node`` on its control endpoint. Raises NodeNotFoundError,
        FabricTimeoutError. Thread-safe."""
        return self._control_sync(node, "ping", timeout)

    def info(self, node: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return self._control_sync(node, "info", timeout)

    def stats(self, node: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return self._control_sync(node, "stats", timeout)


def _valid(name: str, what: str) -> str:
    return validate_endpoint_name(name, what)


def _via(via: str | None) -> str | None:
    return None if via is None else validate_node_name(via)


def _install_signals(stop: Any, wakeup_fd: int) -> dict[int, Any]:
    """SIGINT/SIGTERM call ``stop``; the C-level handler also writes to ``wakeup_fd`` so the
    serve loop's poll wakes at once even when Python runs the handler late."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    restore: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        restore[signum] = signal.signal(signum, lambda *_: stop())
    restore[-1] = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
    return restore


def _restore_signals(restore: dict[int, Any]) -> None:
    for signum, old in restore.items():
        if signum == -1:
            signal.set_wakeup_fd(old)
        else:
            signal.signal(signum, old)
