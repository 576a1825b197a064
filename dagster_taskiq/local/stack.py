"""The local stack behind ``demo`` and ``dev``: a broker, a Dagster instance and worker processes.

:class:`LocalStack` picks the broker (a URL the user gave, a Redis already running, or the
embedded Redis), writes a ``dagster.yaml`` that sets :class:`~dagster_taskiq.TaskiqRunLauncher`
in a private ``DAGSTER_HOME``, starts real ``dagster-taskiq worker start`` processes, and stops
everything it started, in order, when it is closed.
"""

import dataclasses
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import redis
import yaml

from dagster_taskiq.config import (
    BACKEND_ENV,
    BROKER_ENV,
    DEFAULT_QUEUE,
    TaskiqSettings,
    broker_kind,
    redact_url,
    settings_to_config,
)
from dagster_taskiq.connection import TaskiqClient
from dagster_taskiq.embedded import EmbeddedRedis
from dagster_taskiq.lifecycle.records import WorkerInfo
from dagster_taskiq.local.processes import ManagedProcess
from dagster_taskiq.redis_clients import make_sync_redis

#: Where the demo looks for a Redis that is already running when no broker is configured.
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


def read_config_yaml(path: str | None) -> dict[str, Any]:
    """The ``execution: {config: ...}`` mapping of a ``-y`` file, validated like the executor's.

    Keys the file does not set are absent (so a missing ``broker`` means "not configured").
    """
    if not path:
        return {}
    from dagster_taskiq.compat import Field, process_config
    from dagster_taskiq.executor import executor_config_schema

    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise click.ClickException(f"Cannot read config file {path}: {exc.strerror}.") from None
    except yaml.YAMLError as exc:
        raise click.ClickException(f"Config file {path} is not valid YAML: {exc}") from None
    execution = loaded.get("execution") if isinstance(loaded, dict) else None
    raw = (execution or {}).get("config") if isinstance(execution, dict) else None
    if not isinstance(loaded, dict) or (raw is not None and not isinstance(raw, dict)):
        raise click.ClickException(
            f"Config file {path} must be a mapping like 'execution: {{config: {{...}}}}'."
        )
    result = process_config(Field(executor_config_schema()).config_type, dict(raw or {}))
    if not result.success:
        errors = "; ".join(error.message for error in result.errors or [])
        raise click.ClickException(f"Invalid config in {path}: {errors}")
    return dict(raw or {})


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis server at ``url`` answers PING within ``timeout`` seconds."""
    try:
        client = make_sync_redis(url, timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class BrokerDecision:
    """Which broker and backend a local command uses, and why.

    ``None`` for ``broker_url`` means "start the embedded Redis and use it"; ``None`` for
    ``backend_url`` means "the broker when it is Redis, else the embedded Redis".
    """

    broker_url: str | None
    backend_url: str | None
    reason: str

    @property
    def needs_embedded(self) -> bool:
        """Whether the embedded Redis must be started."""
        if self.broker_url is None:
            return True
        return self.backend_url is None and broker_kind(self.broker_url) != "redis"


def decide_broker(
    *,
    broker: str | None,
    backend: str | None,
    config: Mapping[str, Any],
    env: Mapping[str, str],
    force_embedded: bool,
    probe_url: str | None,
    config_origin: str = "the -y config file",
) -> BrokerDecision:
    """Pick the broker: ``--broker``, the ``-y`` file, ``DAGSTER_TASKIQ_BROKER_URL``, a Redis
    answering at ``probe_url`` (when given), else the embedded Redis.

    ``--embedded`` always picks the embedded Redis (it cannot be combined with ``--broker``).
    """
    backend = backend or config.get("backend") or env.get(BACKEND_ENV) or None
    if force_embedded:
        if broker:
            raise click.UsageError("--embedded and --broker cannot be used together.")
        return BrokerDecision(None, backend, "embedded Redis (--embedded)")
    for value, origin in (
        (broker, "--broker"),
        (config.get("broker"), config_origin),
        (env.get(BROKER_ENV), BROKER_ENV),
    ):
        if value:
            broker_kind(str(value))
            return BrokerDecision(str(value), backend, f"{redact_url(str(value))} (from {origin})")
    if probe_url and redis_answers(probe_url):
        return BrokerDecision(
            probe_url,
            backend or probe_url,
            f"the Redis already running at {probe_url} (pass --embedded to use a private one)",
        )
    where = f"; nothing answers at {probe_url}" if probe_url else ""
    return BrokerDecision(None, backend, f"embedded Redis (no broker configured{where})")


class LocalStack:
    """Broker, ``DAGSTER_HOME`` and worker processes of one local command.

    :param label: short name used in temporary paths and messages (``demo``, ``dev``).
    :param keep: keep the temporary directory (instance, logs) when the stack is closed.
    """

    def __init__(self, label: str, *, keep: bool = False) -> None:
        self.label = label
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix=f"dagster-taskiq-{label}-"))
        self.dagster_home = self.root / "dagster_home"
        self.dagster_home.mkdir()
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir()
        self.embedded: EmbeddedRedis | None = None
        self.decision: BrokerDecision | None = None
        self._settings: TaskiqSettings | None = None
        self._client: TaskiqClient | None = None
        self._cleanup_prefix: str | None = None
        self.processes: list[ManagedProcess] = []
        self.workers: dict[str, ManagedProcess] = {}

    # -- broker ------------------------------------------------------------------------------
    def open_broker(
        self,
        decision: BrokerDecision,
        config: Mapping[str, Any],
        *,
        isolate: bool = False,
    ) -> TaskiqSettings:
        """Start the embedded Redis if ``decision`` needs it and return the settings to use.

        With ``isolate`` and a broker the user also uses for other things, every key gets a
        unique prefix, and the stack deletes those keys when it closes.
        """
        self.decision = decision
        if decision.needs_embedded:
            self.embedded = EmbeddedRedis().start()
        broker = decision.broker_url or self._embedded_url()
        backend = decision.backend_url
        if backend is None:
            backend = broker if broker_kind(broker) == "redis" else self._embedded_url()
        source = dict(config.get("config_source") or {})
        if isolate and decision.broker_url is not None and "key_prefix" not in source:
            source["key_prefix"] = f"dagster_taskiq_{self.label}_{uuid.uuid4().hex[:8]}"
            source.setdefault("result_ttl", 3600)
            self._cleanup_prefix = source["key_prefix"]
        self._settings = TaskiqSettings(
            broker_url=broker,
            backend_url=backend,
            default_queue=str(config.get("default_queue") or DEFAULT_QUEUE),
            heartbeat_timeout=float(config.get("heartbeat_timeout") or 30.0),
            config_source=source,
        )
        return self._settings

    def _embedded_url(self) -> str:
        assert self.embedded is not None
        return self.embedded.url

    @property
    def settings(self) -> TaskiqSettings:
        """The settings chosen by :meth:`open_broker`."""
        if self._settings is None:
            raise RuntimeError("open_broker() was not called")
        return self._settings

    @property
    def client(self) -> TaskiqClient:
        """A taskiq client for the stack's broker (one bridge thread, created on first use)."""
        if self._client is None:
            self._client = TaskiqClient(self.settings)
        return self._client

    def use_client(self, client: TaskiqClient) -> None:
        """Share an existing client (for example the run launcher's) instead of making one."""
        self._client = client

    def describe_broker(self) -> str:
        """One line: the broker URL (redacted) and why it was chosen."""
        assert self.decision is not None
        url = redact_url(self.settings.broker_url)
        if self.embedded is not None and self.decision.broker_url is None:
            return f"{url}  [embedded Redis, pid {self.embedded.pid}, stopped on exit]"
        if self.embedded is not None:
            return (
                f"{self.decision.reason}; results and heartbeats in an embedded Redis "
                f"({self.embedded.url})"
            )
        return self.decision.reason

    # -- Dagster instance --------------------------------------------------------------------
    def write_instance(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``dagster.yaml`` with ``TaskiqRunLauncher`` for these settings; return its path."""
        launcher_config = {
            k: v for k, v in settings_to_config(self.settings).items() if v not in ({}, None)
        }
        document: dict[str, Any] = {
            "run_launcher": {
                "module": "dagster_taskiq",
                "class": "TaskiqRunLauncher",
                "config": launcher_config,
            },
            "telemetry": {"enabled": False},
            **(extra or {}),
        }
        path = self.dagster_home / "dagster.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        path.chmod(0o600)
        return path

    def child_env(self) -> dict[str, str]:
        """Environment for every child: this instance, and the chosen broker and backend."""
        env = dict(os.environ)
        env["DAGSTER_HOME"] = str(self.dagster_home)
        env[BROKER_ENV] = self.settings.broker_url
        env[BACKEND_ENV] = self.settings.backend_url
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- processes ---------------------------------------------------------------------------
    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_to_file: bool = True,
        cwd: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        keep_line: Callable[[bytes], bool] | None = None,
    ) -> ManagedProcess:
        """Start a process with :meth:`child_env` (plus ``extra_env``); its output goes to a log
        file or this one's (without the lines ``keep_line`` rejects)."""
        log_path = self.log_dir / f"{name.replace(' ', '-')}.log" if log_to_file else None
        env = {**self.child_env(), **(extra_env or {})}
        process = ManagedProcess(
            name, argv, env=env, cwd=cwd, log_path=log_path, keep_line=keep_line
        )
        self.processes.append(process.start())
        return process

    def worker_config_path(self) -> Path:
        """The ``-y`` file every worker of the stack reads (executor config shape)."""
        path = self.root / "worker.yaml"
        if not path.exists():
            document = {"execution": {"config": settings_to_config(self.settings)}}
            path.write_text(yaml.safe_dump(document), encoding="utf-8")
            path.chmod(0o600)
        return path

    def start_worker(
        self,
        name: str,
        queues: Sequence[str],
        concurrency: int,
        *,
        log_to_file: bool = True,
        extra_args: Sequence[str] = (),
    ) -> ManagedProcess:
        """Start ``dagster-taskiq worker start`` serving ``queues`` with ``concurrency`` slots."""
        argv = [
            sys.executable,
            "-m",
            "dagster_taskiq.cli",
            "worker",
            "start",
            "-y",
            str(self.worker_config_path()),
            "-n",
            name,
            "-c",
            str(concurrency),
        ]
        for queue in queues:
            argv += ["-q", queue]
        process = self.spawn(f"worker {name}", [*argv, *extra_args], log_to_file=log_to_file)
        self.workers[name] = process
        return process

    def live_workers(self) -> list[WorkerInfo]:
        """Live workers of this stack's broker, as the key store lists them."""
        return list(self.client.run(lambda conn: conn.keystore.list_workers()))

    def wait_for_workers(self, timeout: float = 60.0) -> list[WorkerInfo]:
        """Wait until every started worker has registered; raise if one exits or time runs out."""
        deadline = time.monotonic() + timeout
        wanted = set(self.workers)
        while True:
            for name, process in self.workers.items():
                if not process.running:
                    raise click.ClickException(
                        f"Worker {name} exited with code {process.returncode} while starting. "
                        f"Its log ends with:\n{process.log_tail()}"
                    )
            live = [w for w in self.live_workers() if w.name in wanted]
            if {w.name for w in live} == wanted:
                return live
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(wanted - {w.name for w in live}))
                raise click.ClickException(
                    f"Worker(s) {missing} did not register within {timeout:.0f} s; see the logs "
                    f"in {self.log_dir}."
                )
            time.sleep(0.1)

    # -- shutdown ----------------------------------------------------------------------------
    def close(self, worker_timeout: float = 20.0) -> None:
        """Stop the other processes (newest first), then all workers at once, then the embedded
        Redis; delete the stack's keys when they were isolated; remove the temporary files."""
        workers = [p for p in self.processes if p in self.workers.values()]
        for process in reversed(self.processes):
            if process not in workers:
                process.stop(30.0)
        for process in workers:
            process.begin_stop()
        for process in workers:
            process.finish_stop(worker_timeout)
        self.processes.clear()
        if self._cleanup_prefix and self._client is not None:
            # Only a stack that talked to the broker can have written keys there.
            self._delete_keys(self._cleanup_prefix)
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def _delete_keys(self, prefix: str) -> None:
        async def _delete(conn: Any) -> None:
            clients = {id(c): c for c in (conn.backend_redis, conn.broker_redis) if c is not None}
            for client in clients.values():
                batch: list[Any] = []
                async for key in client.scan_iter(match=f"{prefix}:*", count=500):
                    batch.append(key)
                    if len(batch) >= 500:
                        await client.unlink(*batch)
                        batch.clear()
                if batch:
                    await client.unlink(*batch)

        try:
            self.client.run(_delete)
        except Exception:  # the broker may be gone; the keys expire on their own
            return
