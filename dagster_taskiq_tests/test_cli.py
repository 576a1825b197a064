"""The ``dagster-taskiq`` CLI: parsing and errors through click's CliRunner, worker lifecycle
through real processes."""

import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from dagster_taskiq.cli import load_settings, main
from dagster_taskiq.config import BROKER_ENV, TaskiqSettings
from dagster_taskiq_tests.harness import (
    REPO_ROOT,
    WorkerProcess,
    executor_config,
    isolated_settings,
    wait_for,
)
from dagster_taskiq_tests.services import AMQP_URL

#: The interface's promise for an unreachable broker.
UNREACHABLE_DEADLINE = 10.0


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in-process, the way a user's shell would."""
    return CliRunner().invoke(main, list(args), env=env)


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit code 1, nothing on stdout, one ``Error:`` line on stderr, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.stdout == "", result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def cli_settings(redis_url: str) -> TaskiqSettings:
    """Isolated settings on the test Redis."""
    return isolated_settings("redis", redis_url, AMQP_URL)


@pytest.fixture
def config_file(tmp_path: Path, cli_settings: TaskiqSettings) -> Path:
    """A full ``-y`` file for ``cli_settings``."""
    path = tmp_path / "taskiq.yaml"
    path.write_text(yaml.safe_dump(executor_config(cli_settings)))
    return path


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a hung broker)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def _accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=_accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        server.close()
        for conn in held:
            conn.close()


# -- parsing, help and config files (no network) -----------------------------------------------
def test_help_lists_every_command_and_option() -> None:
    top = invoke("--help")
    assert top.exit_code == 0 and "worker" in top.output and "status" in top.output
    assert invoke("--version").output.startswith("dagster-taskiq, version ")
    start = invoke("worker", "start", "--help")
    assert start.exit_code == 0
    for flag in ("-q,", "-c,", "-n,", "-d,", "-l,", "-i,", "-y,", "--broker", "--backend"):
        assert flag in start.output, flag
    for args in (("worker", "list"), ("worker", "terminate"), ("status",)):
        result = invoke(*args, "--help")
        assert result.exit_code == 0 and "--config-yaml" in result.output, args
    assert "-a, --all" in invoke("worker", "terminate", "--help").output
    assert "--json" in invoke("status", "--help").output


def test_usage_errors_exit_2() -> None:
    assert invoke("worker", "terminate").exit_code == 2
    assert invoke("worker", "terminate", "w1", "--all").exit_code == 2
    assert invoke("worker", "start", "-c", "0").exit_code == 2
    assert invoke("status", "--no-such-flag").exit_code == 2


