"""What a sync :class:`zmqfabric.Node` and an asyncio :class:`zmqfabric.aio.Node` share: identity,
configuration, the directory, discovery, the control endpoint, the endpoint table and lifetimes.
Services and reliable tasks keep their own registries (:mod:`.services`, :mod:`.tasks.registry`);
discovery, membership, housekeeping, control and the guard, and the order they open and close in,
are :mod:`.nodeparts`.

Constructors only allocate. ``start()`` (or ``with``) opens sockets, discovery and the control
thread; ``close()`` sends the discovery goodbye first, then closes every handle, then the context.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Callable, Iterable, TypeVar

from .calls import control_call, find_node
from .config import NodeConfig, Scope, fabric_from_env
from .core.records import EndpointKind, NodeRecord, validate_node_name
from .discovery.directory import Directory
from .errors import ClosedError, LocalProtocolError, NoProviderError
from .nodeparts import NodeParts
from .patterns.handlers import Served, check_concurrency, is_coroutine_handler
from .patterns.plan import WAIT_DIRECTORY, Plan
from .runtime import NodeRuntime, NodeState
from .security.keys import KeySet
from .security.keys import load as load_keys
from .services import NodeServices
from .stats import Counters, RateLimitedLog
from .tasks.registry import NodeTasks, TaskConfig
from .transport.frames import deadline_after

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)
F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["NodeBase", "NodeState"]


class NodeBase:
    _ASYNC = False

    def __init__(
        self,
        name: str,
        *,
        scope: Scope | None = None,
        config: NodeConfig | None = None,
        advertise: bool = True,
        on_conflict: str = "fail",
        keys: str | os.PathLike[str] | KeySet | None = None,
        tasks: TaskConfig | None = None,
        fabric: str | None = None,
        metrics_port: int | None = None,
    ) -> None:
        """``advertise=False`` makes an observer: it browses and calls others but is not listed
        and cannot offer endpoints (the CLI's ``ls``, ``req``, ``sub``, ``push`` use this).
        ``fabric``: the fabric to join (default ``$ZMQFABRIC_FABRIC`` or ``default``); nodes of
        different fabrics never see, list or connect to each other. ``metrics_port``: serve
        Prometheus metrics at ``http://<scope address>:PORT/metrics`` (0: any free port; see
        :mod:`zmqfabric.metrics` and ``metrics_url``)."""
        name = validate_node_name(name)
        if config is None:
            config = NodeConfig(scope=scope if scope is not None else Scope.from_env(),
                                fabric=fabric_from_env() if fabric is None else fabric)
        elif scope is not None:
            raise LocalProtocolError("pass either scope= or config=, not both")
        elif fabric is not None:
            config = dataclasses.replace(config, fabric=fabric)
        if keys is not None:
            if config.keys is not None:
                raise LocalProtocolError("pass keys= or config.keys, not both")
            loaded = keys if isinstance(keys, KeySet) else load_keys(keys)
            config = dataclasses.replace(config, keys=loaded)
        self.config = config
        #: What the node's parts see of it (patterns, tasks, control, devices).
        self.runtime = rt = NodeRuntime(name, config, advertised=advertise, asyncio=self._ASYNC)
        #: Discovery, membership, housekeeping, control, guard: opened and closed in order.
        self._parts = NodeParts(rt, on_conflict)
        self._lock = threading.RLock()
        #: Request/reply services (``@node.reply``).
        self._services = NodeServices(rt)
        #: What a handler raised that is not an Exception (SystemExit...): run() closes the
        #: node and raises it. Set once, by the serve loop's thread (or the loop).
        self._fatal: BaseException | None = None
        #: Reliable tasks (``tasks=TaskConfig(...)``: journal, dead letters, defaults).
        self._tasks = NodeTasks(rt, tasks if tasks is not None else TaskConfig())
        rt.add_stats_source("tasks", self._tasks.stats)
        self._metrics_port: int | None = None
        if metrics_port is not None:
            self.serve_metrics(metrics_port)

    # --- identity --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """This node's name (with a suffix if it was taken and ``on_conflict="suffix"``)."""
        return self.runtime.name

    @property
    def node_id(self) -> str:
        return self.runtime.node_id

    @property
    def advertised(self) -> bool:
        return self.runtime.advertised

    @property
    def counters(self) -> Counters:
        return self.runtime.counters

    @property
    def directory(self) -> Directory:
        return self.runtime.directory

    @property
    def record(self) -> NodeRecord:
        """This node's discovery record as advertised now."""
        return self.runtime.record

    # --- metrics ---------------------------------------------------------------------------

    def serve_metrics(self, port: int) -> None:
        """Serve Prometheus metrics on ``port`` of the scope's address from start() on (as
        ``metrics_port=``). Call before start(). Raises LocalProtocolError for a bad port or a
        started node; start() raises FabricError if the port cannot be bound."""
        if type(port) is not int or not 0 <= port <= 65535:
            raise LocalProtocolError(f"metrics port {port!r} is not a port number")
        with self._lock:
            if self.runtime.state is not NodeState.NEW:
                raise LocalProtocolError("serve_metrics() before the node starts")
            rt = self.runtime
            if rt.metrics is None:
                from .metrics import NodeMetrics  # prometheus_client only for nodes that use it

                rt.metrics = NodeMetrics(rt, peers=rt.directory.records,
                                         refused_peers=self.refused_peers)
                rt.add_stats_source("traffic", rt.metrics.endpoint_stats)
            self._metrics_port = port

    @property
    def metrics_url(self) -> str | None:
        """``http://ADDRESS:PORT/metrics`` while the node serves metrics, else None."""
        metrics = self.runtime.metrics
        return None if metrics is None else metrics.url

    # --- definition ------------------------------------------------------------------------

    def reply(
        self, service: str, *, allow: Iterable[str] | None = None, concurrency: int = 1
    ) -> Callable[[F], F]:
        """Decorator: serve request/reply ``service`` with the decorated ``handler(body) -> reply``.

        Register before ``start()``; ``run()`` serves it. Every service (and task queue, and the
        control endpoint) is served apart from the others, so a slow handler delays only its
        own service. ``concurrency``: how many requests the handler takes at once (threads for
        plain functions, tasks of the loop for coroutine functions on an asyncio node); with
        the default 1 they are answered one at a time, in order. A handler that raises sends an
        error reply (the caller gets :class:`RemoteError`) and is logged here at ERROR with its
        traceback; one that raises SystemExit or KeyboardInterrupt makes ``run()`` close the
        node and raise it. ``allow`` (secured nodes): only these public keys may call this
        service. Raises LocalProtocolError (twice, after start, bad concurrency, a coroutine
        function on a sync node).
        """
        register = self._services.register(service, allow, concurrency)

        def checked(handler: F) -> F:
            self._check_handler(handler, f"service {service!r}")
            return register(handler)

        return checked

    def task(
        self,
        name: str,
        *,
        prefetch: int | None = None,
        allow: Iterable[str] | None = None,
        concurrency: int = 1,
    ) -> Callable[[F], F]:
        """Decorator: work on reliable task ``name`` with the decorated ``handler(body)``.

        Register before ``start()``; ``run()`` serves it, apart from the node's other endpoints.
        ``concurrency``: how many tasks run at once (threads, or tasks of the loop for
        coroutine functions on an asyncio node), started in the order received. Returning
        acknowledges the task (the value goes back to the submitter); raising an Exception
        fails this attempt (logged here; it is retried with backoff, then dead-lettered);
        raising SystemExit or KeyboardInterrupt acknowledges nothing and makes ``run()`` close
        the node (the task goes to another worker) and raise it. ``prefetch``: how many tasks
        each producer may have here at once (default ``TaskConfig.prefetch``, and at least
        ``concurrency``). ``allow`` (secured nodes): only these public keys may submit here.
        Delivery is at least once: :func:`zmqfabric.current_task` gives the task's id and
        idempotency key. Raises LocalProtocolError as :meth:`reply` does.
        """
        register = self._tasks.register(name, prefetch, allow, check_concurrency(concurrency))

        def checked(handler: F) -> F:
            self._check_handler(handler, f"task {name!r}")
            return register(handler)

        return checked

    def _check_handler(self, handler: object, what: str) -> None:
        if not callable(handler):
            raise LocalProtocolError(f"{what}: the handler must be callable")
        if not self._ASYNC and is_coroutine_handler(handler):  # type: ignore[arg-type]
            raise LocalProtocolError(f"{what}: zmqfabric.Node calls plain functions; serve a "
                                     "coroutine function from a zmqfabric.aio.Node")

    def task_stats(self) -> dict[str, Any]:
        """This node's task counters, as in its control ``stats`` answer under ``"tasks"``:
        ``{"submit": {name: {queued, in_flight, done, retried, redelivered, dead, late,
        workers}}, "serve": {name: {handled, failed, prefetch, undeliverable, slots, busy,
        hung}}}``. ``hung``: slots busy on one task for longer than ``TaskConfig.deadline_s``.
        Thread-safe."""
        return self._tasks.stats()

    def service_stats(self) -> dict[str, dict[str, int]]:
        """This node's services, as in its control ``stats`` answer under ``"services"``:
        ``{name: {handled, failed, slots, busy, hung}}``; ``hung``: slots busy on one request
        for longer than the request timeout. Thread-safe."""
        return self._services.stats()

    # --- lifetime --------------------------------------------------------------------------

    @property
    def state(self) -> NodeState:
        return self.runtime.state

    def _open(self) -> None:
        rt = self.runtime
        with self._lock:
            if rt.state is NodeState.CLOSED:
                raise ClosedError(f"node {self.name!r} is closed; make a new Node")
            if rt.state is NodeState.STARTED:
                return
        try:
            self._parts.open(self._open_endpoints, self._metrics_port)
        except BaseException:
            self._close()
            raise
        log.info("node %s started at %s (id %s)", self.name, self.config.scope.address,
                 self.node_id)

    def _open_endpoints(self) -> None:
        """Services, then task queues (``start()``, between making and starting the threads)."""
        self._open_services()
        self._tasks.open()

    def _open_services(self) -> None:
        """Bind the services' endpoints (the sync shell first opens the inbox of ``run()``)."""
        self._services.open()

    # --- serving (the shells' run()) ---------------------------------------------------------

    def _served(self) -> list[Served]:
        """Every endpoint whose handler ``run()`` calls: services, then task queues."""
        return [*self._services.endpoints(), *self._tasks.endpoints()]

    def _watch_slots(self, now: float) -> None:
        """Log hung handler slots (the thread of ``run()``, or the loop)."""
        for ep in self._served():
            ep.slots.watch(ep, now)

    def _set_fatal(self, exc: BaseException) -> None:
        """A handler raised ``exc`` (not an Exception): ``run()`` stops, closes the node and
        raises it. The first one wins. Call from the thread of ``run()`` (or the loop)."""
        if self._fatal is None:
            self._fatal = exc

    def _close(self) -> None:
        if self._begin_close():
            try:
                self._close_discovery()
            finally:
                self._close_local()

    def _begin_close(self) -> bool:
        """Mark the node closed; False if it already was."""
        with self._lock:
            if self.runtime.state is NodeState.CLOSED:
                return False
            self.runtime.state = NodeState.CLOSED
        self._parts.stop_listening()
        return True

    def _close_discovery(self) -> None:
        """Goodbye first, so peers stop sending to us (and liveness says "left" and stops
        probing, so that nobody takes us back). Blocks ~250 ms; thread-safe."""
        self._parts.leave()

    def _close_local(self) -> None:
        """Close the control and housekeeping threads, every handle and the context (in the
        sockets' owner)."""
        self._close_threads()
        self._close_handles()
        self._close_context()

    def _close_threads(self) -> None:
        """Stop and join the node's threads (blocks up to THREAD_JOIN_TIMEOUT_S each)."""
        self._tasks.close()  # the dispatcher thread first: it owns sockets and a publisher
        self._parts.stop_threads()

    def _close_handles(self) -> None:
        """Close every handle (in the thread or loop that owns them; never blocks)."""
        self.runtime.close_all()
        self.runtime.directory.clear()

    def _close_context(self) -> None:
        """Stop the ZAP thread and terminate the context (blocks up to the linger time)."""
        self._parts.close_context()
        log.info("node %s closed", self.name)

    def _check_started(self) -> None:
        self.runtime.check_started()

    def refused_peers(self) -> list[tuple[NodeRecord, str]]:
        """Nodes seen but refused for security reasons, with the reason. Thread-safe."""
        return self._parts.discovery.refused()

    # --- directory -------------------------------------------------------------------------

    def nodes(self) -> list[NodeRecord]:
        """Every node this node knows, itself included, sorted by name. Thread-safe."""
        return self.directory.records()

    # The plans of the shells' ``wait_for_node`` and ``wait_for_endpoint`` (blocking in
    # node.py, coroutines in aio.py; see patterns/plan.py).

    def _wait_for_node(self, name: str, timeout: float | None) -> Plan[NodeRecord]:
        return find_node(self.runtime, name, timeout)

    def _wait_for_endpoint(
        self, kind: EndpointKind | str, name: str, timeout: float | None
    ) -> Plan[int]:
        kind = EndpointKind(kind)
        directory = self.directory
        yield WAIT_DIRECTORY, (
            directory, lambda: bool(directory.providers(kind, name)), deadline_after(timeout)
        )
        count = len(directory.providers(kind, name))
        if not count:
            raise NoProviderError(kind.noun, name, timeout)
        return count

    def _control_sync(self, target: str, op: str, timeout: float) -> Any:
        self._check_started()
        return control_call(self.runtime, target, op, timeout)

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__} {self.name!r} {self.state.value}>"
