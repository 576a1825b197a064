"""A worker opens its own Dagster instance ahead of the first task, but never creates storage
(no network needed)."""

from pathlib import Path

from dagster import DagsterInstance

from dagster_taskiq.worker.warm import WarmCache, instance_storage_exists


def test_a_fresh_sqlite_home_is_left_for_dagster_to_create(dagster_home: Path) -> None:
    """Creating the default SQLite storage could race the webserver or an orchestrator doing the
    same: the worker leaves a home without its run database alone."""
    cache = WarmCache()
    assert not cache.preload_own_instance()
    assert not (dagster_home / "history" / "runs.db").exists()


def test_an_existing_home_is_open_before_the_first_task(dagster_home: Path) -> None:
    """Once the storage exists, the worker opens it early, and a task whose instance ref is the
    worker's own (a ref built by another process from the same home) gets that instance."""
    with DagsterInstance.get() as orchestrator:  # creates the storage, as the webserver would
        ref = orchestrator.get_ref()
    assert instance_storage_exists(dagster_home)
    cache = WarmCache()
    assert cache.preload_own_instance()
    assert cache.instance(ref) is cache.own_instance()


def test_a_configured_storage_counts_as_existing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url: postgresql://postgres@127.0.0.1:5432/x\n"
    )
    assert instance_storage_exists(home)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert not instance_storage_exists(home)
