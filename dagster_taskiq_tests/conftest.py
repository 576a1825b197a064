"""Shared fixtures: broker settings per test, a Dagster instance, real worker processes."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq_tests.harness import WorkerPool, isolated_settings
from dagster_taskiq_tests.private_brokers import PrivateRedis
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, broker_report_line, require


@pytest.fixture
def redis_url() -> str:
    """URL of the test Redis (skips locally, fails under CI, when it is down)."""
    require(REDIS_URL, "Redis")
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    """URL of the test RabbitMQ (skips locally, fails under CI, when it is down)."""
    require(AMQP_URL, "RabbitMQ")
    return AMQP_URL


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Run a test once per broker."""
    require(REDIS_URL, "Redis")
    if request.param == "rabbitmq":
        require(AMQP_URL, "RabbitMQ")
    return str(request.param)


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DAGSTER_HOME (sqlite storage) shared by the test and its workers."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home: Path) -> Iterator[DagsterInstance]:
    """The Dagster instance in ``dagster_home``."""
    with DagsterInstance.get() as inst:
        yield inst


@pytest.fixture
def settings(broker_kind: str) -> TaskiqSettings:
    """Isolated settings (unique key prefix, queue and exchange) for the parametrized broker."""
    return isolated_settings(broker_kind, REDIS_URL, AMQP_URL, heartbeat_timeout=10.0)


@pytest.fixture
def workers(settings: TaskiqSettings, dagster_home: Path) -> Iterator[WorkerPool]:
    """Start workers with ``workers.start(...)``; all are stopped at teardown."""
    pool = WorkerPool(settings, dagster_home)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(autouse=True, scope="session")
def _no_logging_reconfiguration_per_run() -> Iterator[None]:
    """Stop Dagster from calling ``logging.config.dictConfig`` at every run start in tests.

    Several tests orchestrate two runs at once as threads of the pytest process. Dagster calls
    ``dictConfig`` when a run starts (even with no python_logs handlers configured), which takes
    the logging module lock and then every handler's lock, while a concurrent run emitting an event
    holds a handler lock and waits for the module lock: a deadlock (seen). Real deployments run
    one orchestrator per process, so this only shields the test harness. With python_logs
    handlers configured, Dagster's own behaviour is kept.
    """
    from dagster._core.instance.methods.event_methods import EventMethods

    original = EventMethods.get_yaml_python_handlers

    def _handlers(self: Any) -> Any:
        if not self._settings_impl:
            return []
        if not self._instance.get_python_log_dagster_handler_config():
            return []
        return original(self)

    EventMethods.get_yaml_python_handlers = _handlers  # type: ignore[method-assign]
    try:
        yield
    finally:
        EventMethods.get_yaml_python_handlers = original  # type: ignore[method-assign]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own (it may be paused, and its command counts are ours)."""
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def pytest_report_header() -> str:
    """Say which brokers the session uses: the environment's, Docker containers, or local."""
    return broker_report_line()
