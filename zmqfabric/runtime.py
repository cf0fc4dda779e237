"""The node runtime: what a node's parts may use of their node, and nothing more.

Patterns, tasks, the control endpoint, membership, liveness and devices receive a
:class:`NodeRuntime`, never the node. It holds what they share: identity, configuration, the
socket factory, the directory, counters, the endpoint table (from which the node's record is made),
the set of open handles and the extra sections of the ``stats`` answer. Only the node shells
(``node.py``, ``aio.py`` over ``nodebase.py``) see the node itself.

Thread-safe: parts call it from their owner threads, discovery's thread and the user's.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import secrets
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from .config import NodeConfig
from .core.records import Endpoint, EndpointKind, NodeRecord, validate_node_name
from .discovery.directory import Directory
from .errors import ClosedError, LocalProtocolError
from .security.guard import Guard
from .security.keys import is_public_key
from .stats import Counters
from .transport.sockets import ZAP_DOMAIN, SocketFactory

if TYPE_CHECKING:
    from .metrics import NodeMetrics

log = logging.getLogger(__name__)


class NodeState(enum.Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


#: Read on every call of the API (check_started): a module global, not an attribute of the enum
#: class (on Python 3.11 that goes through EnumType.__getattr__, ~900 instructions).
_STARTED = NodeState.STARTED


class Closeable(Protocol):
    """Anything the node closes when it closes: endpoint handles, devices."""

    def close(self) -> None: ...


class NodeRuntime:
    """Identity, sockets, directory, counters and endpoints of one node. Thread-safe.

    ``name`` may change once, while the node claims it (``rename``); ``node_id`` never does.
    """

    def __init__(self, name: str, config: NodeConfig, *, advertised: bool, asyncio: bool) -> None:
        self.name = name
        self.node_id = secrets.token_hex(8)
        self.config = config
        self.advertised = advertised
        self.counters = Counters()
        self.directory = Directory(name)
        self.sockets = SocketFactory(config, asyncio=asyncio, counters=self.counters)
        self.state = NodeState.NEW
        #: Monotonic time of start() (the control endpoint reports uptime).
        self.started_at = 0.0
        #: Set by the node while secured: restricts ZAP domains to per-endpoint allow-lists.
        self.guard: Guard | None = None
        #: Peers refused for security reasons, with the reason (set by the node: discovery's).
        self.refusals: Callable[[], list[tuple[NodeRecord, str]]] = list
        #: Whether a hint claiming a node name is being verified (set by the node: discovery's).
        self.verifying: Callable[[str], bool] = _never
        #: Called with the new record when an endpoint is added or removed after start.
        self.on_record_change: Callable[[NodeRecord], None] | None = None
        #: The node's metrics (``metrics_port=``), or None: then no part pays for them.
        self.metrics: NodeMetrics | None = None
        self._lock = threading.RLock()
        self._endpoints: dict[tuple[EndpointKind, str], Endpoint] = {}
        self._seq = 0
        self._open: set[Closeable] = set()
        self._stats_sources: dict[str, Callable[[], Any]] = {}

    # --- identity --------------------------------------------------------------------------

    def rename(self, name: str) -> None:
        """Take another name (``on_conflict="suffix"`` while the name is claimed)."""
        self.name = validate_node_name(name)

    @property
    def started(self) -> bool:
        return self.state is _STARTED

    def check_started(self) -> None:
        """Raises ClosedError unless the node is started."""
        if self.state is not _STARTED:
            raise ClosedError(
                f"node {self.name!r} is {self.state.value}: use it inside `with` or after start()"
            )

    @property
    def record(self) -> NodeRecord:
        """This node's discovery record as advertised now."""
        with self._lock:
            endpoints = tuple(sorted(self._endpoints.values()))
            seq = self._seq
        return NodeRecord(
            self.name,
            self.node_id,
            host_name(),
            os.getpid(),
            self.config.scope.address,
            endpoints,
            seq,
            self.config.keys.public if self.config.keys else None,
            self.config.fabric,
        )

    def refusal_of(self, name: str) -> str | None:
        """Why node ``name`` was seen but refused (the latest reason), or None."""
        reasons = [reason for record, reason in self.refusals() if record.name == name]
        return reasons[-1] if reasons else None

    # --- what the node closes --------------------------------------------------------------

    def track(self, item: Closeable) -> None:
        """Close ``item`` with the node; with metrics on, its traffic is counted from now."""
        if self.metrics is not None:
            self.metrics.instrument(item)
        with self._lock:
            self._open.add(item)

    def untrack(self, item: Closeable) -> None:
        with self._lock:
            self._open.discard(item)

    def close_all(self) -> None:
        """Close every tracked handle and device (the node, at close)."""
        with self._lock:
            items = list(self._open)
        for item in items:
            item.close()

    # --- endpoints -------------------------------------------------------------------------

    def add_endpoint(self, kind: EndpointKind, name: str, port: int) -> None:
        """List an endpoint in this node's record (re-advertised if the node runs).
        Raises LocalProtocolError for a duplicate or on a node that does not advertise."""
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
        self._changed()

    def remove_endpoint(self, kind: EndpointKind, name: str) -> None:
        with self._lock:
            if self._endpoints.pop((kind, name), None) is None:
                return
            self._seq += 1
        self._changed()

    def _changed(self) -> None:
        notify = self.on_record_change
        if notify is not None and self.started and self.advertised:
            notify(self.record)

    def zap_domain(self, kind: EndpointKind, name: str, allow: Iterable[str] | None) -> str:
        """The ZAP domain for a bound endpoint; ``allow`` restricts it to those public keys.
        Raises LocalProtocolError for a bad key or ``allow`` without keys."""
        if allow is None:
            return ZAP_DOMAIN
        keys = list(allow)
        bad = [k for k in keys if not is_public_key(k)]
        if bad:
            raise LocalProtocolError(f"allow= takes Z85 public keys; {bad[0]!r} is not one")
        if self.guard is None:
            raise LocalProtocolError(f"allow= on {kind.noun} {name!r} needs a node with keys")
        return self.guard.restrict(kind.value, name, keys)

    def connect(self, sock: Any, url: str) -> None:
        """Connect a socket to a peer endpoint found in the directory (with its CURVE key)."""
        self.sockets.connect(sock, url, self.directory.key_for(url))

    def server_names(self, urls: Iterable[str]) -> list[str]:
        """Node names (or the URLs themselves) of endpoint URLs, for error messages."""
        names = []
        for url in urls:
            owner = next((r.name for r in self.directory.records()
                          if any(r.url(ep) == url for ep in r.endpoints)), url)
            names.append(owner)
        return sorted(names)

    # --- stats -----------------------------------------------------------------------------

    def add_stats_source(self, key: str, source: Callable[[], Any]) -> None:
        """Add section ``key`` to this node's ``stats`` answer (devices, tasks)."""
        with self._lock:
            self._stats_sources[key] = source

    def remove_stats_source(self, key: str) -> None:
        with self._lock:
            self._stats_sources.pop(key, None)

    def stats_sections(self) -> dict[str, Any]:
        """Every extra section, each read now; a failing source reports its error."""
        with self._lock:
            sources = list(self._stats_sources.items())
        out: dict[str, Any] = {}
        for key, source in sources:
            try:
                out[key] = source()
            except Exception as exc:  # one broken source must not hide the rest
                out[key] = {"error": str(exc)}
        return out


def _never(name: str) -> bool:
    return False


_HOST_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def host_name() -> str:
    """This host's name, made safe for a DNS-SD record."""
    host = _HOST_BAD.sub("-", socket.gethostname()).lstrip("-._") or "localhost"
    return host[:200]
