"""docker-compose.yml, checked without a Docker engine.

Services exist and start in a healthchecked order; every command of our image is a real CLI
invocation of this package or of Dagster (parsed by the real click commands, from the image's
working directory, so flags and files must exist); every mounted or copied file exists; the
instance and worker configs validate against Dagster's and our schemas, and load into a real
instance against Postgres when one is running; the README shows the commands exactly.
"""

import importlib
import importlib.metadata
import os
import re
import shlex
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from dagster_taskiq_tests.harness import REPO_ROOT
from dagster_taskiq_tests.services import under_ci

COMPOSE = REPO_ROOT / "docker-compose.yml"
EXAMPLE = REPO_ROOT / "example"
DOCKERFILE = EXAMPLE / "Dockerfile"
#: Where the image's paths come from: its WORKDIR is the example folder, DAGSTER_HOME gets
#: example/dagster.yaml (see example/Dockerfile).
IMAGE_WORKDIR = EXAMPLE
OUR_PROGRAMS = {"dagster-taskiq", "dagster", "dagster-webserver", "dagster-daemon"}
POSTGRES_URL = os.environ.get(
    "DAGSTER_TASKIQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed compose file (anchors and merge keys resolved)."""
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}``, with the defaults (nothing set in the environment)."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: m.group(2) or "", value)


def _image_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("dockerfile") == "example/Dockerfile"
    }


def _service_env(service: Mapping[str, Any]) -> dict[str, str]:
    return {k: _interpolate(str(v)) for k, v in (service.get("environment") or {}).items()}


def test_the_stack_has_its_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "rabbitmq", "postgres", "webserver", "daemon"} <= set(services)
    assert services["rabbitmq"]["profiles"] == ["rabbitmq"]
    assert set(_image_services(compose)) == {
        "webserver",
        "daemon",
        "worker-default",
        "worker-compute",
    }
    queues = {
        name: service["command"][service["command"].index("-q") + 1]
        for name, service in services.items()
        if name.startswith("worker-")
    }
    assert queues == {"worker-default": "dagster", "worker-compute": "compute"}
    for name, service in _image_services(compose).items():
        env = _service_env(service)
        assert env["DAGSTER_TASKIQ_BROKER_URL"] == "redis://redis:6379/0", name
        assert env["DAGSTER_TASKIQ_BACKEND_URL"] == "redis://redis:6379/0", name
        assert env["DAGSTER_POSTGRES_HOST"] == "postgres", name


def test_healthchecks_gate_the_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    for name in ("webserver", "daemon", "worker-default", "worker-compute"):
        needs = services[name]["depends_on"]
        assert {"postgres", "redis"} <= set(needs), name
        assert needs["rabbitmq"]["required"] is False  # only with --profile rabbitmq
    for name in ("daemon", "worker-default", "worker-compute"):
        assert "webserver" in services[name]["depends_on"], name


def _command_of(program: str) -> click.Command:
    (entry,) = [
        ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == program
    ]
    command = entry.load()
    if not isinstance(command, click.Command):
        # dagster-webserver and dagster-daemon wrap a module-level click command ``cli``.
        command = getattr(importlib.import_module(entry.module), "cli", None)
    assert isinstance(command, click.Command), program
    return command


