"""``dagster-taskiq demo``: the example job end to end on two real workers, then nothing left."""

import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import redis

from dagster_taskiq.config import BROKER_ENV
from dagster_taskiq.local.stack import LocalStack, decide_broker
from dagster_taskiq_tests.harness import wait_for
from dagster_taskiq_tests.local_commands import (
    cli,
    command_env,
    describe,
    kill_marked,
    marked_processes,
    new_marker,
    run_command,
)
from dagster_taskiq_tests.services import REDIS_URL, require

#: step -> (queue, priority) as the example's op tags set them.
EXAMPLE_STEPS = {
    "extract_orders": ("dagster", 5),
    "revenue_by_region": ("compute", 9),
    "top_products": ("compute", 6),
    "customer_segments": ("compute", 3),
    "validate_orders": ("dagster", 8),
    "build_report": ("dagster", 5),
}
WORKER_OF_QUEUE = {"dagster": "demo-default", "compute": "demo-compute"}
HEADER = re.compile(r"^STEP\s+QUEUE\s+PRIORITY\s+WORKER\s+DURATION\s+STATUS$", re.M)


@pytest.fixture
def marker() -> Iterator[str]:
    """A marker every process of the command inherits; asserts nothing is left afterwards."""
    value = new_marker()
    yield value
    kill_marked(value)


def _row(step: str, status: str) -> re.Pattern[str]:
    queue, priority = EXAMPLE_STEPS[step]
    worker = WORKER_OF_QUEUE[queue]
    return re.compile(rf"^{step}\s+{queue}\s+{priority}\s+{worker}\s+\d+\.\d\d s\s+{status}$", re.M)


def _assert_nothing_left(marker: str, output: str) -> None:
    try:
        wait_for(lambda: not marked_processes(marker), timeout=10, what="no leftover processes")
    except AssertionError:
        raise AssertionError(f"left behind:\n{describe(marked_processes(marker))}") from None
    for directory in re.findall(r"(/\S+/dagster-taskiq-(?:redis|demo)-[^/\s]+)", output):
        assert not Path(directory).exists(), f"{directory} was not removed"


def test_demo_runs_the_example_on_the_embedded_redis(marker: str, tmp_path: Path) -> None:
    result = run_command(cli("demo", "--embedded"), marker, cwd=tmp_path, timeout=150)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "embedded Redis" in output
    assert "through TaskiqRunLauncher" in output
    assert "run        taken by worker demo-default from queue 'dagster'" in output
    assert "[6/6]" in output
    assert HEADER.search(output), output
    for step in EXAMPLE_STEPS:
        assert _row(step, "SUCCESS").search(output), f"no SUCCESS row for {step}:\n{output}"
        queue = EXAMPLE_STEPS[step][0]
        assert re.search(rf"{step}\s+started on {WORKER_OF_QUEUE[queue]}", output), output
    assert re.search(r"Run \S+ SUCCESS in [\d.]+ s: 6 of 6 steps ended, on 2 worker", output)
    assert "Report: total revenue" in output
    _assert_nothing_left(marker, output)


def test_demo_failure_exits_1_on_the_configured_broker(marker: str, tmp_path: Path) -> None:
    require(REDIS_URL, "Redis")
    result = run_command(
        cli("demo", "--fail"), marker, cwd=tmp_path, timeout=150, **{BROKER_ENV: REDIS_URL}
    )
    output = result.stdout + result.stderr
    kept = re.search(r"kept in (\S+)\.", output)
    try:
        assert result.returncode == 1, output
        assert f"(from {BROKER_ENV})" in output
        assert _row("validate_orders", "FAILURE").search(output), output
        assert re.search(r"^build_report\s+-\s+-\s+-\s+-\s+NOT RUN$", output, re.M), output
        assert re.search(r"Run \S+ FAILURE", output)
        assert re.search(
            r"failed: step validate_orders: Failure: \d+ of \d+ orders are invalid", output
        )
        assert kept is not None and Path(kept.group(1), "logs").is_dir()
    finally:
        if kept is not None:
            shutil.rmtree(kept.group(1), ignore_errors=True)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert not list(client.scan_iter(match="dagster_taskiq_demo_*", count=1000))
    finally:
        client.close()
    assert not marked_processes(marker), describe(marked_processes(marker))


