"""The only place that creates ZeroMQ sockets and sets their options, and the only place that
translates ``zmq.ZMQError`` into the fabric's errors."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import resource
import time
from typing import Iterator

import zmq
import zmq.asyncio

from .. import constants as C
from ..config import NodeConfig
from ..errors import ClosedError, FabricError, LocalProtocolError
from ..stats import Counters
from .upstream import UpstreamWatch, watched_events

log = logging.getLogger(__name__)

#: The ZAP domain of every secured endpoint without an allow-list of its own.
ZAP_DOMAIN = "zmqfabric"
#: Socket types that connect to peers found by discovery and should only queue to live peers.
_IMMEDIATE = frozenset({zmq.DEALER, zmq.PUSH})


class SocketFactory:
    """Owns one ZeroMQ context for one node; makes sockets with the node's options.

    Not thread-safe: call from the thread that owns the node (socket creation is rare).
    ``close()`` terminates the context; every socket must be closed first (the node does so).
    """

    def __init__(self, config: NodeConfig, *, asyncio: bool = False,
                 counters: Counters | None = None) -> None:
        self._config = config
        self._asyncio = asyncio
        self._context: zmq.Context | None = None
        self._monitors = itertools.count(1)  # monitors are made from several threads
        self._counters = counters
        self._upstream = UpstreamWatch(self._upstream_refused, time.monotonic)
        self._closed = False

    def guard_upstream(self, sock: zmq.Socket) -> None:
        """Bound what each peer of XPUB ``sock`` may send upstream (see :mod:`.upstream`).
        Call from ``sock``'s owner thread, after the bind and before it is advertised."""
        self._upstream.add(self.monitor(sock, watched_events(), sync=True))

    def _upstream_refused(self) -> None:
        if self._counters is not None:
            self._counters.add("refused_upstream")

    @property
    def context(self) -> zmq.Context:
        """The node's context, made on first use. Raises ClosedError once :meth:`close` ran (a
        late thread must not make a context nobody terminates)."""
        if self._context is None:
            if self._closed:
                raise ClosedError("the node's sockets are closed")
            ctx = zmq.asyncio.Context() if self._asyncio else zmq.Context()
            # ZeroMQ's own limit (1023 sockets by default) would fail a busy node long before
            # the process runs out of descriptors: size it to them.
            ctx.set(zmq.MAX_SOCKETS, max(1024, min(raise_fd_limit(), ctx.get(zmq.SOCKET_LIMIT))))
            self._context = ctx
        return self._context

    def socket(self, socket_type: int, *, sync: bool = False,
               heartbeat_ivl_ms: int | None = None) -> zmq.Socket:
        """A new socket with the fabric's options. ``sync=True`` gives a plain socket even on an
        asyncio node (for node-owned threads); ``heartbeat_ivl_ms`` overrides the heartbeat
        interval (timeout: three times it)."""
        cfg = self._config
        ctx = self.context
        if sync and self._asyncio:
            sock: zmq.Socket = zmq.Socket(ctx, socket_type)
        else:
            sock = ctx.socket(socket_type)
        sock.setsockopt(zmq.LINGER, cfg.linger_ms)
        sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        sock.setsockopt(zmq.RCVHWM, cfg.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_size + C.MESSAGE_ENVELOPE)
        if heartbeat_ivl_ms is None:
            sock.setsockopt(zmq.HEARTBEAT_IVL, cfg.heartbeat_ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, cfg.heartbeat_timeout_ms)
        else:
            sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TTL, cfg.heartbeat_ttl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL, C.RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, C.RECONNECT_IVL_MAX_MS)
        if socket_type in _IMMEDIATE:
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if socket_type == zmq.ROUTER:
            # Replies to a vanished client fail loudly instead of being dropped in silence.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        return sock

    def bind(self, sock: zmq.Socket, port: int = 0, domain: str = ZAP_DOMAIN) -> int:
        """Bind ``sock`` to ``port`` (0: a free one) of the node's scope address; return it.

        With keys, the socket is a CURVE server whose clients ZAP checks in ``domain``."""
        keys = self._config.keys
        if keys is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode("ascii"))
            sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        host = self._config.scope.address
        host = f"[{host}]" if ":" in host else host
        with translate_zmq_errors(f"bind to {host}:{port or '*'}"):
            sock.bind(f"tcp://{host}:{port}")
            endpoint = bytes(sock.getsockopt(zmq.LAST_ENDPOINT)).decode()  # type: ignore[arg-type]
        return int(endpoint.rsplit(":", 1)[1])

    def connect(self, sock: zmq.Socket, url: str, server_key: str | None) -> None:
        """Connect ``sock`` to ``url``; with keys, as a CURVE client of ``server_key``.

        Options are taken per connection, so one socket can reach servers with different keys.
        Raises LocalProtocolError when a secured node is asked to connect without a key."""
        keys = self._config.keys
        if keys is not None:
            if not server_key:
                raise LocalProtocolError(f"cannot connect to {url}: the peer has no CURVE key")
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public.encode("ascii"))
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode("ascii"))
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))
        with translate_zmq_errors(f"connect to {url}"):
            sock.connect(url)

    def monitor(self, sock: zmq.Socket, events: int, *, sync: bool = False) -> zmq.Socket:
        """A PAIR socket receiving ``sock``'s connection events (``sync=True``: a plain socket
        even on an asyncio node, for node-owned threads)."""
        address = f"inproc://zmqfabric-monitor-{id(self)}-{next(self._monitors)}"
        sock.monitor(address, events)
        if sync and self._asyncio:
            pair: zmq.Socket = zmq.Socket(self.context, zmq.PAIR)
        else:
            pair = self.context.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.connect(address)
        return pair

    def close(self) -> None:
        """Stop the upstream watch (its sockets), then terminate the context. Idempotent."""
        self._closed = True
        self._upstream.stop()
        if self._context is not None:
            self._context.term()
            self._context = None


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the soft limit
    now in force. Called once as a node starts: every peer costs descriptors, and a process that
    runs out fails in ways (EMFILE in ZeroMQ's I/O threads) that no peer should be able to cause.
    Never raises: a limit that cannot be raised is left as it is."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = _FD_CEILING if hard == resource.RLIM_INFINITY else hard
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
    except (OSError, ValueError) as exc:
        log.debug("cannot raise the limit of open files: %s", exc)
    return fd_limit()


def fd_limit() -> int:
    """The soft limit of open files of this process (a large number if unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _FD_CEILING if soft == resource.RLIM_INFINITY else int(soft)


#: What "unlimited" files means here (ZeroMQ's socket table is sized from it).
_FD_CEILING = 1 << 20


def peer_capacity() -> int:
    """How many peers a node can hold with the descriptors it has: MAX_PEERS, or fewer when the
    limit of open files is low (FDS_PER_PEER each, FD_RESERVE kept for everything else)."""
    return max(8, min(C.MAX_PEERS, (fd_limit() - C.FD_RESERVE) // C.FDS_PER_PEER))


def sync_view(sock: zmq.Socket) -> zmq.Socket:
    """The blocking view of a socket: itself, or the sync socket behind an asyncio socket.

    Used for sends that never wait (NOBLOCK replies) so their errors raise at once."""
    return getattr(sock, "_shadow_sock", sock)


def zmq_error(exc: zmq.ZMQError, subject: str, closed: bool = False) -> FabricError:
    """The fabric error for ``exc`` on ``subject``'s socket (e.g. "stream 'prices'"):
    ClosedError when the socket or its node is closed (``closed``: its owner says so)."""
    if closed or exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
        return ClosedError(f"{subject} is closed")
    return FabricError(f"{subject}: {exc.strerror}")


@contextlib.contextmanager
def translate_zmq_errors(action: str) -> Iterator[None]:
    """Map ``zmq.ZMQError`` raised inside the block to a fabric error naming ``action``."""
    try:
        yield
    except zmq.ZMQError as exc:
        if exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
            raise ClosedError(f"cannot {action}: the node is closed") from exc
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EINVAL):
            raise LocalProtocolError(f"cannot {action}: {exc.strerror}") from exc
        raise FabricError(f"cannot {action}: {exc.strerror}") from exc