def test_config_files_accepted(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    settings = load_settings(str(empty), None, None)
    assert settings.default_queue == "dagster" and settings.heartbeat_timeout == 30.0

    partial = tmp_path / "partial.yaml"
    partial.write_text("execution:\n  config:\n    broker: amqp://guest:guest@127.0.0.1:5672/\n")
    settings = load_settings(str(partial), None, None)
    assert settings.broker_kind == "rabbitmq" and settings.backend_url.startswith("redis://")

    full = tmp_path / "full.yaml"
    full.write_text(
        yaml.safe_dump(
            {
                "execution": {
                    "config": {
                        "broker": "redis://127.0.0.1:6379/3",
                        "backend": "redis://127.0.0.1:6379/4",
                        "default_queue": "etl",
                        "heartbeat_timeout": 12.5,
                        "max_concurrent": 4,
                        "poll_interval": 0.05,
                        "retries": {"enabled": {}},
                        "tag_concurrency_limits": [{"key": "database", "limit": 2}],
                        "config_source": {"key_prefix": "etl", "result_ttl": 600},
                    }
                }
            }
        )
    )
    settings = load_settings(str(full), None, None)
    assert (settings.broker_url, settings.backend_url) == (
        "redis://127.0.0.1:6379/3",
        "redis://127.0.0.1:6379/4",
    )
    assert settings.default_queue == "etl" and settings.heartbeat_timeout == 12.5
    assert settings.key_prefix == "etl" and settings.result_ttl == 600
    # --broker and --backend override the file.
    overridden = load_settings(str(full), "redis://127.0.0.1:6379/7", "redis://127.0.0.1:6379/8")
    assert overridden.broker_url.endswith("/7") and overridden.backend_url.endswith("/8")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("execution: [unclosed", "is not valid YAML at line"),
        ("- a\n- list\n", "must be a mapping"),
        ("executon:\n  config: {}\n", "unknown top-level key(s) ['executon']"),
        ("execution: 5\n", "'execution' must hold only 'config'"),
        ("execution:\n  config: [1]\n", "'execution.config' must be a mapping"),
        ("execution:\n  config:\n    brokr: redis://x\n", 'unexpected config entry "brokr"'),
        ("execution:\n  config:\n    heartbeat_timeout: soon\n", "heartbeat_timeout"),
        ("execution:\n  config:\n    broker: http://127.0.0.1/\n", "Unsupported broker URL"),
        ('execution:\n  config:\n    default_queue: "a\\x01b"\n', "Invalid queue name"),
    ],
)
def test_invalid_config_files_are_one_line_errors(
    tmp_path: Path, content: str, fragment: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert_user_error(invoke("status", "-y", str(path)), fragment)
    assert_user_error(invoke("worker", "start", "-y", str(path)), fragment)


def test_missing_config_file_is_a_one_line_error(tmp_path: Path) -> None:
    assert_user_error(invoke("worker", "list", "-y", str(tmp_path / "nope.yaml")), "nope.yaml")


def test_bad_broker_option_is_a_one_line_error() -> None:
    assert_user_error(invoke("status", "--broker", "kafka://127.0.0.1:9092"), "kafka://")


# -- errors against real services --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["redis", "amqp"])
@pytest.mark.parametrize("how", ["refused", "silent"])
def test_unreachable_broker_fails_within_deadline(
    redis_url: str, silent_port: int, kind: str, how: str
) -> None:
    port = free_port() if how == "refused" else silent_port
    broker = (
        f"redis://127.0.0.1:{port}/0" if kind == "redis" else f"amqp://u:secret@127.0.0.1:{port}/"
    )
    commands = [("status",), ("worker", "list"), ("worker", "start", "-q", "x")]
    if how == "silent":  # each waits out the whole connect deadline; one command shows it
        commands = commands[:1]
    for args in commands:
        begin = time.monotonic()
        result = invoke(*args, "--broker", broker, "--backend", redis_url)
        elapsed = time.monotonic() - begin
        line = assert_user_error(result, f"127.0.0.1:{port}")
        assert elapsed < UNREACHABLE_DEADLINE, (args, elapsed)
        assert "secret" not in line


def test_unknown_worker_name_is_a_one_line_error(config_file: Path) -> None:
    line = assert_user_error(
        invoke("worker", "terminate", "nobody-here", "-y", str(config_file)), "'nobody-here'"
    )
    assert "dagster-taskiq worker list" in line


def test_empty_status_and_list(config_file: Path, cli_settings: TaskiqSettings) -> None:
    assert invoke("worker", "list", "-y", str(config_file)).output == "No live workers.\n"
    result = invoke("status", "--json", "-y", str(config_file))
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["workers"] == [] and document["in_flight"] == []
    assert isinstance(document["queues"], list)
    table = invoke("status", "-y", str(config_file)).output
    assert "QUEUES" in table and "WORKERS" in table and "IN FLIGHT" in table
    # The broker URL may also come from the environment, with an empty file.
    empty = config_file.with_name("empty.yaml")
    empty.write_text("")
    result = invoke("worker", "list", "-y", str(empty), env={BROKER_ENV: cli_settings.broker_url})
    assert result.exit_code == 0, result.output


# -- worker lifecycle with real processes ------------------------------------------------------
def _workers(config_file: Path) -> dict[str, dict[str, Any]]:
    result = invoke("status", "--json", "-y", str(config_file))
    assert result.exit_code == 0, result.output
    return {w["name"]: w for w in json.loads(result.output)["workers"]}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_worker_lifecycle(
    config_file: Path, cli_settings: TaskiqSettings, dagster_home: Path, tmp_path: Path
) -> None:
    queue = f"{cli_settings.default_queue}-cli"
    first = WorkerProcess(cli_settings, dagster_home, concurrency=2).start(wait=False)
    second = WorkerProcess(cli_settings, dagster_home).start(wait=False)
    try:
        # `worker start -d` detaches, waits until the worker is registered, and says so.
        name = "detached-worker"
        log = tmp_path / "detached.log"
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        started = subprocess.run(
            [
                *(sys.executable, "-m", "dagster_taskiq.cli", "worker", "start", "-d"),
                *("-n", name, "-y", str(config_file), "-q", queue, "-c", "3"),
                *("--logfile", str(log), "--heartbeat-interval", "0.5"),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
            cwd=str(tmp_path),
        )
        assert started.returncode == 0, (started.stdout, started.stderr, log.read_text())
        assert f"Started worker {name} in the background" in started.stdout
        pid = int(started.stdout.split("pid ")[1].split(",")[0])
        first.wait_registered()
        second.wait_registered()

        listing = invoke("worker", "list", "-y", str(config_file))
        assert listing.exit_code == 0, listing.output
        header, *rows = listing.output.strip().splitlines()
        assert header.split() == [
            *("NAME", "HOST", "PID", "QUEUES", "CONCURRENCY", "RUNNING", "LAST", "HEARTBEAT")
        ]
        row = next(r.split() for r in rows if r.startswith(name))
        assert row[2:6] == [str(pid), queue, "3", "0"]
        assert {first.name, second.name} <= {r.split()[0] for r in rows}
        detached = _workers(config_file)[name]
        assert detached["pid"] == pid and detached["queues"] == [queue]
        assert detached["host"] == socket.gethostname() and detached["running"] == 0
        datetime.datetime.fromisoformat(detached["last_heartbeat"])

        # Terminate one worker by name: it finishes and leaves the list.
        result = invoke("worker", "terminate", name, "-y", str(config_file))
        assert result.exit_code == 0 and f"Asked worker {name} to shut down." in result.output
        wait_for(lambda: _gone(pid), 30, what=f"detached worker {pid} to exit")
        assert f"Worker {name} stopped." in log.read_text()
        assert name not in _workers(config_file)

        # Terminate all the others: each exits with code 0.
        result = invoke("worker", "terminate", "-a", "-y", str(config_file))
        assert result.exit_code == 0, result.output
        for worker in (first, second):
            assert f"Asked worker {worker.name} to shut down." in result.output
            assert worker.process is not None
            assert worker.process.wait(30) == 0, worker.log()
        assert invoke("worker", "list", "-y", str(config_file)).output == "No live workers.\n"
        assert invoke("worker", "terminate", "-a", "-y", str(config_file)).exit_code == 0
    finally:
        first.stop()
        second.stop()


def test_worker_name_must_be_valid(config_file: Path) -> None:
    """A name with ':' or spaces would be misparsed in key names: refused with one line."""
    for bad in ("a:b", "has space", ":x"):
        result = invoke("worker", "start", "-n", bad, "-y", str(config_file))
        assert_user_error(result, "Invalid worker name", repr(bad))


def test_a_live_workers_name_cannot_be_taken(
    config_file: Path, cli_settings: TaskiqSettings, dagster_home: Path
) -> None:
    """`worker start -n W` exits 1 while a live worker W exists, and works once W is gone."""
    first = WorkerProcess(cli_settings, dagster_home).start()
    try:
        result = invoke("worker", "start", "-n", first.name, "-y", str(config_file))
        assert_user_error(result, f"A live worker named '{first.name}' already exists")
        # The same refusal comes from the worker itself when two start at once (no CLI check
        # between them): the second to register exits 1 and the first keeps serving.
        twin = WorkerProcess(cli_settings, dagster_home, name=first.name)
        twin.config_path.write_text(yaml.safe_dump(executor_config(cli_settings)))
        env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PYTHONPATH": str(REPO_ROOT)}
        code = """
import asyncio, sys
from dagster_taskiq.cli import load_settings
from dagster_taskiq.worker.service import Worker, WorkerOptions
settings = load_settings(sys.argv[1], None, None)
try:
    asyncio.run(Worker(settings, WorkerOptions(name=sys.argv[2])).serve())
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(1)
"""
        raced = subprocess.run(
            [sys.executable, "-c", code, str(twin.config_path), first.name],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=str(REPO_ROOT),
        )
        assert raced.returncode == 1, (raced.stdout, raced.stderr)
        assert "WorkerNameInUseError" in raced.stdout, raced.stdout
        assert first.process is not None and first.process.poll() is None
    finally:
        assert first.stop() == 0
    wait_for(lambda: first.name not in _workers(config_file), 10, what="the name to be free")
