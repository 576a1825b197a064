"""Config hygiene: ``config_source`` keys are validated, and secrets written in clear in
``dagster.yaml`` get one warning per run (unit checks, plus a real run on PostgreSQL storage)."""

import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable

from dagster_taskiq.compat import InstanceRef, process_config
from dagster_taskiq.config import TaskiqSettings, shared_config_schema, valid_source_options
from dagster_taskiq.errors import TaskiqConfigError
from dagster_taskiq.executor import executor_config_schema
from dagster_taskiq.literal_secrets import (
    LITERAL_SECRETS_PREFIX,
    find_in_config,
    literal_secrets,
    warn_literal_secrets,
)
from dagster_taskiq_tests import jobs
from dagster_taskiq_tests.harness import REPO_ROOT, WorkerPool, executor_config
from dagster_taskiq_tests.services import require
from dagster_taskiq_tests.test_postgres_storage import POSTGRES_URL

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_unknown_config_source_key_lists_the_valid_keys() -> None:
    with pytest.raises(TaskiqConfigError) as raised:
        TaskiqSettings(config_source={"key_prefx": "p", "result_ttl": 60})
    message = str(raised.value)
    assert "'key_prefx'" in message
    for key in valid_source_options():
        assert key in message.split("Valid keys:", 1)[1]


def test_dagster_schema_rejects_unknown_config_source_keys() -> None:
    from dagster._config.field import Field
    from dagster._config.field_utils import Shape

    for schema in (shared_config_schema(), executor_config_schema()):
        shape = Field(Shape(schema))
        good = process_config(shape.config_type, {"config_source": {"key_prefix": "p", "qos": 1}})
        assert good.success, good.errors
        assert good.value["config_source"] == {"key_prefix": "p", "qos": 1}
        bad = process_config(shape.config_type, {"config_source": {"key_prefx": "p"}})
        assert not bad.success
        message = " ".join(error.message for error in bad.errors)
        assert "key_prefx" in message and "key_prefix" in message and "result_ttl" in message


def test_every_option_read_in_code_or_documented_is_accepted() -> None:
    valid = valid_source_options()
    read_in_code = set()
    for path in (REPO_ROOT / "dagster_taskiq").rglob("*.py"):
        read_in_code |= set(re.findall(r"\boption\(\s*\"(\w+)\"", path.read_text()))
    assert {"result_ttl", "confirm_timeout", "dead_letter_max", "queue_arguments"} <= read_in_code
    assert read_in_code <= set(valid), read_in_code - set(valid)

    section = README.split("### `config_source` options", 1)[1].split("\n### ", 1)[0]
    documented = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`(\w+)`", line.split(" | ", 1)[0]))
    assert documented == set(valid)
    TaskiqSettings(config_source=dict.fromkeys(valid, 1))  # all accepted together


def test_literal_secret_detection() -> None:
    config = {
        "postgres_db": {"username": "u", "password": "hunter2", "hostname": "h"},
        "postgres_url": "postgresql://u:pw@h:5432/d",
        "plain_url": "postgresql://u@h:5432/d",
        "from_env": {"password": {"env": "PG_PASSWORD"}},
        "nested": [{"api_token": "abc"}, {"name": "x"}],
        "empty": {"password": ""},
    }
    assert sorted(find_in_config(config)) == [
        ("nested[0].api_token", "value"),
        ("postgres_db.password", "value"),
        ("postgres_url", "url"),
    ]


def _write_home(home: Path, config: dict[str, Any]) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def test_literal_secrets_of_an_instance_are_named_once(tmp_path: Path) -> None:
    home = _write_home(
        tmp_path / "home",
        {
            "storage": {
                "postgres": {
                    "postgres_db": {
                        "username": "postgres",
                        "password": "hunter2",
                        "hostname": "127.0.0.1",
                        "db_name": "d",
                    }
                }
            },
            "run_launcher": {
                "module": "dagster_taskiq",
                "class": "TaskiqRunLauncher",
                "config": {
                    "broker": {"env": "DAGSTER_TASKIQ_BROKER_URL"},
                    "backend": "redis://:pw@127.0.0.1:6379/0",
                },
            },
        },
    )
    found = literal_secrets(InstanceRef.from_dir(str(home)))
    assert [(s.key, s.kind) for s in found] == [
        ("storage.postgres_db.password", "value"),
        ("run_launcher.backend", "url"),
    ]
    clean = _write_home(tmp_path / "clean", {"telemetry": {"enabled": False}})
    assert literal_secrets(InstanceRef.from_dir(str(clean))) == []


@pytest.fixture
def literal_password_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A DAGSTER_HOME on a fresh PostgreSQL database, its password written in clear (the local
    server trusts loopback, so any password works)."""
    require(POSTGRES_URL, "PostgreSQL")
    import psycopg2

    name = f"dtq_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(POSTGRES_URL)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        home = _write_home(
            tmp_path / "pg_home",
            {
                "telemetry": {"enabled": False},
                "storage": {
                    "postgres": {
                        "postgres_db": {
                            "username": "postgres",
                            "password": "literal-hunter2",
                            "hostname": "127.0.0.1",
                            "port": 5432,
                            "db_name": name,
                            "scheme": "postgresql+psycopg2",
                        }
                    }
                },
            },
        )
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        yield home
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.mark.parametrize("broker_kind", ["redis"], indirect=True)
def test_run_on_an_instance_with_a_literal_password_is_warned_once(
    literal_password_home: Path, settings: TaskiqSettings
) -> None:
    pool = WorkerPool(settings, literal_password_home)
    try:
        pool.start()
        with DagsterInstance.get() as instance:
            with execute_job(
                reconstructable(jobs.two_op_chain), instance, run_config=executor_config(settings)
            ) as result:
                assert result.success
                run_id = result.run_id
            warnings = [
                entry
                for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
                if entry.dagster_event.message.startswith(LITERAL_SECRETS_PREFIX)
            ]
    finally:
        pool.stop_all()
    assert len(warnings) == 1
    warning = warnings[0]
    assert warning.level == logging.WARNING
    message = warning.dagster_event.message
    assert "storage.postgres_db.password" in message and "{env: VAR}" in message
    assert "literal-hunter2" not in message
    metadata = warning.dagster_event.event_specific_data.metadata
    assert metadata["literal_secret_keys"].value == "storage.postgres_db.password"


def test_launcher_and_executor_together_warn_a_run_once(literal_password_home: Path) -> None:
    """The launcher warns when it sends a run and the executor when it orchestrates it: the
    second finds the first one's warning in the run's event log and stays quiet."""
    with DagsterInstance.get() as instance:
        run = instance.create_run_for_job(jobs.single_op_job)
        warn_literal_secrets(instance, run)  # TaskiqRunLauncher.launch_run
        warn_literal_secrets(instance, run)  # taskiq_executor, on the worker
        warnings = [
            entry
            for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
            if entry.dagster_event.message.startswith(LITERAL_SECRETS_PREFIX)
        ]
    assert len(warnings) == 1 and warnings[0].level == logging.WARNING
