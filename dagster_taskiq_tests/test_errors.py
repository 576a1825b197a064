"""Error paths of the executor: bad URLs, malformed tags, unreachable brokers and backends.

Each error must say what is wrong and what to fix, name what it is about, leak no password, and
arrive quickly (an unreachable broker within 10 s, never a hang).
"""

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqClient
from dagster_taskiq.errors import BrokerUnavailableError, TaskiqConfigError
from dagster_taskiq_tests import jobs
from dagster_taskiq_tests.harness import executor_config, isolated_settings
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL

SECRET = "s3cr3t-pw"


def _execute(instance: DagsterInstance, config: dict[str, Any], **kwargs: Any) -> float:
    """Run ``single_op_job`` with this executor config; return how long it took to fail."""
    started = time.monotonic()
    with execute_job(
        reconstructable(jobs.single_op_job),
        instance=instance,
        run_config={"execution": {"config": config}},
        raise_on_error=True,
        **kwargs,
    ):
        pass
    return time.monotonic() - started  # pragma: no cover - only reached if nothing raised


def _closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections and then never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def _accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=_accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        server.close()


def _run_failures(instance: DagsterInstance) -> list[str]:
    """Every failure message the instance recorded for its only run."""
    (run,) = instance.get_runs()
    texts = []
    for record in instance.all_logs(run.run_id):
        event = record.dagster_event
        if event is not None and event.event_type in (
            DagsterEventType.RUN_FAILURE,
            DagsterEventType.ENGINE_EVENT,
        ):
            texts.append(event.message or "")
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:
                texts.append(error.to_string())
    return texts


def test_unknown_url_scheme_is_a_config_error_at_launch(instance: DagsterInstance) -> None:
    with pytest.raises(TaskiqConfigError) as info:
        _execute(instance, {"broker": f"kafka://user:{SECRET}@127.0.0.1:9092"})
    message = str(info.value)
    assert "Unsupported broker URL scheme 'kafka://'" in message
    assert "redis://" in message and "amqp://" in message
    assert SECRET not in message and "user:***@" in message
    (run,) = instance.get_runs()
    assert run.is_finished and not run.is_success
    assert not instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)


def test_non_redis_backend_is_a_config_error_at_launch(instance: DagsterInstance) -> None:
    with pytest.raises(TaskiqConfigError, match=r"result backend must be Redis"):
        _execute(instance, {"broker": AMQP_URL, "backend": AMQP_URL})


@pytest.mark.parametrize(
    ("tags", "op_tag", "named"),
    [
        ({"dagster-taskiq/run_priority": "urgent"}, None, "dagster-taskiq/run_priority"),
        ({"dagster-celery/run_priority": "2.5"}, None, "dagster-celery/run_priority"),
        ({}, "dagster-taskiq/priority", "dagster-taskiq/priority"),
    ],
    ids=["run-tag", "celery-run-tag", "op-tag"],
)
def test_non_integer_priority_fails_naming_the_tag_and_step(
    instance: DagsterInstance,
    redis_url: str,
    tags: dict[str, str],
    op_tag: str | None,
    named: str,
) -> None:
    settings = isolated_settings("redis", redis_url, AMQP_URL)
    job = jobs.bad_priority_job if op_tag else jobs.single_op_job
    step = "bad_priority_op" if op_tag else "emit_one"
    started = time.monotonic()
    with pytest.warns(UserWarning) if "celery" in named else _nothing():
        with execute_job(
            reconstructable(job),
            instance=instance,
            run_config=executor_config(settings),
            tags=tags,
        ) as result:
            assert not result.success
    assert time.monotonic() - started < 30
    text = "\n".join(_run_failures(instance))
    assert f"Tag '{named}' on step '{step}' of run {result.run_id} must be an integer" in text
    assert "For example tags={" in text
    assert not instance.all_logs(result.run_id, of_type=DagsterEventType.STEP_START)


class _nothing:
    """A context manager that does nothing (the no-warning case of a parametrized test)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(
    ("broker", "backend", "complaint"),
    [
        ("redis://127.0.0.1:{closed}/0", None, "Could not reach the Redis backend"),
        (f"amqp://guest:{SECRET}@127.0.0.1:{{closed}}/", REDIS_URL, "Could not reach the broker"),
        (AMQP_URL, "redis://127.0.0.1:{closed}/0", "Could not reach the Redis backend"),
    ],
    ids=["redis-closed-port", "amqp-closed-port", "amqp-with-unreachable-backend"],
)
def test_unreachable_broker_or_backend_fails_fast(
    instance: DagsterInstance,
    redis_url: str,
    amqp_url: str,
    broker: str,
    backend: str | None,
    complaint: str,
) -> None:
    port = _closed_port()
    config: dict[str, Any] = {"broker": broker.format(closed=port)}
    if backend:
        config["backend"] = backend.format(closed=port)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as info:
        _execute(instance, config)
    elapsed = time.monotonic() - started
    assert elapsed < 10.0, f"took {elapsed:.1f} s"
    message = str(info.value)
    assert complaint in message and f"127.0.0.1:{port}" in message
    assert SECRET not in message
    assert "fix 'broker'" in message or "fix 'backend'" in message


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_silent_broker_times_out_instead_of_hanging(
    instance: DagsterInstance, redis_url: str, silent_port: int, scheme: str
) -> None:
    """A server that accepts connections but never answers hits ``connect_timeout``."""
    broker = (
        f"redis://127.0.0.1:{silent_port}/0"
        if scheme == "redis"
        else f"amqp://guest:guest@127.0.0.1:{silent_port}/"
    )
    config = {"broker": broker, "backend": redis_url if scheme == "amqp" else broker}
    config_source = {"connect_timeout": 1.5}
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as info:
        _execute(instance, {**config, "config_source": config_source})
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 3.0, f"took {elapsed:.1f} s"
    assert f"127.0.0.1:{silent_port}" in str(info.value)


def test_failed_rabbitmq_connect_leaves_nothing_retrying(redis_url: str, silent_port: int) -> None:
    """A long-lived client (the webserver's run launcher) that could not connect keeps nothing
    reconnecting in the background, however often it tries."""
    # aio-pika schedules ``close()`` from ``__del__`` on whatever loop runs when a connection
    # is collected: connections that earlier tests in this process abandoned (on other loops)
    # must be collected now, not while this test's loop runs and counts its tasks.
    gc.collect()
    settings = TaskiqSettings(
        broker_url=f"amqp://guest:guest@127.0.0.1:{silent_port}/",
        backend_url=redis_url,
        config_source={"connect_timeout": 1.0},
    )
    client = TaskiqClient(settings)

    async def pending_tasks() -> list[str]:
        current = asyncio.current_task()
        return [repr(task.get_coro()) for task in asyncio.all_tasks() if task is not current]

    try:
        for _ in range(2):
            with pytest.raises(BrokerUnavailableError, match="no answer within 1 s"):
                client.connect()
        assert client.wait(pending_tasks()) == []
    finally:
        client.close()
