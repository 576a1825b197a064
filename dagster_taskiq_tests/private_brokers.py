"""Private Redis and RabbitMQ servers that a test may restart, pause, lock or encrypt.

The shared brokers on 6379/5672 serve every test running at the same time, so they are never
restarted. Tests that need to break a broker start their own here, on free loopback ports, with
their data under the test's temporary directory, and stop it at the end.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dagster_taskiq_tests.services import under_ci

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout):
            return True
    except OSError:
        return False


def require_binary(path: str | Path, what: str) -> str:
    """The full path of ``path`` (a name on PATH or an absolute path); skip or fail if missing."""
    found = shutil.which(str(path)) if not os.path.isabs(str(path)) else str(path)
    if found and os.access(found, os.X_OK):
        return found
    reason = f"{what} ({path}) is not installed; it is needed to start a private server"
    if under_ci():
        pytest.fail(f"{reason}; under CI=true these tests must run.")
    pytest.skip(reason)


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"Timed out after {timeout} s waiting for {what}")


# -- TLS material ----------------------------------------------------------------------------
def make_tls_files(directory: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost, made with openssl."""
    openssl = require_binary("openssl", "openssl")
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        name: directory / name
        for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "san.cnf")
    }
    files["san.cnf"].write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=dagster-taskiq test CA",
        "-keyout", str(files["ca.key"]), "-out", str(files["ca.crt"]))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", str(files["server.key"]), "-out", str(files["server.csr"]))  # fmt: skip
    run("x509", "-req", "-in", str(files["server.csr"]), "-CA", str(files["ca.crt"]),
        "-CAkey", str(files["ca.key"]), "-CAcreateserial", "-days", "2",
        "-extfile", str(files["san.cnf"]), "-out", str(files["server.crt"]))  # fmt: skip
    return files


