"""One source of config on real processes: a worker started with only ``DAGSTER_HOME`` serves
the launcher's queue, and ``status`` warns about a worker that does not match the launcher."""

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from dagster._core.storage.dagster_run import DagsterRunStatus

from dagster_taskiq.cli import main as cli
from dagster_taskiq.config import redact_url
from dagster_taskiq_tests.harness import (
    WorkerProcess,
    executor_config,
    isolated_settings,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.launcher_harness import launcher_env
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, require


def _status(settings_file: Path) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["status", "--json", "-y", str(settings_file)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_a_worker_with_only_dagster_home_serves_the_launcher_and_status_warns_on_drift(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    require(REDIS_URL, "Redis")
    settings = isolated_settings("redis", REDIS_URL, AMQP_URL, heartbeat_timeout=10.0)
    with launcher_env("redis", tmp_path_factory, settings) as env:
        worker = env.workers.start(from_instance=True)
        assert "-y" not in worker.command() and "-q" not in worker.command()
        info = run_async(settings, lambda conn: conn.keystore.get_worker(worker.name))
        assert info.queues == (settings.default_queue,)
        assert info.broker == redact_url(settings.broker_url)
        assert f"Config from the TaskiqRunLauncher in {env.home / 'dagster.yaml'}" in worker.log()

        run_id = env.launch("noop_job")
        run = env.wait_status(run_id)
        assert run.status == DagsterRunStatus.SUCCESS, env.describe(run_id)
        record = env.record(env.task_id(run_id))
        assert record.worker == worker.name

        settings_file = tmp_path / "status.yaml"
        settings_file.write_text(yaml.safe_dump(executor_config(settings)))
        assert _status(settings_file)["warnings"] == []

        # Same key store, another broker: it registers, but never sees the launcher's tasks.
        stray_broker = f"{REDIS_URL.rsplit('/', 1)[0]}/1"
        stray = WorkerProcess(
            dataclasses.replace(settings, broker_url=stray_broker), env.home, log_dir=tmp_path
        )
        try:
            stray.start()
            (warning,) = _status(settings_file)["warnings"]
            assert warning.startswith(
                f"Worker {stray.name} on {info.host} uses broker {redact_url(stray_broker)}, "
                f"but the launcher in {env.home / 'dagster.yaml'} sends to "
                f"{redact_url(settings.broker_url)}"
            )
            text = CliRunner().invoke(cli, ["status", "-y", str(settings_file)])
            assert text.exit_code == 0 and "WARNINGS" in text.output
            assert f"Worker {stray.name} on" in text.output

            # With the launcher's worker gone, nothing serves its queue on its broker.
            assert worker.stop() == 0
            warnings = wait_for(
                lambda: (w := _status(settings_file)["warnings"]) and len(w) == 2 and w,
                30,
                0.2,
                "status to warn that the launcher's queue is unserved",
            )
            assert warnings[1].startswith(
                f"No live worker serves the launcher's default queue '{settings.default_queue}'"
            )
        finally:
            stray.stop()