def test_ctrl_c_stops_the_run_and_every_process(marker: str, tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        demo = subprocess.Popen(
            cli("demo", "--embedded"),
            env=command_env(marker),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: "started on" in log.read_text() or demo.poll() is not None,
            timeout=120,
            what="a step to start",
        )
        assert demo.poll() is None, log.read_text()
        assert marked_processes(marker), "the demo should have started processes"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 130, log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = log.read_text()
    assert "Interrupted: stopping the run and every process the demo started." in output
    _assert_nothing_left(marker, output)


# -- choosing the broker (no network: a closed loopback port stands for "nothing running") ----
def _closed_port_url() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def test_no_broker_configured_and_none_reachable_means_embedded() -> None:
    decision = decide_broker(
        broker=None,
        backend=None,
        config={},
        env={},
        force_embedded=False,
        probe_url=_closed_port_url(),
    )
    assert decision.broker_url is None and decision.needs_embedded
    assert "no broker configured" in decision.reason


def test_configured_broker_wins_in_order_flag_file_env() -> None:
    env = {BROKER_ENV: "redis://env-host:6379/0"}
    config = {"broker": "redis://file-host:6379/0"}
    flag = decide_broker(
        broker="redis://flag-host:6379/0",
        backend=None,
        config=config,
        env=env,
        force_embedded=False,
        probe_url=None,
    )
    assert flag.broker_url == "redis://flag-host:6379/0" and not flag.needs_embedded
    from_file = decide_broker(
        broker=None, backend=None, config=config, env=env, force_embedded=False, probe_url=None
    )
    assert from_file.broker_url == "redis://file-host:6379/0"
    from_env = decide_broker(
        broker=None, backend=None, config={}, env=env, force_embedded=False, probe_url=None
    )
    assert from_env.broker_url == "redis://env-host:6379/0" and BROKER_ENV in from_env.reason


def test_rabbitmq_without_backend_uses_the_embedded_redis_for_results() -> None:
    decision = decide_broker(
        broker="amqp://guest:secret@127.0.0.1:5672/",
        backend=None,
        config={},
        env={},
        force_embedded=False,
        probe_url=None,
    )
    assert decision.needs_embedded and decision.backend_url is None
    assert "secret" not in decision.reason


def test_a_rabbitmq_broker_gets_an_embedded_backend_and_isolated_keys() -> None:
    decision = decide_broker(
        broker="amqp://guest:secret@127.0.0.1:5672/",
        backend=None,
        config={},
        env={},
        force_embedded=False,
        probe_url=None,
    )
    stack = LocalStack("t")
    try:
        settings = stack.open_broker(decision, {}, isolate=True)
        assert settings.broker_url.startswith("amqp://")
        assert stack.embedded is not None and stack.embedded.running
        assert settings.backend_url == stack.embedded.url
        assert str(settings.config_source["key_prefix"]).startswith("dagster_taskiq_t_")
        described = stack.describe_broker()
        assert "embedded Redis" in described and "secret" not in described
        home = stack.write_instance()
        assert "TaskiqRunLauncher" in home.read_text()
    finally:
        stack.close()
    assert not stack.root.exists() and stack.embedded is None


def test_embedded_flag_excludes_broker_flag() -> None:
    with pytest.raises(click.UsageError):
        decide_broker(
            broker="redis://x:6379/0",
            backend=None,
            config={},
            env={},
            force_embedded=True,
            probe_url=None,
        )
    decision = decide_broker(
        broker=None,
        backend=None,
        config={},
        env={BROKER_ENV: "redis://x:6379/0"},
        force_embedded=True,
        probe_url=None,
    )
    assert decision.broker_url is None


def test_the_demo_command_is_registered() -> None:
    from click.testing import CliRunner

    from dagster_taskiq.cli import main

    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0
    for flag in ("--embedded", "--broker", "--backend", "-y, --config-yaml", "--fail", "--timeout"):
        assert flag in result.output
