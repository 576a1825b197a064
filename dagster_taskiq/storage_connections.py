"""Cheaper database connections for task processes and for the orchestrating process.

A step's process writes a dozen events or more to the event log. Dagster's storages are built
for long-lived processes that must not hold connections open, so they connect afresh for every
write:

* **PostgreSQL / MySQL** storages use a ``NullPool``: every event opens (and authenticates) a new
  connection. A task process is short-lived and single-purpose, so it keeps one pooled
  connection per storage instead, through Dagster's own
  :meth:`~dagster.DagsterInstance.optimize_for_webserver` (which the webserver uses for the same
  reason). No statement timeout is set.
* **SQLite** storage (Dagster's default: ``runs.db``, plus one event database per run, in WAL
  mode) builds a new SQLAlchemy engine for every query, and with it SQLAlchemy's dialect
  initialization, and checks each run database's schema with alembic (loading its migration
  scripts) the first time a process touches it. Here the engine of each database is built once
  per worker and the schema check is one query. Forked children inherit the built engines; an
  engine without a pool holds no connection that a fork could share.

  Task processes, and the orchestrating process while it runs a ``taskiq_executor`` run, go one
  step further and keep one connection per event database open. Besides the connect/close per
  event, that spares SQLite's work at each close: the last connection to a WAL database to
  close checkpoints it and deletes its WAL file, which the next event's connection then creates
  again. With a connection held open, SQLite checkpoints as the WAL grows instead.

A connection must never be carried across ``fork``: before any fork of a process that keeps
connections (user code may fork), they are closed, with the storage's lock held so that no query
is in flight, and the forked process connects per query. Anything unexpected in Dagster's
internals leaves the storage as it is.
"""

import collections
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from dagster import DagsterInstance

from dagster_taskiq.compat import SqliteEventLogStorage

logger = logging.getLogger("dagster_taskiq")

#: Engines of run databases a worker keeps (one per recent run shard).
MAX_SQLITE_ENGINES = 16
#: Seconds after which a pooled connection of a task process is replaced.
POOL_RECYCLE_SECONDS = 3600
#: Connections a task process may open beyond its pooled one (threads in user code).
POOL_MAX_OVERFLOW = 10
#: Longest a fork in a task process waits for a running event-log query to end.
FORK_LOCK_TIMEOUT_SECONDS = 10.0


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


def keep_sqlite_connections_open(instance: DagsterInstance) -> None:
    """In a task process: keep one open connection per SQLite event-log database from now on."""
    engines = getattr(instance.event_log_storage, "_dtq_engines", None)
    if isinstance(engines, _EngineCache):
        engines.keep_connections_open()


def rehearse_event_insert(instance: DagsterInstance, entry: Any) -> bool:
    """Run the insert that storing ``entry`` would run, in a transaction that is rolled back.

    SQLAlchemy compiles a statement once per engine; a worker's children inherit the engines of
    its SQLite storage, so one rehearsal in the worker spares every child the compilation. Other
    storages are left alone (False): their children build their own engines.
    """
    storage: Any = instance.event_log_storage
    engines = getattr(storage, "_dtq_engines", None)
    if not isinstance(engines, _EngineCache) or not hasattr(storage, "prepare_insert_event"):
        return False
    engines.rehearse(entry.run_id, storage.prepare_insert_event(entry))
    return True


def close_sqlite_connections(instance: DagsterInstance) -> None:
    """Close the connections :func:`keep_sqlite_connections_open` kept (at a task's end)."""
    engines = getattr(instance.event_log_storage, "_dtq_engines", None)
    if isinstance(engines, _EngineCache):
        engines.close_kept_connections()


def _reuse_run_storage_engine(instance: DagsterInstance) -> bool:
    """``SqliteRunStorage.connect`` with its one database's engine built once."""
    from dagster_taskiq.compat import SqliteRunStorage

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


@contextlib.contextmanager
def sqlite_event_log_kept_open(instance: DagsterInstance) -> Iterator[bool]:
    """For the duration: the instance's SQLite event databases are each used through one
    connection kept open (engines built once); afterwards the storage is as it was.

    For the orchestrating process of a run. Yields whether it took effect (False for other
    storages, or when the storage already works this way, as in a worker's run process).
    """
    engines = _patch_event_log_storage(instance)
    if engines is None:
        yield False
        return
    engines.keep_connections_open()
    try:
        yield True
    finally:
        engines.close_kept_connections()
        storage: Any = instance.event_log_storage
        for name in ("_connect", "_dtq_engines"):
            with contextlib.suppress(AttributeError):
                delattr(storage, name)
        engines.dispose()


def _reuse_event_log_engines(instance: DagsterInstance) -> bool:
    return _patch_event_log_storage(instance) is not None


def _patch_event_log_storage(instance: DagsterInstance) -> "_EngineCache | None":
    storage = instance.event_log_storage
    if not isinstance(storage, SqliteEventLogStorage) or getattr(storage, "_dtq_engines", None):
        return None
    needed = ("_db_lock", "_initialized_dbs", "_initdb", "conn_string_for_shard")
    if not all(hasattr(storage, name) for name in needed):
        return None
    engines = _EngineCache(storage)
    storage._dtq_engines = engines  # type: ignore[attr-defined]
    storage._connect = engines.connect  # type: ignore[method-assign]
    return engines


