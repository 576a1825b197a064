"""A private Redis Sentinel setup on loopback: one master, one replica, three sentinels.

Every process is our own ``redis-server`` on a free port, with its files under the test's
temporary directory, so a test may kill the master and watch the sentinels promote the replica.
The sentinels notice a dead master after ``down_after_ms`` and fail over at once.
"""

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from dagster_taskiq_tests.private_brokers import PrivateRedis, free_port, port_open, require_binary

MASTER_NAME = "dtmaster"


def _wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except (redis.RedisError, OSError) as exc:
            last = exc
        if last and not isinstance(last, BaseException):
            return last
        time.sleep(0.1)
    raise AssertionError(f"Timed out after {timeout} s waiting for {what} (last: {last!r})")


class PrivateSentinel:
    """One ``redis-server --sentinel`` watching :data:`MASTER_NAME`."""

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        *,
        password: str | None,
        down_after_ms: int,
        failover_timeout_ms: int,
    ) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.master_port = master_port
        self.password = password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.log_path = workdir / "sentinel.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode no",
            "daemonize no",
            f"dir {self.workdir}",
            f"logfile {self.log_path}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {self.password}")
        return "\n".join(lines) + "\n"

    def start(self) -> "PrivateSentinel":
        """Start the sentinel (it rewrites its own config file) and wait for its port."""
        config = self.workdir / "sentinel.conf"
        config.write_text(self._config())
        self.process = subprocess.Popen(
            [self.binary, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

        def _ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"private sentinel exited early:\n{self.log()[-3000:]}")
            return port_open(self.port)

        _wait(_ready, 20, f"sentinel on port {self.port}")
        return self

    def client(self) -> redis.Redis:
        """A client of this sentinel itself."""
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def master_state(self) -> dict[str, Any]:
        """``SENTINEL MASTER`` for :data:`MASTER_NAME`, as a dict of strings."""
        with self.client() as client:
            raw = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)
        if isinstance(raw, dict):
            return {_text(k): _text(v) for k, v in raw.items()}
        return {_text(raw[i]): _text(raw[i + 1]) for i in range(0, len(raw), 2)}

    def log(self) -> str:
        """The sentinel's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the sentinel."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class PrivateSentinelGroup:
    """A master, a replica of it and three sentinels, all private and on loopback.

    :param password: ``requirepass`` (and ``masterauth``) of both data nodes; the sentinels have
        no password of their own.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        password: str | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.workdir = workdir
        self.password = password
        auth = [f"masterauth {password}"] if password is not None else []
        self.master = PrivateRedis(workdir / "node-a", password=password, extra_config=auth)
        self.replica = PrivateRedis(
            workdir / "node-b",
            password=password,
            extra_config=[*auth, f"replicaof 127.0.0.1 {self.master.port}"],
        )
        self.sentinels = [
            PrivateSentinel(
                workdir / f"sentinel-{i}",
                self.master.port,
                password=password,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
            )
            for i in range(3)
        ]

    @property
    def nodes(self) -> list[PrivateRedis]:
        """Both data nodes, whichever is master now."""
        return [self.master, self.replica]

    def start(self) -> "PrivateSentinelGroup":
        """Start everything; return once the replica is in sync and every sentinel knows the
        replica and the two other sentinels (so a failover can be agreed on)."""
        self.master.start()
        self.replica.start()
        _wait(
            lambda: self._data_client(self.replica.port).info("replication")["master_link_status"]
            == "up",
            30,
            "the replica to sync with the master",
        )
        for sentinel in self.sentinels:
            sentinel.start()
        for sentinel in self.sentinels:
            _wait(
                lambda s=sentinel: (
                    int(s.master_state()["num-slaves"]) >= 1
                    and int(s.master_state()["num-other-sentinels"]) >= 2
                ),
                60,
                f"sentinel {sentinel.port} to see the replica and the other sentinels",
            )
        return self

    def url(self, db: int = 0) -> str:
        """The ``redis+sentinel://`` URL of this group."""
        auth = f":{self.password}@" if self.password is not None else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{MASTER_NAME}/{db}"

    def _data_client(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port, password=self.password, socket_timeout=5, socket_connect_timeout=2
        )

    def master_port(self) -> int:
        """The master's port as the first answering sentinel reports it."""
        for sentinel in self.sentinels:
            try:
                port = self._sentinel_master_port(sentinel)
            except (redis.RedisError, OSError):
                continue
            if port:
                return port
        raise AssertionError("no sentinel answered")

    def current_master(self) -> PrivateRedis:
        """The data node that is master now."""
        port = self.master_port()
        return next(node for node in self.nodes if node.port == port)

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Block until the replica has acknowledged every write the master has taken so far."""
        master = self.current_master()
        with self._data_client(master.port) as client:
            _wait(
                lambda: int(client.execute_command("WAIT", 1, 1000)) >= 1,
                timeout,
                "the replica to acknowledge the master's writes",
            )

    def kill_master(self) -> PrivateRedis:
        """SIGKILL the current master; return it."""
        master = self.current_master()
        master.kill()
        return master

    def wait_failover(self, old: PrivateRedis, timeout: float = 90.0) -> PrivateRedis:
        """Wait until every sentinel names another node as master and that node says it is
        master; return it."""

        def _promoted() -> PrivateRedis | None:
            ports = {self._sentinel_master_port(s) for s in self.sentinels}
            if len(ports) != 1 or old.port in ports:
                return None
            node = next(n for n in self.nodes if n.port in ports)
            with self._data_client(node.port) as client:
                role = client.info("replication")["role"]
            return node if role == "master" else None

        return _wait(_promoted, timeout, f"the sentinels to promote a replica of {old.port}")

    @staticmethod
    def _sentinel_master_port(sentinel: PrivateSentinel) -> int:
        """The master's port as ``sentinel`` reports it (0 if it names none)."""
        with sentinel.client() as client:
            address = client.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(address[1]) if address else 0

    def logs(self) -> str:
        """Every process's log tail, for failure messages."""
        parts = [f"--- {n.workdir.name}\n{n.log()[-2000:]}" for n in self.nodes]
        parts += [f"--- sentinel {s.port}\n{s.log()[-2000:]}" for s in self.sentinels]
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the sentinels, then the data nodes that still run."""
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.stop()
