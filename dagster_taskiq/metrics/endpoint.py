"""``worker start --metrics-port``: the worker's registry, recorder, health probe and server."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from dagster_taskiq.metrics.health import HealthProbe
from dagster_taskiq.metrics.server import MetricsServer
from dagster_taskiq.metrics.worker_metrics import PrometheusRecorder

#: ``--metrics-host`` default: loopback only.
DEFAULT_METRICS_HOST = "127.0.0.1"


def _not_yet() -> bool:
    return False


class WorkerEndpoint:
    """Everything one worker serves on its metrics port."""

    def __init__(self, host: str, port: int, concurrency: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.recorder = PrometheusRecorder(self.registry, concurrency)
        self.probe = HealthProbe()
        self.server = MetricsServer(
            host, port, self.registry, healthy=self.probe.healthy, ready=_not_yet
        )

    def watch(self, busy_slots: Callable[[], int], ready: Callable[[], bool]) -> None:
        """Read the worker's busy slots and readiness from these (called once its parts exist;
        until then no slot is busy and ``/readyz`` says not ready)."""
        self.recorder.slots.busy = busy_slots
        self.server.ready = ready

    def start(self) -> None:
        """Start serving (the probe runs separately, on the worker's loop)."""
        self.server.start()

    def close(self) -> None:
        """Stop serving."""
        self.server.stop()
