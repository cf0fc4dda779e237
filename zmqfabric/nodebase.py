"""What a sync :class:`zmqfabric.Node` and an asyncio :class:`zmqfabric.aio.Node` share: identity,
configuration, the directory, discovery, the control endpoint, the endpoint table and lifetimes.

Constructors only allocate. ``start()`` (or ``with``) opens sockets, discovery and the control
thread; ``close()`` sends the discovery goodbye first, then closes every handle, then the context.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
import secrets
import socket
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from .config import NodeConfig, Scope
from .control import ControlServer, control_call
from .core.records import (
    Endpoint,
    EndpointKind,
    NodeRecord,
    validate_endpoint_name,
    validate_node_name,
)
from .discovery.directory import Directory
from .discovery.mdns import Discovery
from .discovery.membership import Membership
from .errors import (
    ClosedError,
    LocalProtocolError,
    NodeNotFoundError,
    NoProviderError,
)
from .patterns.base import Handle
from .security.guard import Guard
from .security.keys import KeySet, is_public_key
from .security.keys import load as load_keys
from .stats import Counters, RateLimitedLog
from .tasks.registry import NodeTasks, TaskConfig
from .transport.sockets import ZAP_DOMAIN, SocketFactory

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)
F = TypeVar("F", bound=Callable[..., Any])


class NodeState(enum.Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


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
    ) -> None:
        """``advertise=False`` makes an observer: it browses and calls others but is not listed
        and cannot offer endpoints (the CLI's ``ls``, ``req``, ``sub``, ``push`` use this)."""
        self.name = validate_node_name(name)
        self.advertised = advertise
        self._membership = Membership(self, on_conflict)
        if config is None:
            config = NodeConfig(scope=scope if scope is not None else Scope.from_env())
        elif scope is not None:
            raise LocalProtocolError("pass either scope= or config=, not both")
        if keys is not None:
            if config.keys is not None:
                raise LocalProtocolError("pass keys= or config.keys, not both")
            loaded = keys if isinstance(keys, KeySet) else load_keys(keys)
            config = dataclasses.replace(config, keys=loaded)
        self.config = config
        self.node_id = secrets.token_hex(8)
        self._guard: Guard | None = None
        self.counters = Counters()
        self.directory = Directory(self.name)
        self._sockets = SocketFactory(config, asyncio=self._ASYNC)
        self._discovery = Discovery(
            config, self.directory, self.counters, self._membership.on_name_conflict
        )
        self._lock = threading.RLock()
        self._endpoints: dict[tuple[EndpointKind, str], Endpoint] = {}
        self._seq = 0
        self._handles: set[Handle] = set()
        self._handlers: dict[str, Callable[[Any], Any]] = {}
        self._service_allow: dict[str, tuple[str, ...]] = {}
        self._state = NodeState.NEW
        self._opening = False
        self._started_at = 0.0
        self._control: ControlServer | None = None
        self._unlisten: Callable[[], None] | None = None
        #: Extra sections of the control "stats" answer (devices, task pipelines), by name.
        self._stats_sources: dict[str, Callable[[], Any]] = {}
        #: Reliable tasks (``tasks=TaskConfig(...)``: journal, dead letters, defaults).
        self._tasks = NodeTasks(self, tasks if tasks is not None else TaskConfig())
        self._stats_sources["tasks"] = self._tasks.stats

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
                if self._state is not NodeState.NEW:
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
        return self._state

    def _open(self) -> None:
        with self._lock:
            if self._state is NodeState.CLOSED:
                raise ClosedError(f"node {self.name!r} is closed; make a new Node")
            if self._state is NodeState.STARTED:
                return
            self._opening = True
        try:
            if self.config.keys is not None:
                self._guard = Guard(self._sockets.context, self.config.keys, self.counters,
                                    self.name)
                self._guard.start()
            elif not self.config.scope.is_local:
                log.warning("node %s is on %s without keys: its traffic is unauthenticated and "
                            "unencrypted; give it keys (--keys DIR) on a shared network",
                            self.name, self.config.scope.interface)
            self._discovery.start()
            self._control = ControlServer(self)
            self._open_services()
            self._tasks.open()
            self._started_at = time.monotonic()
            self._state = NodeState.STARTED
            self._opening = False
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
        log.info("node %s started at %s (id %s)", self.name, self.config.scope.address, self.node_id)

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
            if self._state is NodeState.CLOSED:
                return False
            self._state = NodeState.CLOSED
        if self._unlisten is not None:
            self._unlisten()
        return True

    def _close_discovery(self) -> None:
        """Goodbye first, so peers stop sending to us. Blocks ~250 ms; thread-safe."""
        self._discovery.close()

    def _close_local(self) -> None:
        """Close the control thread, every handle and the context (in the sockets' owner)."""
        self._tasks.close()  # the dispatcher thread first: it owns sockets and a publisher
        if self._control is not None:
            self._control.stop()
        for handle in list(self._handles):
            handle.close()
        self.directory.clear()
        if self._guard is not None:
            self._guard.stop()
        self._sockets.close()
        log.info("node %s closed", self.name)

    def _check_started(self) -> None:
        if self._state is not NodeState.STARTED:
            raise ClosedError(
                f"node {self.name!r} is {self._state.value}: use it inside `with` or after start()"
            )

    # --- endpoints -------------------------------------------------------------------------

    def _track(self, handle: Handle) -> None:
        with self._lock:
            self._handles.add(handle)

    def _untrack(self, handle: Handle) -> None:
        with self._lock:
            self._handles.discard(handle)

    def _add_endpoint(self, kind: EndpointKind, name: str, port: int) -> None:
        if not self.advertised and kind is not EndpointKind.CONTROL:
            raise LocalProtocolError(
                f"node {self.name!r} does not advertise itself, so nobody could find its "
                f"{kind.noun} {name!r}: make it with advertise=True"
            )
        with self._lock:
            key = (kind, name)
            if key in self._endpoints:
                raise LocalProtocolError(f"node {self.name!r} already offers {kind.noun} {name!r}")
            self._endpoints[key] = Endpoint(kind, name, port)
            self._seq += 1
            advertise = self._state is NodeState.STARTED and self.advertised
        if advertise:
            self._discovery.advertise(self.record)

    def _remove_endpoint(self, kind: EndpointKind, name: str) -> None:
        with self._lock:
            if self._endpoints.pop((kind, name), None) is None:
                return
            self._seq += 1
            advertise = self._state is NodeState.STARTED and self.advertised
        if advertise:
            self._discovery.advertise(self.record)

    @property
    def record(self) -> NodeRecord:
        """This node's discovery record as advertised now."""
        with self._lock:
            endpoints = tuple(sorted(self._endpoints.values()))
            seq = self._seq
        return NodeRecord(
            self.name,
            self.node_id,
            _host_name(),
            os.getpid(),
            self.config.scope.address,
            endpoints,
            seq,
            self.config.keys.public if self.config.keys else None,
        )

    def _connect(self, sock: Any, url: str) -> None:
        """Connect a socket to a peer endpoint found in the directory (with its CURVE key)."""
        self._sockets.connect(sock, url, self.directory.key_for(url))

    def refused_peers(self) -> list[tuple[NodeRecord, str]]:
        """Nodes seen but refused for security reasons, with the reason. Thread-safe."""
        return self._discovery.refused()

    def _server_names(self, urls: Iterable[str]) -> list[str]:
        """Node names (or the URLs themselves) of endpoint URLs, for error messages."""
        names = []
        for url in urls:
            owner = next((r.name for r in self.directory.records()
                          if any(r.url(ep) == url for ep in r.endpoints)), url)
            names.append(owner)
        return sorted(names)

    def _zap_domain(self, kind: EndpointKind, name: str, allow: Iterable[str] | None) -> str:
        """The ZAP domain for a bound endpoint; ``allow`` restricts it to those public keys."""
        if allow is None:
            return ZAP_DOMAIN
        keys = list(allow)
        bad = [k for k in keys if not is_public_key(k)]
        if bad:
            raise LocalProtocolError(f"allow= takes Z85 public keys; {bad[0]!r} is not one")
        if self._guard is None:
            raise LocalProtocolError(f"allow= on {kind.noun} {name!r} needs a node with keys")
        return self._guard.restrict(kind.value, name, keys)

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
        return control_call(self, target, op, timeout)

    def _control_answer(self, op: str) -> Any:
        """Answer a control op (runs in the control thread: reads only thread-safe state)."""
        base: dict[str, Any] = {
            "node": self.name,
            "id": self.node_id,
            "host": _host_name(),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }
        if op == "ping":
            return base
        record = self.record
        base["address"] = record.address
        base["endpoints"] = [
            {"kind": ep.kind.value, "name": ep.name, "port": ep.port} for ep in record.endpoints
        ]
        if op == "info":
            base["peers"] = [r.name for r in self.directory.records()]
            return base
        base["counters"] = self.counters.snapshot()
        for key, source in list(self._stats_sources.items()):
            try:
                base[key] = source()
            except Exception as exc:  # one broken source must not hide the rest
                base[key] = {"error": str(exc)}
        return base

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__} {self.name!r} {self._state.value}>"


_HOST_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def _host_name() -> str:
    host = _HOST_BAD.sub("-", socket.gethostname()).lstrip("-._") or "localhost"
    return host[:200]
