"""Where the test brokers come from: the choice between the environment, Docker and local
servers, with a fake Docker client (this machine has no engine)."""

from typing import Any

from dagster_taskiq_tests.containers import (
    AMQP_ENV,
    REDIS_ENV,
    SOURCE_ENV,
    BrokerSource,
    prepare_brokers,
)


class FakeContainer:
    def __init__(self, port: str, host_port: int) -> None:
        self.attrs = {"NetworkSettings": {"Ports": {port: [{"HostPort": str(host_port)}]}}}
        self.stopped = False

    def reload(self) -> None:
        pass

    def stop(self, timeout: int) -> None:
        self.stopped = True


class FakeClient:
    def __init__(self) -> None:
        self.started: list[tuple[str, Any]] = []
        self.containers = self

    def run(self, image: str, **options: Any) -> FakeContainer:
        (port,) = options["ports"]
        assert options["ports"][port] == ("127.0.0.1", None)  # loopback, a free port
        self.started.append((image, port))
        return FakeContainer(port, 40000 + len(self.started))


def test_urls_in_the_environment_win() -> None:
    environ = {REDIS_ENV: "redis://127.0.0.1:7000/0"}
    source = prepare_brokers(environ, lambda: FakeClient(), lambda url: True)
    assert source is BrokerSource.ENVIRONMENT and environ[SOURCE_ENV] == "environment"


def test_a_reachable_docker_engine_gets_containers() -> None:
    client = FakeClient()
    environ: dict[str, str] = {}
    source = prepare_brokers(environ, lambda: client, lambda url: True)
    assert source is BrokerSource.DOCKER
    assert [image for image, _ in client.started] == ["redis:7", "rabbitmq:3-management"]
    assert environ[REDIS_ENV] == "redis://127.0.0.1:40001/0"
    assert environ[AMQP_ENV] == "amqp://guest:guest@127.0.0.1:40002/"
    # pytest-xdist workers inherit the choice and start nothing themselves.
    again = FakeClient()
    assert prepare_brokers(environ, lambda: again, lambda url: True) is BrokerSource.DOCKER
    assert again.started == []


def test_without_an_engine_the_local_servers_are_used() -> None:
    environ: dict[str, str] = {}
    assert prepare_brokers(environ, lambda: None, lambda url: True) is BrokerSource.LOCAL
    assert REDIS_ENV not in environ and environ[SOURCE_ENV] == "local"
