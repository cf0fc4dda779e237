"""What a sync :class:`zmqfabric.Node` and an asyncio :class:`zmqfabric.aio.Node` share: identity,
configuration, the directory, discovery, the control endpoint, the endpoint table and lifetimes.

Constructors only allocate. ``start()`` (or ``with``) opens sockets, discovery and the control
thread; ``close()`` sends the discovery goodbye first, then closes every handle, then the context.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from .config import NodeConfig, Scope, fabric_from_env
from .control import ControlServer, control_call
from .core.records import EndpointKind, NodeRecord, validate_endpoint_name, validate_node_name
from .discovery.directory import Directory
from .discovery.housekeeping import Housekeeping
from .discovery.mdns import Discovery
from .discovery.membership import Membership
from .errors import ClosedError, LocalProtocolError, NodeNotFoundError, NoProviderError
from .runtime import NodeRuntime, NodeState
from .security.guard import Guard
from .security.keys import KeySet
from .security.keys import load as load_keys
from .stats import Counters, RateLimitedLog
from .tasks.registry import NodeTasks, TaskConfig

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
    ) -> None:
        """``advertise=False`` makes an observer: it browses and calls others but is not listed
        and cannot offer endpoints (the CLI's ``ls``, ``req``, ``sub``, ``push`` use this).
        ``fabric``: the fabric to join (default ``$ZMQFABRIC_FABRIC`` or ``default``); nodes of
        different fabrics never see, list or connect to each other."""
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
        self._discovery = Discovery(config, rt.directory, rt.counters, self._on_name_conflict)
        self._membership = Membership(rt, self._discovery, on_conflict)
        rt.on_record_change = self._discovery.advertise
        self._lock = threading.RLock()
        self._handlers: dict[str, Callable[[Any], Any]] = {}
        self._service_allow: dict[str, tuple[str, ...]] = {}
        self._opening = False
        self._started_at = 0.0
        self._control: ControlServer | None = None
        self._housekeeping: Housekeeping | None = None
        self._unlisten: Callable[[], None] | None = None
        #: Reliable tasks (``tasks=TaskConfig(...)``: journal, dead letters, defaults).
        self._tasks = NodeTasks(rt, tasks if tasks is not None else TaskConfig())
        rt.add_stats_source("tasks", self._tasks.stats)

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

    # --- definition ------------------------------------------------------------------------

    def reply(self, service: str, *, allow: Iterable[str] | None = None) -> Callable[[F], F]:
        """Decorator: serve request/reply ``service`` with the decorated ``handler(body) -> reply``.

        Register before ``start()``; the node's serve loop (``run()``) calls the handler. A handler
        that raises sends an error reply; the caller gets :class:`RemoteError`. ``allow``
        (secured nodes): only these public keys may call this service.
        """
        validate_endpoint_name(service, "service")
        if allow is not None:
            self._service_allow[service] = tuple(allow)

        def register(handler: F) -> F:
            with self._lock:
                if service in self._handlers:
                    raise LocalProtocolError(f"node {self.name!r} already serves {service!r}")
                if self.runtime.state is not NodeState.NEW:
                    raise LocalProtocolError("register services before the node starts")
                self._handlers[service] = handler
            return handler

        return register

    def task(
        self, name: str, *, prefetch: int | None = None, allow: Iterable[str] | None = None
    ) -> Callable[[F], F]:
        """Decorator: work on reliable task ``name`` with the decorated ``handler(body)``.

        Register before ``start()``; the serve loop (``run()``) runs the handler, one task at a
        time. Returning acknowledges the task (the value goes back to the submitter); raising
        fails this attempt (it is retried with backoff, then dead-lettered). ``prefetch``: how
        many tasks each producer may have here at once (default ``TaskConfig.prefetch``).
        ``allow`` (secured nodes): only these public keys may submit here. Delivery is at least
        once: :func:`zmqfabric.current_task` gives the task's id and idempotency key.
        """
        return self._tasks.register(name, prefetch, allow)

    def task_stats(self) -> dict[str, Any]:
        """This node's task counters, as in its control ``stats`` answer under ``"tasks"``:
        ``{"submit": {name: {queued, in_flight, done, retried, redelivered, dead, late,
        workers}}, "serve": {name: {handled, failed, prefetch, undeliverable}}}``. Thread-safe."""
        return self._tasks.stats()

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
            self._opening = True
        try:
            if self.config.keys is not None:
                rt.guard = Guard(rt.sockets.context, self.config.keys, rt.counters, self.name)
                rt.guard.start()
            elif not self.config.scope.is_local:
                log.warning("node %s is on %s without keys: its traffic is unauthenticated and "
                            "unencrypted; give it keys (--keys DIR) on a shared network",
                            self.name, self.config.scope.interface,
                            extra={"zf_event": "unsecured_lan"})
            self._discovery.start()
            self._housekeeping = Housekeeping(rt, self._discovery)
            self._control = ControlServer(
                rt, self._membership.accept_hello, self._housekeeping.accept_peers,
                self._housekeeping.answer_probe,
            )
            self._membership.attach(self._housekeeping)
            self._open_services()
            self._tasks.open()
            rt.started_at = time.monotonic()
            rt.state = NodeState.STARTED
            self._opening = False
            self._housekeeping.start()
            self._control.start()
            self._unlisten = self.directory.listen(self._membership.on_directory_event)
            self._discovery.browse()
            if self.advertised:
                self._membership.claim_name()
            else:
                self.directory.put(self.record)
        except BaseException:
            self._opening = False
            self._close()
            raise
        log.info("node %s started at %s (id %s)", self.name, self.config.scope.address,
                 self.node_id)

    def _open_services(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

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
        if self._unlisten is not None:
            self._unlisten()
        return True

    def _close_discovery(self) -> None:
        """Goodbye first, so peers stop sending to us (and liveness says "left" and stops
        probing, so that nobody takes us back). Blocks ~250 ms; thread-safe."""
        if self._housekeeping is not None:
            self._housekeeping.leave()
        self._discovery.close()

    def _close_local(self) -> None:
        """Close the control and housekeeping threads, every handle and the context (in the
        sockets' owner)."""
        rt = self.runtime
        self._tasks.close()  # the dispatcher thread first: it owns sockets and a publisher
        if self._control is not None:
            self._control.stop()
        if self._housekeeping is not None:
            self._housekeeping.stop()
        rt.close_all()
        rt.directory.clear()
        if rt.guard is not None:
            rt.guard.stop()
        rt.sockets.close()
        log.info("node %s closed", self.name)

    def _check_started(self) -> None:
        self.runtime.check_started()

    def refused_peers(self) -> list[tuple[NodeRecord, str]]:
        """Nodes seen but refused for security reasons, with the reason. Thread-safe."""
        return self._discovery.refused()

    def _on_name_conflict(self, other: NodeRecord) -> None:
        self._membership.on_name_conflict(other)

    # --- directory -------------------------------------------------------------------------

    def nodes(self) -> list[NodeRecord]:
        """Every node this node knows, itself included, sorted by name. Thread-safe."""
        return self.directory.records()

    def wait_for_node(self, name: str, timeout: float) -> NodeRecord:
        """Wait until node ``name`` is known. Raises NodeNotFoundError. Thread-safe."""
        if not self.directory.wait_for(lambda: self.directory.get(name) is not None, timeout):
            raise NodeNotFoundError(name, timeout)
        record = self.directory.get(name)
        if record is None:
            raise NodeNotFoundError(name, timeout)
        return record

    def wait_for_endpoint(self, kind: EndpointKind | str, name: str, timeout: float) -> int:
        """Wait until ``kind`` endpoint ``name`` has a provider; returns how many. Raises
        NoProviderError. Thread-safe."""
        kind = EndpointKind(kind)
        found = self.directory.wait_for(lambda: bool(self.directory.providers(kind, name)), timeout)
        if not found:
            raise NoProviderError(kind.noun, name, timeout)
        return len(self.directory.providers(kind, name))

    def _control_sync(self, target: str, op: str, timeout: float) -> Any:
        self._check_started()
        return control_call(self.runtime, target, op, timeout)

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__} {self.name!r} {self.state.value}>"
