"""The asyncio node: ``zmqfabric.aio.Node``, the same surface as :class:`zmqfabric.Node` with
coroutines. It shares the implementation (``NodeBase``, the pattern bases and their plans); only
waiting differs.

All methods run in the loop that started the node, except ``stop()``, which is thread-safe. No
method blocks the loop: every wait is awaited (the directory, sockets, connection events), and
what must block a thread (starting: claiming the name; closing: joining the node's threads and
terminating the context) runs in one with ``asyncio.to_thread``. Handlers may be plain functions
(run in threads, never in the loop, so a slow one holds up nothing else) or coroutine functions
(run as tasks of the loop); each service and task queue takes ``concurrency`` requests or tasks
at once (default 1: one at a time, in order).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Any, Iterable

from .calls import control_call_async
from .constants import (
    AIO_THREAD_WAIT_S,
    CONTROL_TIMEOUT_S,
    MAX_IDLE_REQUESTERS,
    SLOT_WATCH_S,
    THREAD_JOIN_TIMEOUT_S,
)
from .core.records import EndpointKind, NodeRecord, validate_endpoint_name, validate_node_name
from .errors import ClosedError, FabricTimeoutError
from .nodebase import NodeBase, NodeState
from .patterns.drivers import LoopDriver
from .patterns.pipeline import AsyncPuller, AsyncPusher
from .patterns.plan import AWAITING, drive_async
from .patterns.pubsub import AsyncPublisher, AsyncSubscription
from .patterns.reqrep_aio import AsyncRequester
from .tasks.handle import TaskHandle
from .transport.frames import deadline_after, s_left

log = logging.getLogger(__name__)

__all__ = ["Node"]


class Node(NodeBase):
    """A named process on the fabric (asyncio API). ``async with Node(name) as node: ...``"""

    _ASYNC = True

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._requesters: dict[tuple[str, str | None], list[AsyncRequester]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._serving = False
        self._starting: asyncio.Future[None] | None = None
        self._closing: asyncio.Future[None] | None = None

    # --- lifetime --------------------------------------------------------------------------

    async def start(self) -> Node:
        """Open sockets, discovery and the control endpoint. Idempotent. Returns self.

        The opening runs in a worker thread (claiming the name listens CONFLICT_WINDOW_S for a
        rival); the loop goes on meanwhile. Raises NameConflictError, ClosedError."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise ClosedError(f"node {self.name!r} belongs to another event loop")
        self._loop = loop
        self._stop_event = self._stop_event or asyncio.Event()
        if self.state is NodeState.NEW:
            if self._starting is None:
                self._starting = asyncio.ensure_future(asyncio.to_thread(self._open))
            await asyncio.shield(self._starting)
        else:
            self._open()  # started: returns at once; closed: raises ClosedError
        return self

    async def close(self) -> None:
        """Stop serving, say goodbye on discovery, close every socket. Idempotent; a close
        that is cancelled still completes. Handles are closed in the loop; the goodbye, joining
        the node's threads and terminating the context run in worker threads."""
        if self._closing is None:
            if self.state is NodeState.CLOSED:
                return
            self._closing = asyncio.ensure_future(self._close_async())
        await asyncio.shield(self._closing)

    async def _close_async(self) -> None:
        self.stop()
        if self._starting is not None and not self._starting.done():
            await asyncio.wait([self._starting])  # let the opening in its thread finish first
        if not self._begin_close():
            return
        goodbye = asyncio.ensure_future(asyncio.to_thread(self._close_discovery))
        try:
            await asyncio.wait_for(asyncio.shield(goodbye), THREAD_JOIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("node %s: the discovery goodbye took over %s s; closing anyway",
                        self.name, THREAD_JOIN_TIMEOUT_S)
        finally:
            await asyncio.to_thread(self._close_threads)
            self._close_handles()
            await asyncio.to_thread(self._close_context)

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- serving ---------------------------------------------------------------------------

    async def run(self, timeout: float | None = None, *, handle_signals: bool = True) -> None:
        """Serve services and task queues until ``stop()``, SIGINT/SIGTERM or ``timeout``
        seconds; then let running handlers finish (at most THREAD_JOIN_TIMEOUT_S; coroutine
        handlers still running then are cancelled) and return.

        Raises what a handler raised that is not an Exception (SystemExit, KeyboardInterrupt),
        after closing the node: it says goodbye, and its unacknowledged tasks go elsewhere."""
        await self.start()
        if self._serving:
            raise RuntimeError(f"node {self.name!r} is already serving")
        assert self._stop_event is not None and self._loop is not None
        self._serving = True
        self._stop_event.clear()
        signals = _install_signals(self._loop, self.stop) if handle_signals else []
        drivers: list[LoopDriver] = []
        try:
            for ep in self._served():
                driver = LoopDriver(ep, self.name, self._on_fatal)
                driver.start()
                drivers.append(driver)
            await self._watch(timeout)
        finally:
            await asyncio.gather(*(driver.stop() for driver in drivers))
            for signum in signals:
                self._loop.remove_signal_handler(signum)
            self._serving = False
        fatal, self._fatal = self._fatal, None
        if fatal is not None:
            await self.close()
            raise fatal

    async def _watch(self, timeout: float | None) -> None:
        """Wait for stop() or ``timeout``; look for hung handler slots every SLOT_WATCH_S."""
        assert self._stop_event is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop_event.is_set():
            wait = SLOT_WATCH_S
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return
            try:
                await asyncio.wait_for(self._stop_event.wait(), wait)
            except asyncio.TimeoutError:
                self._watch_slots(time.monotonic())

    def _on_fatal(self, exc: BaseException) -> None:
        self._set_fatal(exc)  # in the loop
        self.stop()

    def stop(self) -> None:
        """Make ``run()`` return. Thread-safe; idempotent."""
        loop, event = self._loop, self._stop_event
        if loop is None or event is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            loop.call_soon_threadsafe(event.set)

    # --- clients ---------------------------------------------------------------------------

    async def request(self, service: str, body: Any = None, timeout: float | None = None,
                      retries: int = 0, *, via: str | None = None) -> Any:
        """Call ``service`` on any provider; see :meth:`zmqfabric.Node.request`."""
        self._check_started()
        # One requester per call in flight: a requester matches one reply at a time, so
        # concurrent coroutines each borrow their own and give it back.
        idle = self._requesters.setdefault((service, via), [])
        requester = idle.pop() if idle else self.requester(service, via=via)
        try:
            return await requester.request(body, timeout, retries)
        finally:
            if requester.closed or len(idle) >= MAX_IDLE_REQUESTERS:
                requester.close()
            else:
                idle.append(requester)

    def requester(self, service: str, *, via: str | None = None) -> AsyncRequester:
        """A handle that calls ``service`` (through device node ``via``, if given), owned by
        this loop; its ``request`` is a coroutine. One call at a time per requester."""
        self._check_started()
        return AsyncRequester(self.runtime, validate_endpoint_name(service, "service"), _via(via))

    def publisher(self, stream: str, *, allow: Iterable[str] | None = None) -> AsyncPublisher:
        """Publish ``stream``; ``send`` never waits, so it is a plain method;
        ``wait_subscribers`` is a coroutine. ``allow``: see :meth:`zmqfabric.Node.publisher`."""
        self._check_started()
        return AsyncPublisher(self.runtime, validate_endpoint_name(stream, "stream"), allow)

    def subscribe(
        self, stream: str, topics: Iterable[str] | None = None, *, via: str | None = None
    ) -> AsyncSubscription:
        """Subscribe to ``stream`` with topic prefixes: ``async for topic, body in sub``."""
        self._check_started()
        name = validate_endpoint_name(stream, "stream")
        return AsyncSubscription(self.runtime, name, topics, _via(via))

    def pusher(self, pipeline: str, *, via: str | None = None) -> AsyncPusher:
        """Send into ``pipeline`` (``await pusher.send(body)``), round robin over its pullers."""
        self._check_started()
        return AsyncPusher(self.runtime, validate_endpoint_name(pipeline, "pipeline"), _via(via))

    def puller(self, pipeline: str, *, allow: Iterable[str] | None = None,
               copy: bool = True) -> AsyncPuller:
        """Receive from ``pipeline``: ``async for body in puller``. ``allow`` and ``copy``: see
        :meth:`zmqfabric.Node.puller`."""
        self._check_started()
        return AsyncPuller(self.runtime, validate_endpoint_name(pipeline, "pipeline"), allow,
                           copy)

    async def submit(self, name: str, body: Any = None, *, key: str | None = None,
                     deadline: float | None = None, max_attempts: int | None = None,
                     timeout: float | None = None) -> TaskHandle:
        """Submit reliable task ``name``; see :meth:`zmqfabric.Node.submit`. Returns the handle
        once the task is queued (``await handle`` gives the handler's return value). While the
        queue is full (``TaskConfig.queue_limit``) it waits up to ``timeout`` s (None: no limit)
        without blocking the loop, then raises FabricTimeoutError."""
        self._check_started()
        options: dict[str, Any] = {"key": key, "deadline": deadline, "max_attempts": max_attempts}
        if self._tasks.journaled:  # submit waits for a journal commit: not in the loop
            return await asyncio.to_thread(self._tasks.submit, name, body, timeout=timeout,
                                           **options)
        ends = deadline_after(timeout)
        try:
            return self._tasks.submit(name, body, timeout=0, **options)
        except FabricTimeoutError:
            if timeout == 0:
                raise
        # The queue is full: the registry's wait blocks, so it runs in a thread, in slices (a
        # cancelled submit leaves no thread waiting for long).
        while True:
            try:
                return await asyncio.to_thread(
                    self._tasks.submit, name, body, timeout=_slice(ends), **options
                )
            except FabricTimeoutError as exc:
                if s_left(ends) == 0:
                    raise FabricTimeoutError(
                        f"the task queue of node {self.name!r} stayed full "
                        f"(TaskConfig.queue_limit) for {timeout:g} s", timeout=timeout
                    ) from exc

    async def submit_many(
        self,
        name: str,
        bodies: Iterable[Any],
        *,
        keys: Iterable[str | None] | None = None,
        deadline: float | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> list[TaskHandle]:
        """Submit one task per body; see :meth:`zmqfabric.Node.submit_many`."""
        self._check_started()
        options: dict[str, Any] = {"keys": keys, "deadline": deadline,
                                   "max_attempts": max_attempts}
        bodies = list(bodies)
        if not self._tasks.journaled:
            try:
                return self._tasks.submit_many(name, bodies, timeout=0, **options)
            except FabricTimeoutError:
                if timeout == 0:
                    raise
        return await asyncio.to_thread(self._tasks.submit_many, name, bodies, timeout=timeout,
                                       **options)

    async def wait_tasks(self, timeout: float | None = None) -> bool:
        """Wait until every task this node submitted is settled; False after ``timeout``.
        Never blocks the loop (the registry's wait runs in a thread, in slices)."""
        ends = deadline_after(timeout)
        while not await asyncio.to_thread(self._tasks.wait_all, _slice(ends)):
            if s_left(ends) == 0:
                return False
        return True

    # --- control and directory ---------------------------------------------------------------

    async def ping(self, node: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        """Ping node ``node`` on its control endpoint. Raises NodeNotFoundError,
        FabricTimeoutError, AuthorizationError, ClosedError."""
        return await self._ask(node, "ping", timeout)

    async def info(self, node: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        """Node ``node``'s address, endpoints and peers; raises as :meth:`ping`."""
        return await self._ask(node, "info", timeout)

    async def stats(self, node: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        """Node ``node``'s endpoints and counters; raises as :meth:`ping`."""
        return await self._ask(node, "stats", timeout)

    async def _ask(self, node: str, op: str, timeout: float) -> Any:
        self._check_started()
        return await control_call_async(self.runtime, node, op, timeout)

    async def wait_for_node(self, name: str, timeout: float | None) -> NodeRecord:
        """Wait until node ``name`` is known (its record verified). Raises NodeNotFoundError,
        AuthorizationError (its control endpoint refused our key), FabricTimeoutError (it is
        advertised but did not answer for its record)."""
        return await drive_async(self._wait_for_node(name, timeout), AWAITING)

    async def wait_for_endpoint(
        self, kind: EndpointKind | str, name: str, timeout: float | None
    ) -> int:
        """Wait until ``kind`` endpoint ``name`` has a provider; returns how many. Raises
        NoProviderError."""
        return await drive_async(self._wait_for_endpoint(kind, name, timeout), AWAITING)


def _via(via: str | None) -> str | None:
    return None if via is None else validate_node_name(via)


def _slice(deadline: float | None) -> float:
    """The next slice of a wait that runs in a thread: AIO_THREAD_WAIT_S, or less when
    ``deadline`` is nearer."""
    left = s_left(deadline)
    return AIO_THREAD_WAIT_S if left is None else min(left, AIO_THREAD_WAIT_S)


def _install_signals(loop: asyncio.AbstractEventLoop, stop: Any) -> list[int]:
    if threading.current_thread() is not threading.main_thread():
        return []
    installed: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):
            pass
    return installed
