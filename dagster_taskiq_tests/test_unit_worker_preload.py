"""A worker opens its own Dagster instance ahead of the first task only when that cannot race
the creation of its storage (no network needed for the SQLite cases)."""

from pathlib import Path

from dagster import DagsterInstance

from dagster_taskiq.worker.warm import WarmCache, instance_storage_exists


def test_sqlite_storage_is_never_opened_early(dagster_home: Path) -> None:
    """Opening SQLite storage while ``dagster dev`` creates it can meet a half-made schema: the
    worker leaves SQLite homes alone, fresh or not."""
    cache = WarmCache()
    assert not cache.preload_own_instance()
    assert not (dagster_home / "history" / "runs.db").exists()
    with DagsterInstance.get():  # the storage now exists
        pass
    assert not WarmCache().preload_own_instance()


def test_server_storage_counts_and_sqlite_does_not(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url: postgresql://postgres@127.0.0.1:5432/x\n"
    )
    assert instance_storage_exists(home)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert not instance_storage_exists(home)
    (home / "dagster.yaml").write_text("storage:\n  sqlite:\n    base_dir: /tmp/x\n")
    assert not instance_storage_exists(home)

