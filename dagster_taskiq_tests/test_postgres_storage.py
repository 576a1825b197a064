"""PostgreSQL instance storage, the production set-up: workers share it with the orchestrator, and a
task process keeps one pooled connection per storage instead of connecting for every event."""

import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.storage_connections import pool_connections_in_task_process
from dagster_taskiq_tests import jobs
from dagster_taskiq_tests.harness import WorkerPool, executor_config
from dagster_taskiq_tests.services import require

POSTGRES_URL = os.environ.get(
    "DAGSTER_TASKIQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh, empty database on the local PostgreSQL; dropped afterwards."""
    require(POSTGRES_URL, "PostgreSQL")
    import psycopg2

    name = f"dtq_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(POSTGRES_URL)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        # Name the driver: SQLAlchemy 2.1 would otherwise pick psycopg 3, which is not installed.
        base = POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
        yield f"{base}/{name}"
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture
def postgres_home(
    tmp_path: Path, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A DAGSTER_HOME whose runs, events and schedules live in ``postgres_database``."""
    home = tmp_path / "pg_home"
    home.mkdir()
    config = {
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_url": postgres_database}},
    }
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    yield home


def _count_new_connections(engine: Any) -> list[int]:
    import sqlalchemy

    opened = [0]

    def _on_connect(*_: Any) -> None:
        opened[0] += 1

    sqlalchemy.event.listen(engine, "connect", _on_connect)
    return opened


def test_task_process_keeps_one_connection_per_storage(postgres_home: Path) -> None:
    """Without pooling every event opens a connection; in a task process, one serves them all."""
    with DagsterInstance.get() as instance:
        run = instance.create_run_for_job(jobs.single_op_job)
        storage: Any = instance.event_log_storage

        opened = _count_new_connections(storage._engine)
        for n in range(5):
            instance.report_engine_event(f"unpooled {n}", run)
        assert opened[0] >= 5

        pool_connections_in_task_process(instance)
        opened = _count_new_connections(storage._engine)
        for n in range(10):
            instance.report_engine_event(f"pooled {n}", run)
        assert instance.get_run_by_id(run.run_id) is not None
        assert opened[0] == 1
        messages = [e.message for e in instance.all_logs(run.run_id)]
        assert [m for m in messages if m.startswith("pooled")] == [f"pooled {n}" for n in range(10)]


@pytest.mark.parametrize("broker_kind", ["redis"], indirect=True)
def test_fanout_on_postgres_storage(postgres_home: Path, settings: TaskiqSettings) -> None:
    """Two workers and the orchestrator share a PostgreSQL instance; every step runs once."""
    pool = WorkerPool(settings, postgres_home)
    try:
        pool.start()
        pool.start()
        with DagsterInstance.get() as instance:
            with execute_job(
                reconstructable(jobs.fanout_job), instance, run_config=executor_config(settings)
            ) as result:
                assert result.success
                starts = Counter(
                    e.step_key
                    for e in result.all_events
                    if e.event_type == DagsterEventType.STEP_START
                )
                assert set(starts.values()) == {1} and len(starts) == 12
                assert result.output_for_node("collect") == 20
    finally:
        pool.stop_all()


def test_worker_opens_a_postgres_instance_before_the_first_task(postgres_home: Path) -> None:
    """A task whose instance ref is the worker's own (built by another process from the same
    ``dagster.yaml``) gets the instance the worker opened early."""
    from dagster_taskiq.worker.warm import WarmCache

    with DagsterInstance.get() as orchestrator:
        ref = orchestrator.get_ref()
    cache = WarmCache()
    assert cache.preload_own_instance()
    try:
        assert cache.instance(ref) is cache.own_instance()
    finally:
        cache.own_instance().dispose()
