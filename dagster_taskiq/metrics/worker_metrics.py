"""The worker's Prometheus metrics, in a registry of its own."""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.states import Outcome
from dagster_taskiq.metrics.recorder import queue_wait

#: Prefix of every metric name.
PREFIX = "dagster_taskiq_"

#: Histogram buckets (seconds) for task durations and queue waits: 10 ms to one hour.
DURATION_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)


class SlotsCollector(Collector):
    """``worker_slots{state}``: busy and free slots, read at scrape time."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        #: Slots held now; the worker sets it once its parts exist.
        self.busy: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One gauge with a busy and a free sample."""
        busy = min(max(self.busy(), 0), self.concurrency)
        family = GaugeMetricFamily(
            f"{PREFIX}worker_slots", "Task slots of this worker, by state.", labels=["state"]
        )
        family.add_metric(["busy"], busy)
        family.add_metric(["free"], self.concurrency - busy)
        yield family


class PrometheusRecorder:
    """A :class:`~dagster_taskiq.metrics.recorder.TaskRecorder` that updates Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry, concurrency: int) -> None:
        labels = ["queue", "kind"]
        self.started_total = Counter(
            f"{PREFIX}tasks_started_total",
            "Tasks whose process this worker started.",
            labels,
            registry=registry,
        )
        self.finished_total = Counter(
            f"{PREFIX}tasks_finished_total",
            "Tasks this worker ended, by outcome (success, failure, revoked, lost, dead_letter).",
            [*labels, "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{PREFIX}task_duration_seconds",
            "Seconds a task's process ran on this worker.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}task_queue_wait_seconds",
            "Seconds from a task's submission until this worker started it.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        #: ``worker_slots``; point its ``busy`` at the worker's slot count.
        self.slots = SlotsCollector(concurrency)
        registry.register(self.slots)

    def started(self, record: TaskRecord) -> None:
        """Count the start and observe its queue wait."""
        queue, kind = record.queue, record.kind.value
        self.started_total.labels(queue, kind).inc()
        self.queue_wait.labels(queue, kind).observe(queue_wait(record))

    def finished(self, record: TaskRecord, outcome: Outcome, duration: float) -> None:
        """Count the outcome and observe the duration."""
        queue, kind = record.queue, record.kind.value
        self.finished_total.labels(queue, kind, outcome.value).inc()
        self.duration.labels(queue, kind).observe(duration)

    def refused(self, queue: str, kind: str) -> None:
        """Count a dead letter."""
        self.finished_total.labels(queue, kind, Outcome.DEAD_LETTER.value).inc()
