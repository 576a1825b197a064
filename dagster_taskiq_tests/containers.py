"""Where the test brokers come from: the environment, Docker containers, or local servers.

The choice, made once per test session (by the pytest process that starts the others):

1. ``DAGSTER_TASKIQ_TEST_REDIS_URL`` / ``DAGSTER_TASKIQ_TEST_AMQP_URL`` set: use them as they are.
2. Else, when a Docker engine answers (``docker.from_env().ping()``): start a Redis and a
   RabbitMQ container, published on free loopback ports, and point the variables at them (the
   pytest-xdist workers inherit them). They are removed when the session ends.
3. Else: the local servers on their default ports (``.ci/run`` starts them), as before.

CI on the development machines takes path 3: they have no Docker engine.
"""

import atexit
import enum
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

REDIS_ENV = "DAGSTER_TASKIQ_TEST_REDIS_URL"
AMQP_ENV = "DAGSTER_TASKIQ_TEST_AMQP_URL"
#: Set by the process that made the choice, so that pytest-xdist workers do not choose again.
SOURCE_ENV = "DAGSTER_TASKIQ_TEST_BROKERS"

REDIS_IMAGE = "redis:7"
RABBITMQ_IMAGE = "rabbitmq:3-management"
#: Seconds a container may take to accept connections.
READY_TIMEOUT = 90.0


class BrokerSource(str, enum.Enum):
    """Where this session's test brokers come from."""

    ENVIRONMENT = "environment"
    DOCKER = "docker"
    LOCAL = "local"


def docker_client() -> Any | None:
    """A Docker client whose engine answers a ping, or ``None`` (no SDK, no engine)."""
    try:
        import docker
    except ImportError:
        return None
    try:
        client = docker.from_env(timeout=5)
        client.ping()
    except Exception:
        return None
    return client


def choose_source(
    environ: Mapping[str, str], client_factory: Callable[[], Any | None]
) -> tuple[BrokerSource, Any | None]:
    """Decide where the brokers come from; with Docker, also return the client to start them."""
    if environ.get(SOURCE_ENV):
        return BrokerSource(environ[SOURCE_ENV]), None
    if environ.get(REDIS_ENV) or environ.get(AMQP_ENV):
        return BrokerSource.ENVIRONMENT, None
    client = client_factory()
    if client is not None:
        return BrokerSource.DOCKER, client
    return BrokerSource.LOCAL, None


@dataclass
class BrokerContainers:
    """A Redis and a RabbitMQ container started for one test session."""

    client: Any
    containers: list[Any] = field(default_factory=list)
    redis_url: str = ""
    amqp_url: str = ""

    def start(self, ready: Callable[[str], bool]) -> "BrokerContainers":
        """Start both containers on free loopback ports; wait until ``ready(url)`` holds."""
        redis = self._run(REDIS_IMAGE, "6379/tcp")
        rabbit = self._run(RABBITMQ_IMAGE, "5672/tcp")
        self.redis_url = f"redis://127.0.0.1:{_host_port(redis, '6379/tcp')}/0"
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:{_host_port(rabbit, '5672/tcp')}/"
        deadline = time.monotonic() + READY_TIMEOUT
        for url in (self.redis_url, self.amqp_url):
            while not ready(url):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the test broker container at {url} did not start")
                time.sleep(0.5)
        return self

    def _run(self, image: str, port: str) -> Any:
        container = self.client.containers.run(
            image, detach=True, remove=True, ports={port: ("127.0.0.1", None)}
        )
        self.containers.append(container)
        container.reload()  # the published port is known once the container runs
        return container

    def stop(self) -> None:
        """Remove the containers (best effort: the session is ending)."""
        for container in self.containers:
            try:
                container.stop(timeout=5)
            except Exception:
                pass
        self.containers.clear()


def _host_port(container: Any, port: str) -> int:
    bindings = container.attrs["NetworkSettings"]["Ports"][port]
    return int(bindings[0]["HostPort"])


def prepare_brokers(
    environ: MutableMapping[str, str],
    client_factory: Callable[[], Any | None],
    ready: Callable[[str], bool],
) -> BrokerSource:
    """Make the choice once and publish it in ``environ`` (workers inherit it)."""
    source, client = choose_source(environ, client_factory)
    if source is BrokerSource.DOCKER and not environ.get(REDIS_ENV):
        containers = BrokerContainers(client).start(ready)
        atexit.register(containers.stop)
        environ[REDIS_ENV] = containers.redis_url
        environ[AMQP_ENV] = containers.amqp_url
    environ[SOURCE_ENV] = source.value
    return source


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether the server at ``url`` speaks its protocol yet (Redis answers PING; RabbitMQ
    answers the AMQP 0-9-1 header with Connection.Start), not merely accepts TCP: a published
    container port accepts connections before the server inside is up."""
    parts = urlsplit(url)
    redis = parts.scheme.startswith("redis")
    port = parts.port or (6379 if redis else 5672)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n" if redis else b"AMQP\x00\x00\x09\x01")
            reply = sock.recv(16)
    except OSError:
        return False
    return reply.startswith(b"+PONG") if redis else reply[:1] == b"\x01"
