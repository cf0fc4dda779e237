"""The HTTP side of a node's metrics: ``/metrics`` on the scope's address, served one request at
a time by a thread the node owns (started in its start(), shut down and joined in its close())."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from ..constants import METRICS_REQUEST_TIMEOUT_S, THREAD_JOIN_TIMEOUT_S
from ..errors import FabricError

log = logging.getLogger(__name__)


class MetricsServer:
    """Serves ``registry`` at ``http://ADDRESS:PORT/metrics``; other paths are 404."""

    def __init__(self, registry: CollectorRegistry, thread_name: str) -> None:
        self._registry = registry
        self._thread_name = thread_name
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, address: str, port: int) -> None:
        """Serve /metrics on ``address:port`` (0: any free port) from a node-owned thread.
        Raises FabricError when the port cannot be bound."""
        app = make_wsgi_app(self._registry)

        def metrics_only(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"metrics are at /metrics\n"]
            return app(environ, start_response)

        try:
            server = make_server(address, port, metrics_only, _Server, _QuietHandler)
        except OSError as exc:
            raise FabricError(f"cannot serve metrics on {address}:{port}: {exc}") from exc
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name=self._thread_name)
        self._thread.start()

    @property
    def url(self) -> str | None:
        """``http://ADDRESS:PORT/metrics`` while serving, else None."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        return f"http://{host}:{port}/metrics"

    def close(self) -> None:
        """Stop serving and join the thread (a scrape under way finishes first, bounded by
        METRICS_REQUEST_TIMEOUT_S). Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.shutdown()
        thread.join(THREAD_JOIN_TIMEOUT_S)
        server.server_close()


class _Server(WSGIServer):
    """One scrape at a time; a client's failure (it stalled, it hung up) is logged at debug
    level instead of socketserver's traceback on stderr."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    """No access log; a client that stalls is dropped after METRICS_REQUEST_TIMEOUT_S."""

    timeout = METRICS_REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass
