"""How workers and orchestrators use Dagster's default SQLite storage (no network needed).

A task process keeps one connection per event database for its life, even across a ``fork`` by
user code; the orchestrating process keeps its connection to the run's event database open while
it runs the run, so that SQLite does not checkpoint and delete the WAL each time a writer closes
its connection. A worker checks a run database's schema with one query, not with alembic.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRun

from dagster_taskiq.storage_connections import (
    close_sqlite_connections,
    keep_sqlite_connections_open,
    reuse_sqlite_engines,
    sqlite_event_log_kept_open,
)
from dagster_taskiq_tests import jobs


@pytest.fixture
def sqlite_instance(dagster_home: Path) -> Iterator[DagsterInstance]:
    """A worker's view of a fresh SQLite instance: engines built once, as workers build them."""
    with DagsterInstance.get() as instance:
        assert reuse_sqlite_engines(instance)
        yield instance


def _count_connects(instance: DagsterInstance, run_id: str) -> list[int]:
    """A counter of new SQLite connections to the run's event database."""
    import sqlalchemy

    storage: Any = instance.event_log_storage
    engine = storage._dtq_engines._engine(run_id)
    opened = [0]

    def _on_connect(*_: Any) -> None:
        opened[0] += 1

    sqlalchemy.event.listen(engine, "connect", _on_connect)
    return opened


def _messages(instance: DagsterInstance, run: DagsterRun, prefix: str) -> list[str]:
    return [e.message for e in instance.all_logs(run.run_id) if e.message.startswith(prefix)]


def _wal_path(instance: DagsterInstance, run_id: str) -> Path:
    storage: Any = instance.event_log_storage
    return Path(storage.path_for_shard(run_id) + "-wal")


def test_task_process_keeps_one_connection_per_event_database(
    sqlite_instance: DagsterInstance,
) -> None:
    """Per-query connections until a task process asks to keep them; then one serves all
    events, and closing it goes back to per-query connections."""
    instance = sqlite_instance
    run = instance.create_run_for_job(jobs.single_op_job)
    instance.report_engine_event("first", run)
    opened = _count_connects(instance, run.run_id)

    for n in range(3):
        instance.report_engine_event(f"unkept {n}", run)
    assert opened[0] == 3

    keep_sqlite_connections_open(instance)
    try:
        for n in range(10):
            instance.report_engine_event(f"kept {n}", run)
        assert len(instance.all_logs(run.run_id)) == 14
        assert opened[0] == 4
    finally:
        close_sqlite_connections(instance)

    instance.report_engine_event("after", run)
    assert opened[0] == 5  # connected again
    assert _messages(instance, run, "kept") == [f"kept {n}" for n in range(10)]


def test_fork_in_task_process_closes_kept_connections_first(
    sqlite_instance: DagsterInstance,
) -> None:
    """User code that forks a task process: the fork never carries a kept connection, both
    processes go on writing, and no event is lost."""
    instance = sqlite_instance
    run = instance.create_run_for_job(jobs.single_op_job)
    keep_sqlite_connections_open(instance)
    try:
        instance.report_engine_event("parent before", run)
        engines: Any = instance.event_log_storage._dtq_engines  # type: ignore[attr-defined]
        assert engines._kept and run.run_id in engines._kept

        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the forked process reports through the pipe
            code = 1
            try:
                kept_in_child = engines._kept
                for n in range(5):
                    instance.report_engine_event(f"child {n}", run)
                code = 0 if kept_in_child is None and engines._kept is None else 2
            finally:
                os.write(write_fd, bytes([code]))
                os._exit(code)
        os.close(write_fd)
        assert not engines._kept, "the parent's connections are closed before the fork"
        for n in range(5):
            instance.report_engine_event(f"parent {n}", run)
        _, status = os.waitpid(pid, 0)
        assert os.read(read_fd, 1) == b"\x00"
        os.close(read_fd)
        assert os.waitstatus_to_exitcode(status) == 0
        assert engines._kept is not None, "the parent keeps connections again"
        assert not engines._storage._db_lock.locked()
    finally:
        close_sqlite_connections(instance)
    assert _messages(instance, run, "child") == [f"child {n}" for n in range(5)]
    assert _messages(instance, run, "parent ") == ["parent before"] + [
        f"parent {n}" for n in range(5)
    ]


