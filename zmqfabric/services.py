"""A node's request/reply services: registered before start, opened at start, served by ``run()``.

The services' counterpart of :class:`zmqfabric.tasks.registry.NodeTasks`. ``@node.reply(...)``
registers a handler here (:meth:`NodeServices.register`); ``start()`` opens one
:class:`~zmqfabric.patterns.service.ServiceEndpoint` per service (:meth:`NodeServices.open`), each
handler timed and counted when the node serves metrics; the shells' ``run()`` serves
:meth:`NodeServices.endpoints`. The node's ``stats`` answer lists them under ``"services"``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, TypeVar

from .core.records import validate_endpoint_name
from .errors import LocalProtocolError
from .patterns.handlers import check_concurrency
from .patterns.service import ServiceEndpoint
from .runtime import NodeRuntime, NodeState

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["NodeServices"]


class NodeServices:
    """The reply services of one node. ``register`` and ``stats`` are thread-safe; ``open``
    belongs to the thread that starts the node."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        #: name -> (handler, allow, concurrency), until open() makes the endpoints
        self._handlers: dict[str, tuple[Callable[[Any], Any], tuple[str, ...] | None, int]] = {}
        self._endpoints: dict[str, ServiceEndpoint] = {}

    def register(
        self, service: str, allow: Iterable[str] | None, concurrency: int
    ) -> Callable[[F], F]:
        """A decorator that registers its handler as ``service`` (see
        :meth:`zmqfabric.Node.reply`). Raises LocalProtocolError for a bad name or concurrency
        at once, and from the decorator for a name registered twice or a started node."""
        validate_endpoint_name(service, "service")
        check_concurrency(concurrency)
        allowed = None if allow is None else tuple(allow)

        def register(handler: F) -> F:
            with self._lock:
                if service in self._handlers:
                    raise LocalProtocolError(
                        f"node {self._runtime.name!r} already serves {service!r}")
                if self._runtime.state is not NodeState.NEW:
                    raise LocalProtocolError("register services before the node starts")
                self._handlers[service] = (handler, allowed, concurrency)
            return handler

        return register

    def open(self) -> None:
        """Bind one endpoint per registered service (raises what binding raises) and add the
        ``services`` section to the node's stats."""
        rt = self._runtime
        metrics = rt.metrics
        for service, (handler, allow, concurrency) in self._handlers.items():
            if metrics is not None:
                handler = metrics.timed_handler(service, handler)
            self._endpoints[service] = ServiceEndpoint(rt, service, handler, allow, concurrency)
        if self._endpoints:
            rt.add_stats_source("services", self.stats)

    def endpoints(self) -> list[ServiceEndpoint]:
        """The open services, in the order registered."""
        return list(self._endpoints.values())

    def stats(self) -> dict[str, dict[str, int]]:
        """``{name: {handled, failed, slots, busy, hung}}``. Thread-safe."""
        return {name: svc.stats() for name, svc in list(self._endpoints.items())}
