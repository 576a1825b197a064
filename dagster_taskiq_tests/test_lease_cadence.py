"""A worker with a slow heartbeat still keeps a short lease (real Redis, worker and instance).

The lease guard stops a step ``T/2`` after its last good renewal. Renewals used to ride on the
worker's heartbeat, so a worker started with ``--heartbeat-interval`` longer than ``T/2`` stopped
every step while it was healthy: here ``T`` is 4 s (SIGTERM after 2 s without a renewal) and the
worker beats every 10 s. The step runs for more than ``T`` and must finish, started once.
"""

import time
from pathlib import Path

import pytest
from dagster import DagsterInstance

from dagster_taskiq_tests import reliability_jobs as rj
from dagster_taskiq_tests.harness import WorkerPool, isolated_settings, wait_for
from dagster_taskiq_tests.reliability_support import hold_chain_in_background, starts, wait_state
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, require

TIMEOUT = 4.0
SLOW_BEAT = 10.0


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Creating this file lets the ``held`` op finish."""
    path = tmp_path / "release"
    monkeypatch.setenv(rj.RELEASE_ENV, str(path))
    return path


def test_a_slow_heartbeat_does_not_stop_a_healthy_step(
    instance: DagsterInstance, dagster_home: Path, release: Path
) -> None:
    require(REDIS_URL, "Redis")
    settings = isolated_settings("redis", REDIS_URL, AMQP_URL, heartbeat_timeout=TIMEOUT)
    pool = WorkerPool(settings, dagster_home)
    try:
        worker = pool.start(extra_args=["--heartbeat-interval", str(SLOW_BEAT)])
        future = hold_chain_in_background(instance, settings)
        run_id = wait_for(lambda: next((r.run_id for r in instance.get_runs()), None), 60)
        started = wait_state(settings, run_id, "held", {"running"}, timeout=60).started_at
        assert started is not None
        # Past the SIGTERM (2 s) and SIGKILL (3 s) deadlines of a lease renewed only at the
        # start, and past the lease's own TTL: only renewals between beats keep the step alive.
        wait_for(
            lambda: time.time() - started > 1.5 * TIMEOUT,
            30,
            interval=0.2,
            what="the step to outlive its heartbeat_timeout",
        )
        held = wait_state(settings, run_id, "held", {"running"}, timeout=5)
        assert held.started_at == started  # still the first attempt, still running
        release.touch()
        with future.result(timeout=60) as result:
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            assert starts(instance, result.run_id) == {"first": 1, "held": 1, "last": 1}
        assert "stopping its process" not in worker.log(), worker.log()
    finally:
        pool.stop_all()
