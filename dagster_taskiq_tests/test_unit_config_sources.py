"""Where ``worker start`` takes its config from (flags, -y, $DAGSTER_HOME/dagster.yaml, the
environment, the defaults), and the ``status`` warnings for workers that do not match the
launcher. No network: settings are only built, never connected."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from dagster_taskiq.cli import load_settings
from dagster_taskiq.config import (
    BACKEND_ENV,
    BROKER_ENV,
    DEFAULT_QUEUE,
    DEFAULT_URL,
    SIGNING_KEY_ENV,
)
from dagster_taskiq.config_sources import launcher_mismatches, worker_config
from dagster_taskiq.errors import TaskiqConfigError
from dagster_taskiq.lifecycle.records import WorkerInfo

LAUNCHER_BROKER = "redis://127.0.0.1:6379/4"
LAUNCHER_CONFIG: dict[str, Any] = {
    "broker": LAUNCHER_BROKER,
    "default_queue": "launcher-queue",
    "heartbeat_timeout": 42,
    "config_source": {"key_prefix": "from-yaml"},
    "signing_key": {"env": "MY_SIGNING_KEY"},
}


def _home(tmp_path: Path, config: dict[str, Any] | None, cls: str = "TaskiqRunLauncher") -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    document: dict[str, Any] = {"telemetry": {"enabled": False}}
    if config is not None:
        document["run_launcher"] = {"module": "dagster_taskiq", "class": cls, "config": config}
    (home / "dagster.yaml").write_text(yaml.safe_dump(document))
    return home


def _env(home: Path | None = None, **variables: str) -> dict[str, str]:
    env = {"MY_SIGNING_KEY": "s" * 32, **variables}
    if home is not None:
        env["DAGSTER_HOME"] = str(home)
    return env


def _yaml_file(tmp_path: Path, config: dict[str, Any]) -> str:
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump({"execution": {"config": config}}))
    return str(path)


@pytest.fixture(autouse=True)
def _no_taskiq_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI loader reads os.environ: start every test without our variables."""
    for name in (BROKER_ENV, BACKEND_ENV, SIGNING_KEY_ENV):
        monkeypatch.delenv(name, raising=False)


def test_the_launcher_config_in_dagster_home_is_used_when_no_flags_are_given(
    tmp_path: Path,
) -> None:
    home = _home(tmp_path, LAUNCHER_CONFIG)
    chosen = worker_config(None, None, None, _env(home), load_settings)
    settings = chosen.settings
    assert settings.broker_url == LAUNCHER_BROKER
    assert settings.backend_url == LAUNCHER_BROKER  # a Redis broker doubles as the backend
    assert settings.default_queue == "launcher-queue"
    assert settings.heartbeat_timeout == 42
    assert settings.config_source == {"key_prefix": "from-yaml"}
    assert settings.signing_key == "s" * 32
    assert chosen.source.startswith(f"Config from the TaskiqRunLauncher in {home / 'dagster.yaml'}")
    assert "default queue 'launcher-queue'" in chosen.source
    assert "s" * 32 not in chosen.source


def test_dagster_yaml_wins_over_the_environment_which_fills_what_it_leaves_out(
    tmp_path: Path,
) -> None:
    home = _home(tmp_path, {"broker": LAUNCHER_BROKER})
    env = _env(
        home,
        **{BROKER_ENV: "redis://127.0.0.1:6379/9", BACKEND_ENV: "redis://127.0.0.1:6379/8"},
    )
    settings = worker_config(None, None, None, env, load_settings).settings
    assert settings.broker_url == LAUNCHER_BROKER
    # resolve_settings reads the process environment for keys the file leaves out
    assert settings.default_queue == DEFAULT_QUEUE


def test_flags_and_y_take_precedence_and_dagster_yaml_is_then_not_read(tmp_path: Path) -> None:
    home = _home(tmp_path, LAUNCHER_CONFIG)
    flag = worker_config(None, "redis://127.0.0.1:6379/7", None, _env(home), load_settings)
    assert flag.settings.broker_url == "redis://127.0.0.1:6379/7"
    assert flag.settings.default_queue == DEFAULT_QUEUE
    assert flag.source.startswith("Config from --broker: ")
    path = _yaml_file(tmp_path, {"broker": "redis://127.0.0.1:6379/6", "default_queue": "from-y"})
    from_y = worker_config(path, None, None, _env(home), load_settings)
    assert (from_y.settings.broker_url, from_y.settings.default_queue) == (
        "redis://127.0.0.1:6379/6",
        "from-y",
    )
    assert from_y.source.startswith("Config from -y: ")
    both = worker_config(path, "redis://127.0.0.1:6379/5", None, _env(home), load_settings)
    assert both.settings.broker_url == "redis://127.0.0.1:6379/5"  # the flag beats -y
    assert both.settings.default_queue == "from-y"
    assert both.source.startswith("Config from -y and --broker: ")


