"""The asyncio node: ``zmqfabric.aio.Node``, the same surface as :class:`zmqfabric.Node` with
coroutines. It shares the implementation (``NodeBase`` and the pattern bases); only waiting differs.

All methods run in the loop that started the node, except ``stop()``, which is thread-safe.
Reply handlers may be plain functions or coroutine functions; each service answers one request at
a time, in order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any, Iterable

from .constants import CONTROL_TIMEOUT_S, MAX_IDLE_REQUESTERS, THREAD_JOIN_TIMEOUT_S
from .core.records import validate_endpoint_name, validate_node_name
from .errors import ClosedError, FabricTimeoutError
from .nodebase import NodeBase, NodeState
from .patterns.pipeline import AsyncPuller, AsyncPusher
from .patterns.pubsub import AsyncSubscription, Publisher
from .patterns.reqrep import AsyncRequester, ServiceEndpoint
from .tasks.handle import TaskHandle
from .tasks.worker import TaskEndpoint

log = logging.getLogger(__name__)

__all__ = ["Node"]


class Node(NodeBase):
    """A named process on the fabric (asyncio API). ``async with Node(name) as node: ...``"""

    _ASYNC = True

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._services: dict[str, ServiceEndpoint] = {}
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

    def _open_services(self) -> None:
        for service, handler in self._handlers.items():
            allow = self._service_allow.get(service)
            self._services[service] = ServiceEndpoint(self.runtime, service, handler, allow)

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
        """Serve reply services until ``stop()``, SIGINT/SIGTERM or ``timeout`` seconds."""
        await self.start()
        if self._serving:
            raise RuntimeError(f"node {self.name!r} is already serving")
        assert self._stop_event is not None and self._loop is not None
        self._serving = True
        self._stop_event.clear()
        signals = _install_signals(self._loop, self.stop) if handle_signals else []
        endpoints: list[ServiceEndpoint | TaskEndpoint] = [*self._services.values()]
        endpoints.extend(self._tasks.endpoints())
        tasks = [asyncio.create_task(self._serve(svc)) for svc in endpoints]
        try:
            await asyncio.wait_for(self._stop_event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for signum in signals:
                self._loop.remove_signal_handler(signum)
            self._serving = False

    async def _serve(self, service: ServiceEndpoint | TaskEndpoint) -> None:
        while True:
            frames = await service.socket.recv_multipart()
            await service.serve_async(frames)

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
