"""The metrics pieces that need no process: outcome labels, dead-letter queues, cluster
gauges from a status document, the health probe's staleness, the recorder's series."""

import asyncio
import json
from typing import Any

from prometheus_client import CollectorRegistry

from dagster_taskiq.brokers.factory import QUEUE_LABEL
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.states import Outcome, TaskKind, TaskState
from dagster_taskiq.metrics.cluster import ClusterCollector, cluster_families, dead_letter_queue
from dagster_taskiq.metrics.health import HealthProbe
from dagster_taskiq.metrics.recorder import held_slots, metric_outcome
from dagster_taskiq.metrics.worker_metrics import PrometheusRecorder


def test_outcome_labels() -> None:
    assert metric_outcome("success") is Outcome.SUCCESS
    assert metric_outcome("success", step_failed=True) is Outcome.FAILURE
    assert metric_outcome("skipped") is Outcome.SUCCESS
    assert metric_outcome("bad_message") is Outcome.DEAD_LETTER
    assert metric_outcome("revoked", step_failed=True) is Outcome.REVOKED
    assert metric_outcome("lost") is Outcome.LOST
    assert metric_outcome("no such status") is Outcome.FAILURE


def test_dead_letter_queue_comes_from_the_entry_or_its_message() -> None:
    assert dead_letter_queue({"queue": "q1", "message": "garbage"}) == "q1"
    message = json.dumps({"labels": {QUEUE_LABEL: "q2"}})
    assert dead_letter_queue({"message": message}) == "q2"
    assert dead_letter_queue({"message": "not json"}) == "unknown"
    assert dead_letter_queue({"message": "[1, 2]"}) == "unknown"
    assert dead_letter_queue({}) == "unknown"


def _samples(families: Any) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.values()))): sample.value
        for family in families
        for sample in family.samples
    }


def test_cluster_gauges_from_a_status_document() -> None:
    document = {
        "queues": [
            {"name": "a", "waiting": 3, "by_priority": {"5": 2, "0": 1}, "in_broker": 3},
            {"name": "b", "waiting": 0, "by_priority": {}, "in_broker": 0},
        ],
        "workers": [{"name": "w1", "queues": ["b", "c"]}, {"name": "w2", "queues": ["b"]}],
        "in_flight": [
            {"queue": "a", "kind": "step", "state": "queued"},
            {"queue": "a", "kind": "step", "state": "queued"},
            {"queue": "b", "kind": "run", "state": "running"},
        ],
        "dead_letters": 2,
        "dead_letters_by_queue": {"a": 1, "unknown": 1},
    }
    samples = _samples(cluster_families(document))
    assert samples == {
        ("dagster_taskiq_queue_waiting", ("5", "a")): 2,
        ("dagster_taskiq_queue_waiting", ("0", "a")): 1,
        ("dagster_taskiq_workers_live", ("a",)): 0,
        ("dagster_taskiq_workers_live", ("b",)): 2,
        ("dagster_taskiq_workers_live", ("c",)): 1,
        ("dagster_taskiq_tasks_in_flight", ("a", "queued", "step")): 2,
        ("dagster_taskiq_tasks_in_flight", ("b", "run", "running")): 1,
        ("dagster_taskiq_dead_letters", ("a",)): 1,
        ("dagster_taskiq_dead_letters", ("unknown",)): 1,
    }


def test_an_unreadable_cluster_reports_exporter_down() -> None:
    def _fail() -> dict[str, Any]:
        raise ConnectionError("redis is down")

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(_fail))
    assert _samples(registry.collect()) == {("dagster_taskiq_exporter_up", ()): 0}


def test_health_goes_stale() -> None:
    now = [100.0]
    probe = HealthProbe(stale_after=5.0, clock=lambda: now[0])
    assert not probe.healthy()  # never succeeded
    probe.last_ok = 100.0
    assert probe.healthy()
    now[0] = 104.9
    assert probe.healthy()
    now[0] = 105.0
    assert not probe.healthy()


def test_the_probe_records_only_successful_round_trips() -> None:
    class Redis:
        def __init__(self) -> None:
            self.up = True

        async def ping(self) -> bool:
            if not self.up:
                raise ConnectionError("down")
            return True

    class Conn:
        def __init__(self) -> None:
            self.backend_redis = Redis()
            self.broker_redis = self.backend_redis

    async def _main() -> None:
        conn = Conn()
        probe = HealthProbe(interval=0.01)
        task = asyncio.create_task(probe.run(conn))  # type: ignore[arg-type]
        while probe.last_ok is None:
            await asyncio.sleep(0.01)
        conn.backend_redis.up = False
        await asyncio.sleep(0.05)
        stale = probe.last_ok
        await asyncio.sleep(0.05)
        assert probe.last_ok == stale
        conn.backend_redis.up = True
        while probe.last_ok == stale:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(_main(), 10))


def _record(kind: TaskKind, queue: str = "q") -> TaskRecord:
    return TaskRecord(
        task_id="t",
        kind=kind,
        run_id="r",
        step_key="s" if kind is TaskKind.STEP else None,
        queue=queue,
        priority=0,
        state=TaskState.RUNNING,
        worker="w",
        fence=1,
        submitted_at=0.0,
        sent_at=None,
        claimed_at=None,
        started_at=None,
        finished_at=None,
        last_heartbeat=None,
        heartbeat_timeout=30.0,
        status=None,
        pid=None,
        deliveries=1,
        requeued_at=None,
        lease_alive=True,
    )


def test_recorder_series_and_slots() -> None:
    class Held:
        def __init__(self, kind: TaskKind) -> None:
            self.record = _record(kind)

    registry = CollectorRegistry()
    recorder = PrometheusRecorder(registry, 4)
    running = {"a": Held(TaskKind.STEP), "b": Held(TaskKind.RUN)}
    recorder.slots.busy = lambda: held_slots({"c": (1, 30.0)}, running)
    recorder.started(_record(TaskKind.STEP))
    recorder.finished(_record(TaskKind.STEP), Outcome.REVOKED, 1.5)
    recorder.refused("unknown", "unknown")
    samples = _samples(registry.collect())
    assert samples[("dagster_taskiq_tasks_started_total", ("q", "step"))] == 1
    assert samples[("dagster_taskiq_tasks_finished_total", ("q", "revoked", "step"))] == 1
    assert samples[("dagster_taskiq_tasks_finished_total", ("dead_letter", "unknown", "unknown"))]
    assert samples[("dagster_taskiq_task_duration_seconds_sum", ("q", "step"))] == 1.5
    assert samples[("dagster_taskiq_task_queue_wait_seconds_count", ("q", "step"))] == 1
    assert samples[("dagster_taskiq_worker_slots", ("busy",))] == 2
    assert samples[("dagster_taskiq_worker_slots", ("free",))] == 2
