"""Redis faults mid-run, on a private ``redis-server`` (AOF persistence, ``appendfsync always``)
that is both the broker and the backend: a restart, and 15 s of silence (SIGSTOP).

In both, the ``held`` step finishes while Redis is away, so the worker must keep trying to record
its outcome and the orchestrator must keep trying to submit the next step; both reconnect with
backoff, nothing restarts, and every step starts exactly once.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.lifecycle.records import TaskRecord
from dagster_taskiq.lifecycle.recovery import recover, sweep
from dagster_taskiq.lifecycle.store import message_digest
from dagster_taskiq_tests import reliability_jobs as rj
from dagster_taskiq_tests.harness import (
    WorkerPool,
    WorkerProcess,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.private_brokers import PrivateRedis
from dagster_taskiq_tests.reliability_support import (
    hold_chain_in_background,
    starts,
    successes,
    task_records,
    wait_state,
)
from dagster_taskiq_tests.services import REDIS_URL, require

OUTAGE_SECONDS = 15.0


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private, persistent Redis that the test may restart and pause."""
    server = PrivateRedis(tmp_path / "redis", appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_settings(private_redis: PrivateRedis) -> TaskiqSettings:
    """Broker and backend on the private Redis; the default 30 s heartbeat timeout."""
    url = private_redis.url()
    return TaskiqSettings(
        broker_url=url,
        backend_url=url,
        default_queue="rel-redis",
        heartbeat_timeout=30.0,
        config_source={"key_prefix": "rel", "result_ttl": 600, "connect_timeout": 5},
    )


@pytest.fixture
def env_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(note log, release file) for the ``held`` op; set before workers start."""
    log, release = tmp_path / "notes.log", tmp_path / "release"
    monkeypatch.setenv(rj.LOG_ENV, str(log))
    monkeypatch.setenv(rj.RELEASE_ENV, str(release))
    return log, release


def _orchestrator_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("dagster_taskiq") and r.levelno >= logging.WARNING
    ]


def _start_held_run(
    instance: DagsterInstance, settings: TaskiqSettings
) -> tuple["Future[Any]", str, str]:
    """Start ``hold_chain_job`` in the background; return (future, run id, first's task id)
    once ``held`` is running."""
    future = hold_chain_in_background(instance, settings)
    run_id = wait_for(
        lambda: next((r.run_id for r in instance.get_runs()), None), 60, what="the run"
    )
    wait_state(settings, run_id, "held", {"running"})
    first = wait_state(settings, run_id, "first", {"done"})
    return future, run_id, first.task_id


def _wait_for_retries(worker: WorkerProcess, caplog: pytest.LogCaptureFixture) -> None:
    """While Redis is away: the worker retries recording 'held', the orchestrator submitting
    'last'; both say so in a warning."""
    wait_for(
        lambda: "while recording the outcome of task" in worker.log(),
        60,
        what="the worker to retry",
    )
    wait_for(
        lambda: any("retrying" in m for m in _orchestrator_warnings(caplog)),
        60,
        what="the orchestrator to retry submitting the next step",
    )


def _check_run(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    future: "Future[Any]",
    run_id: str,
    first_task: str,
) -> None:
    with future.result(timeout=120) as result:
        assert result.success
    assert starts(instance, run_id) == {"first": 1, "held": 1, "last": 1}
    assert successes(instance, run_id) == {"first": 1, "held": 1, "last": 1}
    # Workers mark a task done just after its step's success reaches the event log.
    for step_key in ("first", "held", "last"):
        wait_state(settings, run_id, step_key, {"done"}, timeout=30.0)
    assert set(task_records(settings, run_id)) == {"first", "held", "last"}
    # The result written before the outage survived it.
    outcome = run_async(settings, lambda c: c.outcome(first_task))
    assert outcome is not None and outcome.status == "success"


def test_redis_restart_mid_run(
    instance: DagsterInstance,
    private_redis: PrivateRedis,
    redis_settings: TaskiqSettings,
    dagster_home: Path,
    env_files: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dagster_taskiq")
    workers = WorkerPool(redis_settings, dagster_home)
    try:
        worker = workers.start(concurrency=2)
        future, run_id, first_task = _start_held_run(instance, redis_settings)
        private_redis.stop()
        env_files[1].touch()  # 'held' ends while Redis is down
        _wait_for_retries(worker, caplog)
        private_redis.start()
        _check_run(instance, redis_settings, future, run_id, first_task)
        assert worker.process is not None and worker.process.poll() is None  # same process
        if "Heartbeat failed" in worker.log():
            wait_for(lambda: "Heartbeat recovered" in worker.log(), 15, what="heartbeats")
    finally:
        workers.stop_all()


def test_redis_unreachable_for_15_seconds(
    instance: DagsterInstance,
    private_redis: PrivateRedis,
    redis_settings: TaskiqSettings,
    dagster_home: Path,
    env_files: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGSTOP: connections hang instead of failing, as in a network partition."""
    caplog.set_level(logging.WARNING, logger="dagster_taskiq")
    workers = WorkerPool(redis_settings, dagster_home)
    try:
        worker = workers.start(concurrency=2)
        future, run_id, first_task = _start_held_run(instance, redis_settings)
        paused_at = time.monotonic()
        private_redis.pause()
        try:
            env_files[1].touch()  # 'held' ends while Redis is silent
            _wait_for_retries(worker, caplog)
            wait_for(
                lambda: time.monotonic() - paused_at >= OUTAGE_SECONDS,
                OUTAGE_SECONDS + 5,
                interval=0.2,
                what="the outage to last 15 s",
            )
        finally:
            private_redis.resume()
        _check_run(instance, redis_settings, future, run_id, first_task)
        assert worker.process is not None and worker.process.poll() is None  # same process
        assert "Heartbeat failed" in worker.log()
        wait_for(lambda: "Heartbeat recovered" in worker.log(), 15, what="heartbeats to resume")
    finally:
        workers.stop_all()


def test_orphan_release_survives_a_broker_outage(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """A task claimed by a dead worker is released and re-sent; if the broker is down then, the
    task stays queued and unsent (never claimed by nobody, never lost), and a later sweep sends
    it once the broker is back."""
    require(REDIS_URL, "Redis")
    uid = uuid.uuid4().hex[:8]
    settings = TaskiqSettings(
        broker_url=private_redis.url(),
        backend_url=REDIS_URL,
        default_queue=f"rel-orphan-{uid}",
        config_source={"key_prefix": f"rel-orphan-{uid}", "reconnect_timeout": 1},
    )
    task_id = f"run-{uid}.step.{uid}"

    async def _scenario() -> tuple[TaskRecord | None, TaskRecord | None, dict[int, int]]:
        conn = TaskiqConnection(settings)
        await conn.start()
        try:
            await conn.keystore.register(
                task_id=task_id, kind="step", run_id=f"run-{uid}", step_key="step",
                queue=settings.default_queue, priority=5, heartbeat_timeout=30.0,
                message=b"{}",
            )  # fmt: skip
            claim = await conn.keystore.claim(
                task_id, "ghost-worker-never-alive", "ghost-instance", message_digest(b"{}")
            )
            assert claim.granted
            private_redis.stop()
            record = await conn.keystore.get(task_id)
            assert record is not None and record.holder_alive is False
            await recover(conn.keystore, conn, record)  # the send fails: no error escapes
            after_failure = await conn.keystore.get(task_id)
            private_redis.start()
            # Later sweeps (any worker's) find it due and send it.
            report = await sweep(conn.keystore, conn, now=time.time() + 60)
            assert report.sent == 1, report
            after_sweep = await conn.keystore.get(task_id)
            waiting = await conn.broker.waiting_by_priority(settings.default_queue)  # type: ignore[attr-defined]
            return after_failure, after_sweep, waiting
        finally:
            await conn.close()

    after_failure, after_sweep, waiting = asyncio.run(_scenario())
    assert after_failure is not None and after_failure.state == "queued", after_failure
    assert after_failure.sent_at is None and after_failure.worker is None
    assert after_sweep is not None and after_sweep.sent_at is not None
    assert waiting == {5: 1}
