"""``dagster-taskiq exporter``: serve the cluster gauges for Prometheus, one per deployment."""

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click
from prometheus_client import CollectorRegistry

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqClient, TaskiqConnection
from dagster_taskiq.metrics.cluster import ClusterCollector, StatusReader, cluster_snapshot
from dagster_taskiq.metrics.server import MetricsServer

#: A decorator of click command functions (``cli.connection_options``, ``cli.user_errors``).
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


#: A scrape gives up reading the cluster after this many seconds (and reports exporter_up 0).
SCRAPE_TIMEOUT = 10.0


def serve_exporter(
    settings: TaskiqSettings, host: str, port: int, read_status: StatusReader
) -> None:
    """Serve the cluster gauges on ``host:port`` until SIGTERM or SIGINT."""
    client = TaskiqClient(settings)
    client.connect()

    def snapshot() -> dict[str, Any]:
        async def _read(conn: TaskiqConnection) -> dict[str, Any]:
            return await asyncio.wait_for(cluster_snapshot(conn, read_status), SCRAPE_TIMEOUT)

        result: dict[str, Any] = client.run(_read)
        return result

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(snapshot))
    server = MetricsServer(host, port, registry)
    stop = threading.Event()
    try:
        server.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        click.echo(
            f"Exporting cluster metrics of {settings.describe()} on http://{host}:{server.port}"
            "/metrics"
        )
        stop.wait()
    finally:
        server.stop()
        client.close()


def exporter_command(
    connection_options: Decorator,
    user_errors: Decorator,
    load_settings: Callable[[str | None, str | None, str | None], TaskiqSettings],
    read_status: StatusReader,
) -> click.Command:
    """The ``exporter`` command, built from the CLI's shared option and error conventions
    (passed in, so that this module need not import the CLI module that registers it)."""

    @click.command("exporter")
    @connection_options
    @click.option(
        "--port", type=click.IntRange(min=0, max=65535), required=True, help="Port to serve on."
    )
    @click.option(
        "--host",
        default="127.0.0.1",
        show_default=True,
        help="Address to bind (0.0.0.0 to be scraped from other hosts).",
    )
    @user_errors
    def exporter(
        config_yaml: str | None, broker: str | None, backend: str | None, port: int, host: str
    ) -> None:
        """Serve cluster gauges (queues, workers, in-flight tasks, dead letters) on /metrics."""
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        settings = load_settings(config_yaml, broker, backend)
        serve_exporter(settings, host, port, read_status)

    return exporter
