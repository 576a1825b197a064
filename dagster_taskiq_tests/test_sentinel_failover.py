"""Redis behind Sentinel: a job's master is SIGKILLed mid-run and the sentinels promote the replica.

A private master, replica and three sentinels (:mod:`dagster_taskiq_tests.private_sentinel`) are
the broker, the result backend and the key store, all through one ``redis+sentinel://`` URL with
a password. The ``held`` step is running when the master dies and finishes during the failover,
so the worker must reconnect to the new master to record its outcome and the orchestrator to
submit the next step. The run succeeds, every step starts exactly once, and what the key store
held before the failover is still there.
"""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq_tests import reliability_jobs as rj
from dagster_taskiq_tests.harness import WorkerPool, run_async, wait_for
from dagster_taskiq_tests.private_sentinel import PrivateSentinelGroup
from dagster_taskiq_tests.reliability_support import (
    hold_chain_in_background,
    starts,
    successes,
    task_records,
    wait_state,
)

PASSWORD = "sentinel-test-pw"
STEPS = ("first", "held", "last")


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[PrivateSentinelGroup]:
    """A private master + replica + three sentinels (1 s down-after) on loopback."""
    group = PrivateSentinelGroup(tmp_path / "sentinel", password=PASSWORD).start()
    try:
        yield group
    finally:
        group.stop()


def test_sentinel_failover_mid_run(
    instance: DagsterInstance,
    sentinel_group: PrivateSentinelGroup,
    dagster_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log, release = tmp_path / "notes.log", tmp_path / "release"
    monkeypatch.setenv(rj.LOG_ENV, str(log))
    monkeypatch.setenv(rj.RELEASE_ENV, str(release))
    url = sentinel_group.url(db=2)
    uid = uuid.uuid4().hex[:8]
    settings = TaskiqSettings(
        broker_url=url,
        backend_url=url,
        default_queue=f"sentinel-{uid}",
        heartbeat_timeout=30.0,
        config_source={"key_prefix": f"sentinel-{uid}", "result_ttl": 600, "connect_timeout": 5},
    )
    workers = WorkerPool(settings, dagster_home)
    try:
        worker = workers.start(concurrency=2)
        future = hold_chain_in_background(instance, settings)
        run_id = wait_for(
            lambda: next((r.run_id for r in instance.get_runs()), None), 60, what="the run"
        )
        wait_state(settings, run_id, "held", {"running"})
        first = wait_state(settings, run_id, "first", {"done"})
        # What the failover must not lose: written and replicated before the kill.
        sentinel_group.wait_replicated()
        old = sentinel_group.kill_master()
        release.touch()  # 'held' ends while the sentinels are still failing over
        new = sentinel_group.wait_failover(old)
        assert new.port != old.port

        with future.result(timeout=180) as result:
            assert result.success, sentinel_group.logs()
        assert starts(instance, run_id) == dict.fromkeys(STEPS, 1)
        assert successes(instance, run_id) == dict.fromkeys(STEPS, 1)
        # Each op body ran once, in whichever worker child took it.
        bodies = [what for _, what in rj.notes(log, run_id) if what.startswith("start ")]
        assert sorted(bodies) == sorted(f"start {step}" for step in STEPS)
        # The key store on the new master: every task reaches done, the old result is readable.
        for step_key in STEPS:
            wait_state(settings, run_id, step_key, {"done"}, timeout=60.0)
        assert set(task_records(settings, run_id)) == set(STEPS)
        outcome = run_async(settings, lambda c: c.outcome(first.task_id))
        assert outcome is not None and outcome.status == "success"
        # The worker rode out the failover in the same process, and never logged the password.
        assert worker.process is not None and worker.process.poll() is None
        assert PASSWORD not in worker.log()
    finally:
        workers.stop_all()
