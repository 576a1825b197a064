"""Test harness: isolated settings per test, real worker processes, condition waits."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dagster_taskiq.config import (
    BACKEND_ENV,
    BROKER_ENV,
    SIGNING_KEY_ENV,
    TaskiqSettings,
    settings_to_config,
)
from dagster_taskiq.connection import TaskiqConnection

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"Timed out after {timeout} s waiting for {what} (last value: {last!r})")


def isolated_settings(
    kind: str, redis_url: str, amqp_url: str, *, heartbeat_timeout: float = 30.0, **source: Any
) -> TaskiqSettings:
    """Settings with a unique key prefix and queue so tests never see each other's tasks."""
    uid = uuid.uuid4().hex[:10]
    config_source: dict[str, Any] = {"key_prefix": f"dt-test-{uid}", "result_ttl": 3600, **source}
    if kind == "rabbitmq":
        config_source.setdefault("exchange", f"dt-test-{uid}")
        config_source.setdefault("queue_arguments", {"x-expires": 600_000})
    return TaskiqSettings(
        broker_url=redis_url if kind == "redis" else amqp_url,
        backend_url=redis_url,
        default_queue=f"dagster-{uid}",
        heartbeat_timeout=heartbeat_timeout,
        config_source=config_source,
    )


def executor_config(settings: TaskiqSettings, **extra: Any) -> dict[str, Any]:
    """``run_config`` that points ``taskiq_executor`` at ``settings``."""
    return {"execution": {"config": {**settings_to_config(settings), **extra}}}


def run_async(settings: TaskiqSettings, factory: Callable[[TaskiqConnection], Any]) -> Any:
    """Run ``factory(connection)`` on a fresh connection (test-side inspection)."""

    async def _main() -> Any:
        conn = TaskiqConnection(settings)
        try:
            await conn.start()
            return await factory(conn)
        finally:
            await conn.close()

    return asyncio.run(_main())


class WorkerProcess:
    """A real ``dagster-taskiq worker start`` process."""

    def __init__(
        self,
        settings: TaskiqSettings,
        dagster_home: Path,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 1,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        stdout_path: Path | None = None,
        from_instance: bool = False,
    ) -> None:
        self.settings = settings
        self.name = name or f"w-{uuid.uuid4().hex[:6]}"
        self.queues = list(queues or [settings.default_queue])
        self.concurrency = concurrency
        self.dagster_home = dagster_home
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        #: Where the worker's stdout goes (its log file, with stderr, unless given).
        self.stdout_path = stdout_path
        #: Start with no -y and no -q: the worker takes $DAGSTER_HOME's launcher config.
        self.from_instance = from_instance
        self.log_path = (log_dir or dagster_home) / f"worker-{self.name}.log"
        self.config_path = (log_dir or dagster_home) / f"worker-{self.name}.yaml"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The exact command line the worker runs with."""
        args = [sys.executable, "-m", "dagster_taskiq.cli", "worker", "start"]
        if not self.from_instance:
            args += ["-y", str(self.config_path)]
            for queue in self.queues:
                args += ["-q", queue]
        args += ["-c", str(self.concurrency), "-n", self.name, "--heartbeat-interval", "0.5"]
        return args + self.extra_args

    def start(self, wait: bool = True) -> "WorkerProcess":
        """Start the process; with ``wait``, return once it has registered its heartbeat."""
        self.config_path.write_text(yaml.safe_dump(executor_config(self.settings)))
        with contextlib.ExitStack() as files:
            log = files.enter_context(open(self.log_path, "ab"))
            out = files.enter_context(open(self.stdout_path, "ab")) if self.stdout_path else None
            self.process = subprocess.Popen(
                self.command(),
                stdout=out or log,
                stderr=log if out else subprocess.STDOUT,
                env=self.environment(),
                cwd=str(REPO_ROOT),
            )
        if wait:
            self.wait_registered()
        return self

    def environment(self) -> dict[str, str]:
        """The worker process's environment: this one's, with the test's Dagster home."""
        env = dict(os.environ)
        env["DAGSTER_HOME"] = str(self.dagster_home)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        if self.from_instance:  # the launcher's config must be what the worker runs with
            for name in (BROKER_ENV, BACKEND_ENV, SIGNING_KEY_ENV):
                env.pop(name, None)
        env.update(self.extra_env)
        return env

    def wait_registered(self, timeout: float = 60.0) -> None:
        """Wait until this worker's liveness record exists."""

        def _registered() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.log()}")
            return bool(run_async(self.settings, lambda c: c.keystore.worker_alive(self.name)))

        wait_for(_registered, timeout, interval=0.1, what=f"worker {self.name} to register")

    @property
    def pid(self) -> int:
        """The worker's process id."""
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        """Everything the worker has logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait for exit; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"worker {self.name} did not stop within {timeout} s:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the worker (simulates a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class WorkerPool:
    """Starts workers for a test and stops them all at teardown."""

    def __init__(self, settings: TaskiqSettings, dagster_home: Path) -> None:
        self.settings = settings
        self.dagster_home = dagster_home
        self.workers: list[WorkerProcess] = []

    def start(self, wait: bool = True, **kwargs: Any) -> WorkerProcess:
        """Start one more worker (see :class:`WorkerProcess` for options)."""
        worker = WorkerProcess(self.settings, self.dagster_home, **kwargs)
        self.workers.append(worker)
        return worker.start(wait=wait)

    def stop_all(self, timeout: float = 20.0) -> None:
        """Stop every worker this pool started (kill those that will not stop).

        All are sent SIGTERM first, so that they shut down in parallel.
        """
        running = [w.process for w in self.workers if w.process and w.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __iter__(self) -> Iterator[WorkerProcess]:
        return iter(self.workers)
