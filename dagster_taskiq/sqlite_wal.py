"""Keep a run's SQLite event database open while the run is orchestrated.

Dagster's default SQLite storage keeps each run's events in a database of its own, in WAL mode,
and opens a connection for every query. When the last connection to a WAL database closes,
SQLite checkpoints the log into the database, syncs it and deletes the WAL file; the next
connection creates the WAL and its index again. While the steps of a run write their events from
several processes, that happens many times a second. One connection held open by the
orchestrating process for the run's duration makes every other close a plain close, and lets
SQLite checkpoint the log as it grows instead (automatically, every 1,000 pages).

The held connection reads the database once (to join the WAL) and then stays idle, outside any
transaction, so it takes no lock that could hold up a writer. The orchestrating process of a
``taskiq_executor`` run runs no user code and forks nothing while it holds it (a connection must
never be carried across ``fork``).
"""

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator

from dagster import DagsterInstance
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

logger = logging.getLogger("dagster_taskiq")


@contextlib.contextmanager
def hold_run_event_log_open(instance: DagsterInstance, run_id: str) -> Iterator[bool]:
    """Hold the run's SQLite event database open in this process; yields whether it is held.

    Does nothing (yields False) for any other storage, or if the database cannot be opened.
    """
    connection = _open_run_database(instance, run_id)
    try:
        yield connection is not None
    finally:
        if connection is not None:
            with contextlib.suppress(sqlite3.Error):
                connection.close()


def _open_run_database(instance: DagsterInstance, run_id: str) -> sqlite3.Connection | None:
    storage = instance.event_log_storage
    if not isinstance(storage, SqliteEventLogStorage):
        return None
    path = storage.path_for_shard(run_id)
    if not os.path.exists(path):  # created by the run's first event; never create it here
        return None
    try:
        connection = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
        return connection
    except sqlite3.Error as exc:
        logger.debug("Could not hold run %s's event database open: %s", run_id, exc)
        return None