def resolve_click(program: str, args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Parse ``program args`` with the real click command tree; return the command path and its
    parameters. Unknown commands, unknown flags and bad values raise click errors."""
    command = _command_of(program)
    ctx = command.make_context(program, list(args))
    path = [program]
    while isinstance(command, click.Group):
        remaining = [*ctx.protected_args, *ctx.args]
        name, sub, rest = command.resolve_command(ctx, remaining)
        assert sub is not None and name is not None
        ctx = sub.make_context(name, rest, parent=ctx)
        command, path = sub, [*path, name]
    return path, dict(ctx.params)


@pytest.fixture
def in_image_workdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run in the folder the image's WORKDIR is built from, with the services' environment."""
    monkeypatch.chdir(IMAGE_WORKDIR)
    yield


def test_every_command_is_a_real_cli_invocation(
    compose: dict[str, Any], in_image_workdir: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster_taskiq.local.stack import read_config_yaml

    seen = {}
    for name, service in _image_services(compose).items():
        command = service["command"]
        assert command[0] in OUR_PROGRAMS, f"{name} runs {command[0]}"
        path, params = resolve_click(command[0], command[1:])
        seen[name] = path
        for key, value in _service_env(service).items():
            monkeypatch.setenv(key, value)
        if path == ["dagster-taskiq", "worker", "start"]:
            config = read_config_yaml(params["config_yaml"])
            assert config["broker"] == {"env": "DAGSTER_TASKIQ_BROKER_URL"}
            assert params["concurrency"] >= 1 and params["queues"]
        for workspace in params.get("workspace") or ():
            _check_workspace(Path(workspace))
    assert seen == {
        "webserver": ["dagster-webserver"],
        "daemon": ["dagster-daemon", "run"],
        "worker-default": ["dagster-taskiq", "worker", "start"],
        "worker-compute": ["dagster-taskiq", "worker", "start"],
    }


def _check_workspace(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    (location,) = document["load_from"]
    module = location["python_module"]["module_name"]
    assert (IMAGE_WORKDIR / module / "__init__.py").is_file()


def test_a_wrong_flag_would_be_caught() -> None:
    with pytest.raises(click.NoSuchOption):
        resolve_click("dagster-taskiq", ["worker", "start", "--queues", "dagster"])
    with pytest.raises(click.UsageError):
        resolve_click("dagster-daemon", ["serve"])


def test_every_mounted_or_copied_file_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = REPO_ROOT / build["context"]
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes") or ():
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"
    copies = 0
    for line in DOCKERFILE.read_text().splitlines():
        parts = shlex.split(line) if line.startswith("COPY ") else []
        if parts:
            sources = [p for p in parts[1:-1] if not p.startswith("--")]
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"Dockerfile copies missing {source}"
                copies += 1
    assert copies >= 6
    workdirs = [
        line.split()[1]
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("WORKDIR")
    ]
    assert workdirs[-1] == "/opt/dagster/app"
    assert "COPY example/dagster.yaml /opt/dagster/home/dagster.yaml" in DOCKERFILE.read_text()


def _instance_env(monkeypatch: pytest.MonkeyPatch, compose: Mapping[str, Any]) -> None:
    for key, value in _service_env(compose["services"]["webserver"]).items():
        monkeypatch.setenv(key, value)


def test_instance_config_validates(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster._config import process_config
    from dagster._config.field import Field
    from dagster._core.instance.config import dagster_instance_config
    from dagster_postgres import PostgresRunStorage

    from dagster_taskiq import TaskiqRunLauncher

    _instance_env(monkeypatch, compose)
    config, custom_class = dagster_instance_config(str(EXAMPLE))
    assert custom_class is None
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_taskiq", "TaskiqRunLauncher")
    result = process_config(Field(TaskiqRunLauncher.config_type()).config_type, launcher["config"])
    assert result.success, result.errors
    assert result.value is not None and result.value["broker"] == "redis://redis:6379/0"
    built = TaskiqRunLauncher.from_config_value(None, result.value)  # type: ignore[arg-type]
    assert built.settings.broker_url == "redis://redis:6379/0"
    assert built.settings.default_queue == "dagster"
    postgres = config["storage"]["postgres"]
    checked = process_config(Field(PostgresRunStorage.config_type()).config_type, postgres)
    assert checked.success, checked.errors
    assert config["run_monitoring"]["enabled"] is True


def test_instance_loads_against_postgres(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The compose instance config builds a real instance (Postgres storage, our launcher)."""
    try:
        import psycopg2
    except ImportError:  # pragma: no cover - dagster-postgres is in the test extra
        pytest.skip("dagster-postgres is not installed")
    try:
        admin = psycopg2.connect(POSTGRES_URL, connect_timeout=2)
    except psycopg2.OperationalError as exc:
        reason = f"no Postgres at {POSTGRES_URL} ({str(exc).strip()})"
        if under_ci():
            pytest.fail(f"{reason}; under CI=true the storage tests must run (see .ci/run).")
        pytest.skip(reason)
    admin.autocommit = True
    database = f"dagster_taskiq_compose_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    try:
        from urllib.parse import urlsplit

        from dagster import DagsterInstance
        from dagster_postgres import PostgresRunStorage

        from dagster_taskiq import TaskiqRunLauncher

        _instance_env(monkeypatch, compose)
        parts = urlsplit(POSTGRES_URL)
        monkeypatch.setenv("DAGSTER_POSTGRES_HOST", parts.hostname or "127.0.0.1")
        monkeypatch.setenv("DAGSTER_POSTGRES_USER", parts.username or "postgres")
        monkeypatch.setenv("DAGSTER_POSTGRES_PASSWORD", parts.password or "unused")
        monkeypatch.setenv("DAGSTER_POSTGRES_DB", database)
        home = tmp_path / "home"
        home.mkdir()
        (home / "dagster.yaml").write_text((EXAMPLE / "dagster.yaml").read_text())
        with DagsterInstance.from_config(str(home)) as instance:
            assert isinstance(instance.run_launcher, TaskiqRunLauncher)
            assert instance.run_launcher.settings.broker_url == "redis://redis:6379/0"
            assert isinstance(instance.run_storage, PostgresRunStorage)
            assert instance.run_monitoring_enabled
            assert instance.run_coordinator.__class__.__name__ == "QueuedRunCoordinator"
            assert instance.get_runs() == []
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def test_readme_shows_the_compose_commands_exactly(compose: dict[str, Any]) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for name, service in _image_services(compose).items():
        line = " ".join(service["command"])
        assert line in readme, f"README.md does not show the {name} command: {line}"
    assert "docker compose up --build" in readme
    assert "docker compose --profile rabbitmq up --build" in readme


def test_workers_are_healthchecked_on_their_metrics_port(compose: dict[str, Any]) -> None:
    from dagster_taskiq.metrics.server import HEALTH_PATH

    workers = {n: s for n, s in compose["services"].items() if n.startswith("worker-")}
    assert workers
    for name, service in workers.items():
        _, params = resolve_click(service["command"][0], service["command"][1:])
        port = params["metrics_port"]
        assert port is not None, f"{name} serves no metrics port, so nothing to healthcheck"
        # The healthcheck runs inside the container: the default loopback bind is enough.
        assert params["metrics_host"] == "127.0.0.1", name
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        urls = re.findall(r"urlopen\('([^']+)'", test[3])
        assert urls == [f"http://127.0.0.1:{port}{HEALTH_PATH}"], name
        assert service["healthcheck"]["start_period"], name
