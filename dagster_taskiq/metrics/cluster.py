"""The exporter's cluster gauges, read from the key store and the broker at scrape time.

The numbers are those of ``dagster-taskiq status`` (its ``collect_status`` document), plus dead
letters counted per queue.
"""

import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dagster_taskiq.brokers.factory import QUEUE_LABEL
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.metrics.recorder import UNKNOWN_LABEL
from dagster_taskiq.metrics.worker_metrics import PREFIX

logger = logging.getLogger("dagster_taskiq.metrics")

#: A ``status --json`` document for a connection (``cli.collect_status``).
StatusReader = Callable[[TaskiqConnection], Awaitable[dict[str, Any]]]


def dead_letter_queue(entry: dict[str, Any]) -> str:
    """The queue a dead letter was meant for: its ``queue`` field, else its message's queue
    label, else ``unknown``."""
    queue = entry.get("queue")
    if queue:
        return str(queue)
    try:
        labels = json.loads(entry.get("message") or "").get("labels") or {}
    except (ValueError, AttributeError):
        return UNKNOWN_LABEL
    return str(labels.get(QUEUE_LABEL) or UNKNOWN_LABEL)


async def cluster_snapshot(conn: TaskiqConnection, read_status: StatusReader) -> dict[str, Any]:
    """The status document plus ``dead_letters_by_queue``."""
    document = await read_status(conn)
    by_queue: Counter[str] = Counter()
    if document["dead_letters"]:
        entries = await conn.keystore.dead_letters(limit=int(document["dead_letters"]))
        by_queue.update(dead_letter_queue(entry) for entry in entries)
    document["dead_letters_by_queue"] = dict(by_queue)
    return document


def cluster_families(document: dict[str, Any]) -> list[GaugeMetricFamily]:
    """The exporter's gauges for one snapshot (see :func:`cluster_snapshot`)."""
    waiting = GaugeMetricFamily(
        f"{PREFIX}queue_waiting",
        "Tasks queued and not yet claimed, by queue and priority.",
        labels=["queue", "priority"],
    )
    live = GaugeMetricFamily(
        f"{PREFIX}workers_live", "Live workers serving a queue.", labels=["queue"]
    )
    in_flight = GaugeMetricFamily(
        f"{PREFIX}tasks_in_flight",
        "Unfinished tasks, by queue, kind and state.",
        labels=["queue", "kind", "state"],
    )
    dead = GaugeMetricFamily(
        f"{PREFIX}dead_letters", "Dead-lettered messages kept, by queue.", labels=["queue"]
    )
    workers = document["workers"]
    queue_names = {q["name"] for q in document["queues"]}
    for queue in document["queues"]:
        for priority, count in queue["by_priority"].items():
            waiting.add_metric([queue["name"], str(priority)], count)
    for name in sorted(queue_names | {q for w in workers for q in w["queues"]}):
        live.add_metric([name], sum(1 for w in workers if name in w["queues"]))
    tasks = Counter((t["queue"], str(t["kind"]), str(t["state"])) for t in document["in_flight"])
    for (queue_name, kind, state), count in sorted(tasks.items()):
        in_flight.add_metric([queue_name, kind, state], count)
    for queue_name, count in sorted(document.get("dead_letters_by_queue", {}).items()):
        dead.add_metric([queue_name], count)
    return [waiting, live, in_flight, dead]


class ClusterCollector(Collector):
    """Reads a fresh snapshot on every scrape; ``exporter_up`` says whether that worked."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The cluster gauges, or only ``exporter_up 0`` when the stores cannot be read."""
        up = GaugeMetricFamily(
            f"{PREFIX}exporter_up", "1 if the last scrape could read the key store and broker."
        )
        try:
            document = self.snapshot()
        except Exception as exc:
            logger.warning("Could not read the cluster state (%s: %s).", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from cluster_families(document)

    def describe(self) -> list[GaugeMetricFamily]:
        """Nothing: describing would read the stores at registration time."""
        return []