def test_the_environment_then_the_defaults_without_a_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = _home(tmp_path, {"broker": LAUNCHER_BROKER}, cls="DefaultRunLauncher")
    defaults = worker_config(None, None, None, _env(other), load_settings)
    assert defaults.settings.broker_url == DEFAULT_URL
    assert defaults.source.startswith("Config from the defaults")
    assert worker_config(None, None, None, _env(), load_settings).source.startswith(
        "Config from the defaults"
    )
    monkeypatch.setenv(BROKER_ENV, "redis://127.0.0.1:6379/3")
    env = _env(other, **{BROKER_ENV: "redis://127.0.0.1:6379/3"})
    from_env = worker_config(None, None, None, env, load_settings)
    assert from_env.settings.broker_url == "redis://127.0.0.1:6379/3"
    assert from_env.source.startswith(f"Config from the environment ({BROKER_ENV}): ")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"broker": {"env": "UNSET_BROKER_VAR"}}, "its broker reads UNSET_BROKER_VAR"),
        ({"heartbeat_timeout": "soon"}, "heartbeat_timeout"),
        ({"config_source": {"no_such_option": 1}}, "no_such_option"),
    ],
)
def test_an_unusable_launcher_config_is_an_error_not_a_silent_fallback(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    home = _home(tmp_path, config)
    with pytest.raises(TaskiqConfigError, match=message) as raised:
        worker_config(None, None, None, _env(home), load_settings)
    assert "names TaskiqRunLauncher" in str(raised.value) or "no_such_option" in message


def _worker(name: str, queues: tuple[str, ...], broker: str) -> WorkerInfo:
    return WorkerInfo(
        name=name,
        host="h",
        pid=1,
        queues=queues,
        concurrency=1,
        running=(),
        started_at=0.0,
        last_heartbeat=0.0,
        broker=broker,
    )


def test_status_warns_about_workers_that_do_not_match_the_launcher(tmp_path: Path) -> None:
    home = _home(tmp_path, LAUNCHER_CONFIG)
    env = _env(home)
    good = _worker("good", ("launcher-queue", "compute"), LAUNCHER_BROKER)
    steps = _worker("steps", ("compute",), LAUNCHER_BROKER)
    assert launcher_mismatches(env, [good, steps]) == []
    assert launcher_mismatches(env, []) == []  # no workers: nothing to compare

    stray = _worker("stray", ("launcher-queue",), "redis://127.0.0.1:6379/0")
    (broker_warning,) = launcher_mismatches(env, [good, stray])
    assert broker_warning.startswith(
        "Worker stray on h uses broker redis://127.0.0.1:6379/0, but the launcher in "
    )
    assert f"DAGSTER_HOME={home}" in broker_warning

    warnings = launcher_mismatches(env, [steps, stray])
    assert len(warnings) == 2
    assert warnings[1].startswith(
        f"No live worker serves the launcher's default queue 'launcher-queue' on broker "
        f"{LAUNCHER_BROKER} (the workers serve compute, launcher-queue)"
    )
    assert "dagster-taskiq worker start -q launcher-queue" in warnings[1]


def test_status_says_nothing_without_a_launcher_and_reports_an_unreadable_one(
    tmp_path: Path,
) -> None:
    stray = _worker("stray", ("q",), "redis://127.0.0.1:6379/0")
    assert launcher_mismatches({}, [stray]) == []
    other = _home(tmp_path, {}, cls="DefaultRunLauncher")
    assert launcher_mismatches(_env(other), [stray]) == []
    unset = _home(tmp_path, {"broker": {"env": "UNSET_BROKER_VAR"}})
    (warning,) = launcher_mismatches(_env(unset), [stray])
    assert "its broker reads UNSET_BROKER_VAR, which is not set" in warning
