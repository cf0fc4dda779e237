"""The asyncio node: ``zmqfabric.aio.Node``, the same surface as :class:`zmqfabric.Node` with
coroutines. It shares the implementation (``NodeBase`` and the pattern bases); only waiting differs.

All methods run in the loop that started the node, except ``stop()``, which is thread-safe.
Handlers may be plain functions (run in threads, never in the loop, so a slow one holds up
nothing else) or coroutine functions (run as tasks of the loop); each service and task queue
takes ``concurrency`` requests or tasks at once (default 1: one at a time, in order).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Any, Iterable

from .constants import CONTROL_TIMEOUT_S, MAX_IDLE_REQUESTERS, SLOT_WATCH_S, THREAD_JOIN_TIMEOUT_S
from .core.records import validate_endpoint_name, validate_node_name
from .errors import ClosedError, FabricTimeoutError
from .nodebase import NodeBase, NodeState
from .patterns.drivers import LoopDriver
from .patterns.pipeline import AsyncPuller, AsyncPusher
from .patterns.pubsub import AsyncSubscription, Publisher
from .patterns.reqrep import AsyncRequester
from .tasks.handle import TaskHandle

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

    # --- lifetime --------------------------------------------------------------------------

    async def start(self) -> Node:
        """Open sockets, discovery and the control endpoint. Idempotent. Returns self."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise ClosedError(f"node {self.name!r} belongs to another event loop")
        self._loop = loop
        self._stop_event = self._stop_event or asyncio.Event()
        self._open()
        return self

    async def close(self) -> None:
        """Stop serving, say goodbye on discovery, close every socket. Idempotent."""
        if self.state is NodeState.CLOSED:
            return
        self.stop()
        if self._begin_close():
            goodbye = asyncio.ensure_future(asyncio.to_thread(self._close_discovery))
            try:
                await asyncio.wait_for(asyncio.shield(goodbye), THREAD_JOIN_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("node %s: the discovery goodbye took over %s s; closing anyway",
                            self.name, THREAD_JOIN_TIMEOUT_S)
            finally:
                self._close_local()

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

    async def request(
        self,
        service: str,
        body: Any = None,
        timeout: float | None = None,
        retries: int = 0,
        *,
        via: str | None = None,
    ) -> Any:
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
        self._check_started()
        return AsyncRequester(self.runtime, validate_endpoint_name(service, "service"), _via(via))

    def publisher(self, stream: str, *, allow: Iterable[str] | None = None) -> Publisher:
        """Publish ``stream``; ``send`` never waits, so it is a plain method."""
        self._check_started()
        return Publisher(self.runtime, validate_endpoint_name(stream, "stream"), allow)

    def subscribe(
        self, stream: str, topics: Iterable[str] | None = None, *, via: str | None = None
    ) -> AsyncSubscription:
        self._check_started()
        return AsyncSubscription(
            self.runtime, validate_endpoint_name(stream, "stream"), topics, _via(via)
        )

    def pusher(self, pipeline: str, *, via: str | None = None) -> AsyncPusher:
        self._check_started()
        return AsyncPusher(self.runtime, validate_endpoint_name(pipeline, "pipeline"), _via(via))

    def puller(self, pipeline: str, *, allow: Iterable[str] | None = None) -> AsyncPuller:
        self._check_started()
        return AsyncPuller(self.runtime, validate_endpoint_name(pipeline, "pipeline"), allow)

    async def submit(
        self,
        name: str,
        body: Any = None,
        *,
        key: str | None = None,
        deadline: float | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> TaskHandle:
        """Submit reliable task ``name``; see :meth:`zmqfabric.Node.submit`. Returns the handle
        once the task is queued (``await handle`` gives the handler's return value)."""
        self._check_started()
        options: dict[str, Any] = {"key": key, "deadline": deadline, "max_attempts": max_attempts}
        if self._tasks.journaled:  # submit waits for a journal commit: not in the loop
            return await asyncio.to_thread(self._tasks.submit, name, body, timeout=timeout,
                                           **options)
        try:
            return self._tasks.submit(name, body, timeout=0, **options)
        except FabricTimeoutError:  # the queue is full: wait for room without blocking the loop
            if timeout == 0:
                raise
        return await asyncio.to_thread(self._tasks.submit, name, body, timeout=timeout, **options)

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
        """Wait until every task this node submitted is settled; False after ``timeout``."""
        return await asyncio.to_thread(self._tasks.wait_all, timeout)

    # --- control and directory ---------------------------------------------------------------

    async def ping(self, node: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return await asyncio.to_thread(self._control_sync, node, "ping", timeout)

    async def info(self, node: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return await asyncio.to_thread(self._control_sync, node, "info", timeout)

    async def stats(self, node: str, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return await asyncio.to_thread(self._control_sync, node, "stats", timeout)

    async def wait_for_node_async(self, name: str, timeout: float) -> Any:
        return await asyncio.to_thread(self.wait_for_node, name, timeout)


def _via(via: str | None) -> str | None:
    return None if via is None else validate_node_name(via)


def _install_signals(loop: asyncio.AbstractEventLoop, stop: Any) -> list[int]:
    if threading.current_thread() is not threading.main_thread():
        return []
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):
            pass
    return installed
