"""Prometheus metrics and health endpoints, on real worker and exporter processes."""

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import yaml
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable
from prometheus_client.parser import text_string_to_metric_families

from dagster_taskiq.brokers.factory import QUEUE_LABEL
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.lifecycle.states import TaskKind, TaskState
from dagster_taskiq.payloads import STEP_TASK_NAME
from dagster_taskiq_tests import metrics_jobs
from dagster_taskiq_tests.harness import (
    REPO_ROOT,
    WorkerPool,
    executor_config,
    isolated_settings,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.private_brokers import PrivateRedis, free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """Status code and body of a GET (an HTTP error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int, timeout: float = 5.0) -> Samples:
    """Every sample of ``/metrics`` on ``port``: (name, sorted labels) to value."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout)
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((f"dagster_taskiq_{name}", tuple(sorted(labels.items()))), 0.0)


def _revoke_when_running(
    settings: TaskiqSettings, step_key: str, marker: Path, done: threading.Event
) -> None:
    async def _revoke(conn) -> bool:  # type: ignore[no-untyped-def]
        if not marker.exists():
            return False
        records = await conn.keystore.get_many(await conn.keystore.inflight_ids())
        for record in records:
            if record.step_key == step_key and record.state == TaskState.RUNNING:
                await conn.keystore.revoke(record.task_id)
                return True
        return False

    wait_for(lambda: done.is_set() or run_async(settings, _revoke), 90, 0.2, "the step to run")


def test_worker_counters_match_the_event_log(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool, tmp_path: Path
) -> None:
    port = free_port()
    marker = tmp_path / "started"
    worker = workers.start(concurrency=3, extra_args=["--metrics-port", str(port)])
    queue = worker.queues[0]
    done = threading.Event()
    revoker = threading.Thread(
        target=_revoke_when_running, args=(settings, "waits_for_revoke", marker, done), daemon=True
    )
    revoker.start()
    try:
        with execute_job(
            reconstructable(metrics_jobs.mixed_outcomes_job),
            instance=instance,
            run_config={
                **executor_config(settings),
                "ops": {"waits_for_revoke": {"config": {"marker": str(marker)}}},
            },
        ) as result:
            events = Counter(e.event_type for e in result.all_events)
            failed = {
                e.step_key
                for e in result.all_events
                if e.event_type == DagsterEventType.STEP_FAILURE
            }
    finally:
        done.set()
        revoker.join()
    assert failed == {"fails", "waits_for_revoke"}
    step = TaskKind.STEP.value

    def _counted() -> Samples | None:
        samples = scrape(port)
        finished = sum(
            v for (name, _), v in samples.items() if name == "dagster_taskiq_tasks_finished_total"
        )
        return samples if finished >= events[DagsterEventType.STEP_START] else None

    samples = wait_for(_counted, 30, 0.2, "every finished task to be counted")
    assert (
        value(samples, "tasks_started_total", queue=queue, kind=step)
        == events[DagsterEventType.STEP_START]
        == 3
    )
    finished = {
        outcome: value(samples, "tasks_finished_total", queue=queue, kind=step, outcome=outcome)
        for outcome in ("success", "failure", "revoked", "lost", "dead_letter")
    }
    assert finished == {"success": 1, "failure": 1, "revoked": 1, "lost": 0, "dead_letter": 0}
    assert finished["success"] == events[DagsterEventType.STEP_SUCCESS]
    assert finished["failure"] + finished["revoked"] == events[DagsterEventType.STEP_FAILURE]
    assert value(samples, "task_duration_seconds_count", queue=queue, kind=step) == 3
    assert value(samples, "task_queue_wait_seconds_count", queue=queue, kind=step) == 3
    assert value(samples, "worker_slots", state="free") == 3
    assert value(samples, "worker_slots", state="busy") == 0


def test_healthz_follows_a_paused_redis(private_redis: PrivateRedis, dagster_home: Path) -> None:
    settings = isolated_settings("redis", private_redis.url(), "")
    workers = WorkerPool(settings, dagster_home)
    port = free_port()
    try:
        workers.start(extra_args=["--metrics-port", str(port)])
        _health_round_trip(private_redis, f"http://127.0.0.1:{port}")
    finally:
        workers.stop_all()


def _health_round_trip(private_redis: PrivateRedis, base: str) -> None:
    wait_for(lambda: http_get(f"{base}/healthz")[0] == 200, 30, 0.1, "healthz 200")
    wait_for(lambda: http_get(f"{base}/readyz")[0] == 200, 30, 0.1, "readyz 200")
    private_redis.pause()
    try:
        wait_for(lambda: http_get(f"{base}/healthz")[0] == 503, 20, 0.1, "healthz 503")
    finally:
        private_redis.resume()
    wait_for(lambda: http_get(f"{base}/healthz")[0] == 200, 30, 0.1, "healthz 200 again")
    assert http_get(f"{base}/nothing")[0] == 404


def _waiting_task(settings: TaskiqSettings, queue: str, priority: int) -> None:
    async def _submit(conn) -> None:  # type: ignore[no-untyped-def]
        await conn.submit(
            task_id=f"t-{uuid.uuid4().hex}",
            task_name=STEP_TASK_NAME,
            payload="{}",
            kind=TaskKind.STEP,
            run_id="run-exporter-test",
            step_key=f"step_{priority}",
            queue=queue,
            priority=priority,
            heartbeat_timeout=30.0,
        )

    run_async(settings, _submit)


def test_exporter_gauges(settings: TaskiqSettings, workers: WorkerPool, tmp_path: Path) -> None:
    served = workers.start().queues[0]
    idle = f"{served}-idle"
    _waiting_task(settings, idle, 5)
    _waiting_task(settings, idle, 5)
    _waiting_task(settings, idle, 0)
    poison = json.dumps({"task_id": "x", "labels": {QUEUE_LABEL: idle}}).encode()
    run_async(
        settings, lambda c: c.keystore.dead_letter("poison", poison, "test-worker", queue=idle)
    )
    exporter, port = _start_exporter(settings, tmp_path)
    try:
        samples = wait_for(lambda: _try_scrape(port, exporter), 60, 0.2, "the exporter")
        assert value(samples, "exporter_up") == 1
        assert value(samples, "queue_waiting", queue=idle, priority="5") == 2
        assert value(samples, "queue_waiting", queue=idle, priority="0") == 1
        assert value(samples, "workers_live", queue=served) == 1
        assert ("dagster_taskiq_workers_live", (("queue", idle),)) in samples
        assert value(samples, "workers_live", queue=idle) == 0
        assert value(samples, "tasks_in_flight", queue=idle, kind="step", state="queued") == 3
        assert value(samples, "dead_letters", queue=idle) == 1
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        exporter.terminate()
        output = exporter.communicate(timeout=20)[0].decode(errors="replace")
    assert exporter.returncode == 0, output


def _start_exporter(
    settings: TaskiqSettings, tmp_path: Path
) -> "tuple[subprocess.Popen[bytes], int]":
    """A real ``dagster-taskiq exporter`` process for ``settings``, and its port."""
    config = tmp_path / "exporter.yaml"
    config.write_text(yaml.safe_dump(executor_config(settings)))
    port = free_port()
    command = [sys.executable, "-m", "dagster_taskiq.cli", "exporter", "-y", str(config)]
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return process, port


def _try_scrape(port: int, process: "subprocess.Popen[bytes]") -> Samples | None:
    if process.poll() is not None:
        raise AssertionError(f"the exporter exited: {process.communicate()[0]!r}")
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return None


def test_metrics_port_in_use_is_one_line(
    settings: TaskiqSettings, workers: WorkerPool, tmp_path: Path
) -> None:
    port = free_port()
    workers.start(extra_args=["--metrics-port", str(port)])
    config = tmp_path / "second.yaml"
    config.write_text(yaml.safe_dump(executor_config(settings)))
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster_taskiq.cli",
            "worker",
            "start",
            "-y",
            str(config),
            "-q",
            settings.default_queue,
            "--metrics-port",
            str(port),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1, second.stderr
    assert f"Cannot serve metrics on 127.0.0.1:{port}" in second.stderr


def test_exporter_reports_itself_down_while_redis_is_paused(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    settings = isolated_settings("redis", private_redis.url(), "")
    exporter, port = _start_exporter(settings, tmp_path)
    try:
        samples = wait_for(lambda: _try_scrape(port, exporter), 60, 0.2, "the exporter")
        assert value(samples, "exporter_up") == 1
        private_redis.pause()
        try:
            assert value(scrape(port, timeout=30), "exporter_up") == 0
        finally:
            private_redis.resume()
        wait_for(
            lambda: value(scrape(port, timeout=30), "exporter_up") == 1, 60, 0.2, "exporter up"
        )
    finally:
        exporter.terminate()
        output = exporter.communicate(timeout=20)[0].decode(errors="replace")
    assert exporter.returncode == 0, output