# -- Redis -----------------------------------------------------------------------------------
class PrivateRedis:
    """A ``redis-server`` of our own on a free loopback port.

    :param workdir: where its data, log and TLS files live.
    :param appendonly: turn on AOF persistence with ``appendfsync always`` so that a restart
        loses nothing that was acknowledged.
    :param password: ``requirepass`` for the default user.
    :param acl_users: extra ``user`` ACL lines, e.g. ``"dtuser on >secret ~* &* +@all"``.
    :param tls: serve TLS only (``--tls-port``) with a self-signed CA (:func:`make_tls_files`).
    :param extra_config: more ``redis.conf`` lines, e.g. ``"replicaof 127.0.0.1 6390"``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        appendonly: bool = False,
        password: str | None = None,
        acl_users: Sequence[str] = (),
        tls: bool = False,
        extra_config: Sequence[str] = (),
    ) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.acl_users = list(acl_users)
        self.extra_config = list(extra_config)
        self.tls_files = make_tls_files(workdir / "tls") if tls else None
        self.log_path = workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        """URL of this server; with ``user``/``password`` embedded when given."""
        scheme = "rediss" if self.tls_files else "redis"
        auth = ""
        if password is not None:
            auth = f"{user or ''}:{password}@"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"

    def tls_options(self) -> dict[str, str]:
        """redis-py options that make a client trust this server's CA."""
        assert self.tls_files is not None
        return {"ssl_ca_certs": str(self.tls_files["ca.crt"]), "ssl_cert_reqs": "required"}

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            f"dir {self.workdir}",
            'save ""',
            "protected-mode no",
            f"logfile {self.log_path}",
            "daemonize no",
        ]
        if self.tls_files:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls_files['server.crt']}",
                f"tls-key-file {self.tls_files['server.key']}",
                f"tls-ca-cert-file {self.tls_files['ca.crt']}",
                "tls-auth-clients no",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.appendonly:
            lines += ["appendonly yes", "appendfsync always", "appendfilename dt.aof"]
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        lines += [f"user {spec}" for spec in self.acl_users]
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    def start(self) -> "PrivateRedis":
        """Start the server and wait until it accepts connections."""
        config = self.workdir / "redis.conf"
        config.write_text(self._config())
        ready_before = self._ready_count()
        self.process = subprocess.Popen(
            [self.binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )

        def _ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"private redis exited early:\n{self.log()[-3000:]}")
            return self._ready_count() > ready_before and port_open(self.port)

        _wait(_ready, 20, f"private redis on port {self.port}")
        return self

    def log(self) -> str:
        """The server's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _ready_count(self) -> int:
        return self.log().count("Ready to accept connections")

    def stop(self) -> None:
        """Stop the server (SIGTERM: Redis flushes its AOF before it exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _wait(lambda: not port_open(self.port), 10, f"port {self.port} to close")

    def restart(self) -> None:
        """Stop, then start again on the same port with the same data."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the server: it dies at once, without flushing or saying goodbye."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(20)

    def pause(self) -> None:
        """SIGSTOP the server: connections hang instead of being refused."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


# -- RabbitMQ --------------------------------------------------------------------------------
class PrivateRabbitMQ:
    """A RabbitMQ node of our own: own node name, ports, mnesia dir, cookie and config.

    :param workdir: where its database, logs and config live (also ``HOME``, for the cookie).
    :param consumer_timeout_ms: ``consumer_timeout``; with ``tick_ms`` it takes effect quickly.
    :param tick_ms: ``channel_tick_interval``, how often channels check the consumer timeout.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        consumer_timeout_ms: int | None = None,
        tick_ms: int | None = None,
    ) -> None:
        self.server = require_binary(RABBITMQ_BIN / "rabbitmq-server", "rabbitmq-server")
        self.ctl = require_binary(RABBITMQ_BIN / "rabbitmqctl", "rabbitmqctl")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"dt{uuid.uuid4().hex[:8]}@localhost"
        self.consumer_timeout_ms = consumer_timeout_ms
        self.tick_ms = tick_ms
        self.pid_file = workdir / "rabbit.pid"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "") -> str:
        """AMQP URL of this node."""
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{vhost}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.workdir),
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.workdir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.workdir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _write_config(self) -> None:
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "enabled_plugins").write_text("[].\n")
        conf = [f"listeners.tcp.default = 127.0.0.1:{self.port}", "loopback_users = none"]
        if self.consumer_timeout_ms is not None:
            conf.append(f"consumer_timeout = {self.consumer_timeout_ms}")
        (self.workdir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        advanced = []
        if self.tick_ms is not None:
            advanced.append(f"{{channel_tick_interval, {self.tick_ms}}}")
        (self.workdir / "advanced.config").write_text(f"[{{rabbit, [{', '.join(advanced)}]}}].\n")

    def ctl_run(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> ARGS`` and return its output."""
        result = subprocess.run(
            [self.ctl, "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def start(self) -> "PrivateRabbitMQ":
        """Start the node and wait until the broker accepts AMQP connections."""
        self._write_config()
        self.pid_file.unlink(missing_ok=True)
        with open(self.workdir / "server.out", "ab") as out:
            self.process = subprocess.Popen(
                [self.server],
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.ctl_run("wait", str(self.pid_file), "--timeout", "90", timeout=100)
        _wait(lambda: port_open(self.port), 30, f"private RabbitMQ on port {self.port}")
        return self

    def stop(self) -> None:
        """Stop the node cleanly (messages in durable queues survive)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.ctl_run("stop", timeout=60)
        except (AssertionError, subprocess.TimeoutExpired):
            pass
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        _wait(lambda: not port_open(self.port), 20, f"port {self.port} to close")

    def ensure_running(self) -> "PrivateRabbitMQ":
        """Start the node again if a test left it stopped."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        return self

    def restart(self) -> None:
        """Stop the node and start it again with the same data."""
        self.stop()
        self.start()

    def add_user(self, user: str, password: str, vhost: str) -> None:
        """Create ``vhost`` and a user with full rights on it only."""
        self.ctl_run("add_vhost", vhost)
        self.ctl_run("add_user", user, password)
        self.ctl_run("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
