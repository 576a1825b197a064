"""How workers and orchestrators use Dagster's default SQLite storage (no network needed).

A task process keeps one connection per event database for its life, even across a ``fork`` by
user code; the orchestrating process holds the run's event database open, so that SQLite does
not checkpoint and delete the WAL each time a writer closes its connection.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRun

from dagster_taskiq.sqlite_wal import hold_run_event_log_open
from dagster_taskiq.worker.storage_connections import (
    close_sqlite_connections,
    keep_sqlite_connections_open,
    reuse_sqlite_engines,
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


def test_holding_the_run_database_open_keeps_its_wal(dagster_home: Path) -> None:
    """Without a held connection, each writer's close checkpoints and deletes the WAL; while the
    orchestrator holds the database open, the WAL stays and every event is still stored."""
    with DagsterInstance.get() as instance:
        run = instance.create_run_for_job(jobs.single_op_job)
        instance.report_engine_event("created", run)
        wal = _wal_path(instance, run.run_id)
        assert not wal.exists()

        with hold_run_event_log_open(instance, run.run_id) as held:
            assert held
            for n in range(5):
                instance.report_engine_event(f"held {n}", run)
                assert wal.exists()
        assert not wal.exists()  # the held connection was the last: closing it checkpointed
        assert _messages(instance, run, "held") == [f"held {n}" for n in range(5)]


def test_holding_open_does_nothing_without_a_sqlite_run_database(dagster_home: Path) -> None:
    """No database for the run yet (never created here), or not SQLite storage: nothing held."""
    with DagsterInstance.get() as instance:
        storage: Any = instance.event_log_storage
        with hold_run_event_log_open(instance, "no-such-run") as held:
            assert not held
        assert not os.path.exists(storage.path_for_shard("no-such-run"))
    with DagsterInstance.ephemeral() as ephemeral:
        run = ephemeral.create_run_for_job(jobs.single_op_job)
        with hold_run_event_log_open(ephemeral, run.run_id) as held:
            assert not held