def test_orchestrator_keeps_the_event_database_open_for_the_run(dagster_home: Path) -> None:
    """Without a kept connection, each writer's close checkpoints and deletes the WAL. While a run
    is orchestrated its connection stays open, so the WAL stays; afterwards the storage is as
    Dagster built it, and every event is stored."""
    with DagsterInstance.get() as instance:
        run = instance.create_run_for_job(jobs.single_op_job)
        instance.report_engine_event("created", run)
        wal = _wal_path(instance, run.run_id)
        assert not wal.exists()
        storage: Any = instance.event_log_storage

        with sqlite_event_log_kept_open(instance) as kept:
            assert kept
            opened = _count_connects(instance, run.run_id)
            for n in range(5):
                instance.report_engine_event(f"held {n}", run)
                assert wal.exists()
            assert len(instance.all_logs(run.run_id)) == 6
            assert opened[0] == 1
        assert not wal.exists()  # the kept connection was the last: closing it checkpointed
        assert "_connect" not in vars(storage) and not hasattr(storage, "_dtq_engines")
        assert _messages(instance, run, "held") == [f"held {n}" for n in range(5)]


def test_keeping_open_does_nothing_for_other_or_already_kept_storage(dagster_home: Path) -> None:
    """Not SQLite storage, or a worker's storage that keeps its connections already: no change."""
    with DagsterInstance.ephemeral() as ephemeral:
        with sqlite_event_log_kept_open(ephemeral) as kept:
            assert not kept
    with DagsterInstance.get() as instance:
        assert reuse_sqlite_engines(instance)
        storage: Any = instance.event_log_storage
        engines = storage._dtq_engines
        with sqlite_event_log_kept_open(instance) as kept:
            assert not kept
        assert storage._dtq_engines is engines


def test_worker_checks_a_run_database_schema_with_one_query(
    sqlite_instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run database that Dagster already created and stamped is not checked with alembic
    again; a new one is created by Dagster's own schema set-up."""
    instance = sqlite_instance
    storage: Any = instance.event_log_storage
    initialized: list[str] = []
    original_initdb = storage._initdb

    def counting_initdb(engine: Any, *args: Any, **kwargs: Any) -> None:
        initialized.append(str(engine.url))
        original_initdb(engine, *args, **kwargs)

    monkeypatch.setattr(storage, "_initdb", counting_initdb)
    with DagsterInstance.get() as orchestrator:  # another process's view: Dagster's own code
        run = orchestrator.create_run_for_job(jobs.single_op_job)
        orchestrator.report_engine_event("created by the orchestrator", run)
    instance.report_engine_event("written by the worker", run)
    assert initialized == []

    fresh = instance.create_run_for_job(jobs.single_op_job)
    instance.report_engine_event("first event of a new run", fresh)
    assert len(initialized) == 1 and fresh.run_id in initialized[0]
    assert len(instance.all_logs(run.run_id)) == 2
    assert len(instance.all_logs(fresh.run_id)) == 1


def test_rehearsal_compiles_a_step_process_statements_and_stores_nothing(
    sqlite_instance: DagsterInstance,
) -> None:
    """A worker's rehearsal leaves the run's event log as it was, yet the statements a step's
    process runs first (the event insert, ``verify_step``'s statistics query) are compiled in
    the engine its forked children inherit: running them afterwards compiles nothing new."""
    from dagster_taskiq.compat import ExecutionPlan, ResolvedRunConfig
    from dagster_taskiq.worker.rehearsal import rehearse_step_process

    instance = sqlite_instance
    run = instance.create_run_for_job(jobs.single_op_job)
    instance.report_engine_event("first", run)
    stored_before = len(instance.all_logs(run.run_id))
    job_def = jobs.single_op_job
    plan = ExecutionPlan.build(job_def, ResolvedRunConfig.build(job_def, {}))
    storage: Any = instance.event_log_storage
    compiled = storage._dtq_engines._engine(run.run_id)._compiled_cache

    rehearse_step_process(instance, run, plan)

    assert len(instance.all_logs(run.run_id)) == stored_before
    entries = len(compiled)
    instance.report_engine_event("a step's first event", run)
    instance.get_run_step_stats(run.run_id, step_keys=[plan.steps[0].key])
    assert len(compiled) == entries
    assert len(instance.all_logs(run.run_id)) == stored_before + 1
