"""The embedded Redis: a real redis-server owned by the process that starts it."""

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import redis

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqClient
from dagster_taskiq.embedded import EmbeddedRedis, find_redis_server
from dagster_taskiq.errors import BrokerUnavailableError
from dagster_taskiq_tests.harness import REPO_ROOT, wait_for


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_unix_socket_server_serves_and_cleans_up() -> None:
    server = EmbeddedRedis().start()
    try:
        assert server.url.startswith("unix://")
        assert server.socket_path is not None and server.socket_path.exists()
        directory = server.socket_path.parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        client = redis.Redis.from_url(server.url)
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
        pid = server.pid
        assert pid is not None
        assert psutil.Process(pid).ppid() == os.getpid()
    finally:
        server.stop()
    assert not server.running and server.pid is None
    assert _gone(pid)
    assert not directory.exists()
    server.stop()  # idempotent


def test_loopback_port_with_password_never_on_the_command_line() -> None:
    with EmbeddedRedis(port=0, password="s3cret-pw") as server:
        assert server.url.startswith("redis://:s3cret-pw@127.0.0.1:")
        assert server.port is not None
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as anonymous:
            anonymous.sendall(b"PING\r\n")
            assert anonymous.recv(100).startswith(b"-NOAUTH")
        assert redis.Redis.from_url(server.url).ping()
        assert server.pid is not None
        assert "s3cret-pw" not in " ".join(psutil.Process(server.pid).cmdline())
        assert server.directory is not None
        assert stat.S_IMODE((server.directory / "redis.conf").stat().st_mode) == 0o600


def test_it_is_a_working_broker_backend_over_the_unix_socket() -> None:
    with EmbeddedRedis() as server:
        settings = TaskiqSettings(broker_url=server.url, backend_url=server.url)
        client = TaskiqClient(settings)
        try:
            client.connect()
            assert client.run(lambda conn: conn.keystore.list_workers()) == []
        finally:
            client.close()


def test_a_forked_child_does_not_stop_the_parents_server() -> None:
    with EmbeddedRedis() as server:
        pid = os.fork()
        if pid == 0:  # child: stop() must be a no-op here
            server.stop()
            os._exit(0)
        os.waitpid(pid, 0)
        assert server.running
        assert redis.Redis.from_url(server.url).ping()


def test_a_binary_that_cannot_start_gives_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'cannot start here' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = EmbeddedRedis(binary=str(fake), start_timeout=5)
    with pytest.raises(BrokerUnavailableError, match="did not start"):
        server.start()
    assert server.directory is None and not server.running


def test_bundled_binary_is_found() -> None:
    assert os.access(find_redis_server(), os.X_OK)


_OWNER = textwrap.dedent(
    """
    import os, sys, time
    from dagster_taskiq.embedded import EmbeddedRedis
    server = EmbeddedRedis().start()
    print(server.pid, server.directory, flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)  # no stop(): the atexit hook must stop it
    time.sleep(60)
    """
)


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_server_dies_with_its_owner(how: str) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, how], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        assert owner.stdout is not None
        pid_text, directory = owner.stdout.readline().split()
        pid = int(pid_text)
        if how == "kill":
            owner.send_signal(signal.SIGKILL)
        owner.wait(30)
        wait_for(lambda: _gone(pid), timeout=10, what="the embedded redis-server to exit")
        if how == "exit":
            assert not Path(directory).exists()
        else:  # a killed owner cannot remove files; only the process is guaranteed to go
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_a_pull_cancelled_right_after_it_starts_ends() -> None:
    """Regression: redis-py may finish a command a cancellation hit; the listener must stop."""
    import asyncio

    from dagster_taskiq.connection import TaskiqConnection

    async def _pull_and_cancel(url: str) -> None:
        settings = TaskiqSettings(broker_url=url, backend_url=url)
        conn = TaskiqConnection(settings, listen_queues=["q"], consumer="c1")
        await conn.start()
        try:
            for _ in range(2):
                pull = asyncio.ensure_future(conn.broker.listen().__anext__())
                await asyncio.sleep(0)
                pull.cancel()
                done, _ = await asyncio.wait({pull}, timeout=5)
                assert pull in done and pull.cancelled()
        finally:
            await conn.close()

    with EmbeddedRedis() as server:
        asyncio.run(_pull_and_cancel(server.url))