class _EngineCache:
    """``SqliteEventLogStorage._connect`` with the engine of each shard built once."""

    def __init__(self, storage: SqliteEventLogStorage) -> None:
        self._storage = storage
        self._engines: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        #: Open connection per shard, in a task process (None: connect for every query).
        self._kept: dict[str, Any] | None = None
        self._fork_hooks_registered = False
        self._locked_for_fork = False

    def keep_connections_open(self) -> None:
        """From now on, keep each shard's connection open between queries (task processes only).

        A connection must never be carried across a ``fork``: if user code forks this process,
        the kept connections are closed first (with no query in flight: the storage's lock is
        held across the fork), and the forked process connects per query again.
        """
        if self._kept is not None:
            return
        self._kept = {}
        if not self._fork_hooks_registered:
            self._fork_hooks_registered = True
            # Hooks cannot be unregistered: they hold this cache weakly.
            ref = weakref.ref(self)
            os.register_at_fork(
                before=_weak_hook(ref, _EngineCache._before_fork),
                after_in_parent=_weak_hook(ref, _EngineCache._release_after_fork),
                after_in_child=_weak_hook(ref, _EngineCache._after_fork_in_child),
            )

    def _before_fork(self) -> None:
        lock: Any = self._storage._db_lock  # type: ignore[attr-defined]
        self._locked_for_fork = lock.acquire(timeout=FORK_LOCK_TIMEOUT_SECONDS)
        kept, self._kept = self._kept, ({} if self._kept is not None else None)
        for conn in (kept or {}).values():
            with contextlib.suppress(Exception):
                conn.close()

    def _release_after_fork(self) -> None:
        if self._locked_for_fork:
            self._locked_for_fork = False
            self._storage._db_lock.release()  # type: ignore[attr-defined]

    def _after_fork_in_child(self) -> None:
        self._kept = None
        self._release_after_fork()

    def close_kept_connections(self) -> None:
        """Close the kept connections and connect per query again."""
        with self._storage._db_lock:  # type: ignore[attr-defined]
            kept, self._kept = self._kept, None
        for conn in (kept or {}).values():
            with contextlib.suppress(Exception):
                conn.close()

    def dispose(self) -> None:
        """Drop the built engines (their connections are closed already)."""
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for engine in engines:
            engine.dispose()

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
                dropped_shard, dropped = self._engines.popitem(last=False)
                kept = self._kept.pop(dropped_shard, None) if self._kept is not None else None
                if kept is not None:
                    with contextlib.suppress(Exception):
                        kept.close()
                dropped.dispose()
            return engine

    def rehearse(self, shard: str, statement: Any) -> None:
        """Execute ``statement`` on ``shard`` and roll it back (compiles it into the engine)."""
        with self.connect_uncommitted(shard) as conn:
            conn.execute(statement)

    @contextlib.contextmanager
    def connect_uncommitted(self, shard: str) -> Iterator[Any]:
        """A connection to ``shard`` in a transaction that is always rolled back."""
        with self._storage._db_lock:  # type: ignore[attr-defined]
            engine = self._engine(shard)
            with engine.connect() as conn:
                transaction = conn.begin()
                try:
                    yield conn
                finally:
                    transaction.rollback()

    @contextlib.contextmanager
    def connect(self, shard: str) -> Iterator[Any]:
        storage: Any = self._storage
        with storage._db_lock:
            engine = self._engine(shard)
            if shard not in storage._initialized_dbs:
                if not _is_stamped(engine):
                    storage._initdb(engine)
                storage._initialized_dbs.add(shard)
            if self._kept is None:
                with engine.connect() as conn:
                    with conn.begin():
                        yield conn
                return
            conn = self._kept.get(shard)
            if conn is None or conn.closed or conn.invalidated:
                conn = engine.connect()
                self._kept[shard] = conn
            with conn.begin():
                yield conn


def _weak_hook(
    ref: "weakref.ReferenceType[_EngineCache]", method: Callable[["_EngineCache"], None]
) -> Callable[[], None]:
    def hook() -> None:
        engines = ref()
        if engines is not None:
            method(engines)

    return hook


def _is_stamped(engine: Any) -> bool:
    """Whether the database already has a schema revision, the one case in which Dagster's
    ``_initdb`` does nothing. Checked with one query instead of loading alembic's migration
    scripts (tens of milliseconds), which ``_initdb`` does for every new run in every worker."""
    import sqlalchemy

    try:
        with engine.connect() as conn:
            row = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).first()
    except sqlalchemy.exc.DBAPIError:
        return False
    return row is not None and bool(row[0])


def _busy_timeout() -> float:
    from dagster_taskiq.compat import sqlite_event_log

    return float(getattr(sqlite_event_log, "SQLITE_BUSY_TIMEOUT_SECONDS", 30.0))
