"""Admission control for secured nodes: ZAP through pyzmq's ``zmq.auth``.

Every endpoint of a node with keys is a CURVE server; ZeroMQ asks this guard (over ZAP) whether a
client's public key may connect. The node-wide allow-list applies to domain ``zmqfabric``; an
endpoint with an allow-list of its own gets a domain of its own. Refusals are counted and logged
(rate-limited). The thread flavour of the authenticator is used for sync and asyncio nodes alike,
so a busy event loop never stalls handshakes.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..stats import Counters, RateLimitedLog
from ..transport.sockets import ZAP_DOMAIN
from .keys import KeySet

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)


class Guard:
    """Owns the node's ZAP authenticator thread. ``start()`` before any socket binds;
    ``stop()`` before the context terminates. ``restrict`` is thread-safe."""

    def __init__(self, context: zmq.Context, keys: KeySet, counters: Counters, node: str) -> None:
        self._context = context
        self._keys = keys
        self._counters = counters
        self._node = node
        self._lock = threading.Lock()
        self._domains: dict[str, frozenset[str]] = {}
        self._auth: ThreadAuthenticator | None = None

    def start(self) -> None:
        self._auth = ThreadAuthenticator(self._context, log=logging.getLogger(f"{__name__}.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, self)

    def restrict(self, kind: str, name: str, allowed: Iterable[str]) -> str:
        """A ZAP domain admitting only ``allowed`` keys (and this node's own) to one endpoint."""
        domain = f"{ZAP_DOMAIN}/{kind}/{name}"
        with self._lock:
            self._domains[domain] = frozenset(allowed)
        if self._auth is not None:
            self._auth.configure_curve_callback(domain, self)
        return domain

    def callback(self, domain: str, client_key: bytes) -> bool:
        """Called by the authenticator thread for each CURVE handshake."""
        key = client_key.decode("ascii", "replace")
        with self._lock:
            endpoint_allow = self._domains.get(domain)
        if endpoint_allow is not None:
            ok = key == self._keys.public or key in endpoint_allow
        else:
            ok = self._keys.allows(key)
        if not ok:
            self._counters.add("refused_handshakes")
            _rlog.warning("handshake", "%s: refused a CURVE handshake from key %s (domain %s): "
                          "not in the allow-list", self._node, key, domain)
        return ok

    def stop(self) -> None:
        auth, self._auth = self._auth, None
        if auth is not None:
            auth.stop()
