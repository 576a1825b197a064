"""Cheaper database connections for the storage of a task process.

A step's process writes a dozen events or more to the event log. Dagster's storages are built
for long-lived processes that must not hold connections open, so they connect afresh for every
write:

* **PostgreSQL / MySQL** storages use a ``NullPool``: every event opens (and authenticates) a new
  connection. A task process is short-lived and single-purpose, so it keeps one pooled
  connection per storage instead, through Dagster's own
  :meth:`~dagster.DagsterInstance.optimize_for_webserver` (which the webserver uses for the same
  reason). No statement timeout is set.
* **SQLite** storage (Dagster's default: ``runs.db``, plus one event database per run) builds a
  new SQLAlchemy engine for every query, and with it SQLAlchemy's dialect initialization. Here
  the engine of each database is built once, in the worker, and reused (still without a pool:
  each query opens and closes its own SQLite connection, as before). Forked children inherit
  the built engines; an engine without a pool holds no connection that a fork could share.

Both are used only inside workers. Anything unexpected in Dagster's internals leaves the storage
as it is.
"""

import collections
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from dagster import DagsterInstance
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

logger = logging.getLogger("dagster_taskiq.worker")

#: Engines of run databases a worker keeps (one per recent run shard).
MAX_SQLITE_ENGINES = 16
#: Seconds after which a pooled connection of a task process is replaced.
POOL_RECYCLE_SECONDS = 3600
#: Connections a task process may open beyond its pooled one (threads in user code).
POOL_MAX_OVERFLOW = 10


def pool_connections_in_task_process(instance: DagsterInstance) -> None:
    """In a task process: keep one database connection per storage instead of one per query."""
    try:
        instance.optimize_for_webserver(
            statement_timeout=0, pool_recycle=POOL_RECYCLE_SECONDS, max_overflow=POOL_MAX_OVERFLOW
        )
    except Exception:
        logger.debug("Could not pool the storage connections of a task process.", exc_info=True)


def reuse_sqlite_engines(instance: DagsterInstance) -> bool:
    """In a worker: build the engines of SQLite storage once. True if now in effect."""
    runs = _reuse_run_storage_engine(instance)
    events = _reuse_event_log_engines(instance)
    return runs or events


def _reuse_run_storage_engine(instance: DagsterInstance) -> bool:
    """``SqliteRunStorage.connect`` with its one database's engine built once."""
    from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage

    storage: Any = instance.run_storage
    if not isinstance(storage, SqliteRunStorage) or getattr(storage, "_dtq_engine", None):
        return False
    conn_string = getattr(storage, "_conn_string", None)
    if not isinstance(conn_string, str):
        return False
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(conn_string, poolclass=NullPool)

    @contextlib.contextmanager
    def connect() -> Iterator[Any]:
        with engine.connect() as conn:
            with conn.begin():
                yield conn

    patched: Any = storage
    patched._dtq_engine = engine
    patched.connect = connect
    return True


def _reuse_event_log_engines(instance: DagsterInstance) -> bool:
    storage = instance.event_log_storage
    if not isinstance(storage, SqliteEventLogStorage) or getattr(storage, "_dtq_engines", None):
        return False
    needed = ("_db_lock", "_initialized_dbs", "_initdb", "conn_string_for_shard")
    if not all(hasattr(storage, name) for name in needed):
        return False
    engines = _EngineCache(storage)
    storage._dtq_engines = engines  # type: ignore[attr-defined]
    storage._connect = engines.connect  # type: ignore[method-assign]
    return True


class _EngineCache:
    """``SqliteEventLogStorage._connect`` with the engine of each shard built once."""

    def __init__(self, storage: SqliteEventLogStorage) -> None:
        self._storage = storage
        self._engines: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _engine(self, shard: str) -> Any:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        with self._lock:
            engine = self._engines.get(shard)
            if engine is not None:
                self._engines.move_to_end(shard)
                return engine
            engine = sqlalchemy.create_engine(
                self._storage.conn_string_for_shard(shard),
                poolclass=NullPool,
                connect_args={"timeout": _busy_timeout()},
            )
            self._engines[shard] = engine
            while len(self._engines) > MAX_SQLITE_ENGINES:
                _, dropped = self._engines.popitem(last=False)
                dropped.dispose()
            return engine

    @contextlib.contextmanager
    def connect(self, shard: str) -> Iterator[Any]:
        storage: Any = self._storage
        with storage._db_lock:
            engine = self._engine(shard)
            if shard not in storage._initialized_dbs:
                storage._initdb(engine)
                storage._initialized_dbs.add(shard)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn


def _busy_timeout() -> float:
    from dagster._core.storage.event_log.sqlite import sqlite_event_log

    return float(getattr(sqlite_event_log, "SQLITE_BUSY_TIMEOUT_SECONDS", 30.0))
