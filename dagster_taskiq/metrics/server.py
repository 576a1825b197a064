"""A small HTTP server, in a thread of its own, for ``/metrics``, ``/healthz`` and ``/readyz``.

It runs beside (never on) the worker's event loop: a slow scrape cannot delay a heartbeat.
"""

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dagster_taskiq.errors import TaskiqConfigError

logger = logging.getLogger("dagster_taskiq.metrics")

#: The paths the server answers.
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"


def _always() -> bool:
    return True


class MetricsServer:
    """Serves a registry's metrics and two yes/no checks over HTTP."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        healthy: Callable[[], bool] = _always,
        ready: Callable[[], bool] = _always,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.healthy = healthy
        self.ready = ready
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a daemon thread; :class:`TaskiqConfigError` if the port is taken."""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == METRICS_PATH:
                    outer._reply(self, 200, generate_latest(outer.registry), CONTENT_TYPE_LATEST)
                elif path == HEALTH_PATH:
                    outer._check(self, outer.healthy(), "healthy", "unhealthy")
                elif path == READY_PATH:
                    outer._check(self, outer.ready(), "ready", "not ready")
                else:
                    outer._reply(self, 404, b"not found\n", "text/plain")

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("%s " + format, self.address_string(), *args)

        try:
            self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as exc:
            raise TaskiqConfigError(
                f"Cannot serve metrics on {self.host}:{self.port} ({exc.strerror or exc}). Pick "
                "another port, or stop what uses it."
            ) from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dagster-taskiq-metrics", daemon=True
        )
        self._thread.start()
        logger.info(
            "Serving %s, %s and %s on http://%s:%d.",
            METRICS_PATH,
            HEALTH_PATH,
            READY_PATH,
            self.host,
            self.port,
        )

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @staticmethod
    def _check(handler: BaseHTTPRequestHandler, ok: bool, yes: str, no: str) -> None:
        MetricsServer._reply(
            handler, 200 if ok else 503, f"{yes if ok else no}\n".encode(), "text/plain"
        )

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, code: int, body: bytes, content_type: str) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
