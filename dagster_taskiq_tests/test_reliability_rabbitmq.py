"""RabbitMQ faults mid-run, on a private RabbitMQ node (own node name, ports and database) with a
short ``consumer_timeout``: a step that outlives the consumer timeout, a node restart, and a
SIGTERM while the node is down (that test leaves the node down; the next test starts it again).

The node runs with ``consumer_timeout`` = 2 s, checked every 0.5 s, so any delivery a worker held
unacknowledged for longer would have its channel closed and be delivered again.
"""

import dataclasses
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, execute_job, reconstructable

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq_tests import jobs
from dagster_taskiq_tests import reliability_jobs as rj
from dagster_taskiq_tests.harness import WorkerPool, executor_config, run_async, wait_for
from dagster_taskiq_tests.private_brokers import PrivateRabbitMQ
from dagster_taskiq_tests.reliability_support import (
    in_background,
    newest_run_id,
    starts,
    successes,
    task_records,
    wait_state,
)
from dagster_taskiq_tests.services import REDIS_URL, require

CONSUMER_TIMEOUT_MS = 2000
PASSWORD = f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    """A private RabbitMQ node with a short consumer timeout and a non-guest user."""
    node = PrivateRabbitMQ(
        tmp_path_factory.mktemp("rabbit"), consumer_timeout_ms=CONSUMER_TIMEOUT_MS, tick_ms=500
    ).start()
    try:
        node.add_user("dtrel", PASSWORD, "dtrel")
        yield node
    finally:
        node.stop()


@pytest.fixture
def rabbit_settings(rabbit: PrivateRabbitMQ) -> TaskiqSettings:
    """Broker on the private node (user ``dtrel`` on vhost ``dtrel``), backend on shared Redis."""
    require(REDIS_URL, "Redis")
    rabbit.ensure_running()  # a test may have left it stopped
    uid = uuid.uuid4().hex[:8]
    return TaskiqSettings(
        broker_url=rabbit.url("dtrel", PASSWORD, "dtrel"),
        backend_url=REDIS_URL,
        default_queue=f"rel-{uid}",
        heartbeat_timeout=30.0,
        config_source={
            "key_prefix": f"rel-rmq-{uid}",
            "result_ttl": 600,
            "exchange": f"rel-{uid}",
            "connect_timeout": 5,
        },
    )


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Creating this file lets ``held`` finish; the note log goes next to it."""
    monkeypatch.setenv(rj.LOG_ENV, str(tmp_path / "notes.log"))
    path = tmp_path / "release"
    monkeypatch.setenv(rj.RELEASE_ENV, str(path))
    return path


def _run(instance: DagsterInstance, settings: TaskiqSettings, job: object) -> object:
    return execute_job(
        reconstructable(job),  # type: ignore[arg-type]
        instance=instance,
        run_config=executor_config(settings),
    )


def test_step_longer_than_consumer_timeout_runs_once(
    instance: DagsterInstance,
    rabbit_settings: TaskiqSettings,
    dagster_home: Path,
    release: Path,
) -> None:
    """A step runs for three consumer timeouts while another step of the run waits: nothing is
    delivered twice, no channel is closed for a late ack, and every step starts once."""
    settings = rabbit_settings
    workers = WorkerPool(settings, dagster_home)
    try:
        busy = workers.start(concurrency=1)
        future = in_background(lambda: _run(instance, settings, rj.hold_chain_job))
        run_id = newest_run_id(instance, set())
        started = wait_state(settings, run_id, "held", {"running"}).started_at
        assert started is not None
        other = in_background(lambda: _run(instance, settings, jobs.single_op_job))
        other_id = newest_run_id(instance, {run_id})
        wait_state(settings, other_id, "emit_one", {"queued"})
        wait_for(
            lambda: time.time() - started > 3 * CONSUMER_TIMEOUT_MS / 1000,
            30,
            interval=0.2,
            what="the step to outlive three consumer timeouts",
        )
        assert task_records(settings, other_id)["emit_one"].state == "queued"
        release.touch()
        with future.result(timeout=90) as result:
            assert result.success
        with other.result(timeout=90) as result:
            assert result.success
        assert starts(instance, run_id) == {"first": 1, "held": 1, "last": 1}
        assert starts(instance, other_id) == {"emit_one": 1}
        log = busy.log()
        assert "PRECONDITION_FAILED" not in log and "acknowledgement timed out" not in log, log
        assert "Ignoring duplicate delivery" not in log, log
    finally:
        workers.stop_all()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_rabbitmq_restart_mid_run(
    instance: DagsterInstance,
    rabbit: PrivateRabbitMQ,
    rabbit_settings: TaskiqSettings,
    dagster_home: Path,
    release: Path,
    queue_type: str,
) -> None:
    """While one step runs and another waits in its queue, the node restarts: the waiting
    message survives (durable queue, persistent message), the running step finishes during the
    outage, the orchestrator retries submitting the next step, and the worker reconsumes. On
    classic queues and on quorum queues (priority lanes): nothing is lost or run twice."""
    settings = dataclasses.replace(
        rabbit_settings, config_source={**rabbit_settings.config_source, "queue_type": queue_type}
    )
    workers = WorkerPool(settings, dagster_home)
    try:
        worker = workers.start(concurrency=1)
        held_run = in_background(lambda: _run(instance, settings, rj.hold_chain_job))
        held_id = newest_run_id(instance, set())
        wait_state(settings, held_id, "held", {"running"})
        waiting_run = in_background(lambda: _run(instance, settings, jobs.single_op_job))
        waiting_id = newest_run_id(instance, {held_id})
        wait_state(settings, waiting_id, "emit_one", {"queued"})

        rabbit.stop()
        release.touch()  # 'held' ends while RabbitMQ is down; submitting 'last' must wait
        wait_for(
            lambda: (
                "Lost the broker connection" in worker.log()
                or "Broker or backend unreachable" in worker.log()
                or "Connection attempt" in worker.log()
            ),
            60,
            what="the worker to notice the outage",
        )
        wait_state(settings, held_id, "held", {"done"})
        rabbit.start()

        with held_run.result(timeout=120) as result:
            assert result.success
        with waiting_run.result(timeout=120) as result:
            assert result.success
        assert starts(instance, held_id) == {"first": 1, "held": 1, "last": 1}
        assert successes(instance, held_id) == {"first": 1, "held": 1, "last": 1}
        assert starts(instance, waiting_id) == {"emit_one": 1}
        assert task_records(settings, waiting_id)["emit_one"].worker == worker.name
        assert worker.process is not None and worker.process.poll() is None  # same process
        assert PASSWORD not in worker.log()
        waiting = run_async(settings, lambda c: c.broker.waiting(settings.default_queue))
        assert waiting == 0

        # SIGTERM while the broker is down still stops the worker, promptly and cleanly.
        rabbit.stop()
        wait_for(lambda: "Connection attempt" in worker.log(), 30, what="the worker to notice")
        assert worker.process is not None
        stop_at = time.monotonic()
        assert worker.stop(timeout=20) == 0
        assert time.monotonic() - stop_at < 15
    finally:
        workers.stop_all()
