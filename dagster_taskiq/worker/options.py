"""A worker's options, and small helpers shared by its parts."""

import dataclasses
import os
import signal
import socket
from collections.abc import Sequence

from dagster_taskiq.lifecycle.keys import validate_worker_name


def worker_name_for(pid: int) -> str:
    """``<host>-<pid>`` for a worker process ``pid`` on this host (made a valid worker name)."""
    host = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in socket.gethostname())
    return f"{host.lstrip('._-') or 'worker'}-{pid}"


def default_worker_name() -> str:
    """``<host>-<pid>``: unique per process on a host."""
    return worker_name_for(os.getpid())


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How a worker serves: its name, queues, slots and timings."""

    name: str
    queues: tuple[str, ...] = ("dagster",)
    concurrency: int = 1
    heartbeat_interval: float = 1.0
    liveness_ttl: float = 10.0
    shutdown_timeout: float | None = None
    includes: tuple[str, ...] = ()
    #: ``--metrics-port``: serve /metrics, /healthz and /readyz there (None: no metrics).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        validate_worker_name(self.name)


def describe_exit(code: int) -> str:
    """``was killed by SIGKILL`` or ``exited with code 3``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}"
    return f"exited with code {code}"


def parse_queues(queues: Sequence[str], default: str) -> tuple[str, ...]:
    """Split comma-separated ``-q`` values; default to ``default``."""
    names: list[str] = []
    for value in queues:
        names.extend(part.strip() for part in value.split(",") if part.strip())
    return tuple(dict.fromkeys(names)) or (default,)
