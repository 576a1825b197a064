"""A private three-master Redis Cluster on loopback (no replicas), made by ``redis-cli --cluster``.

Each node is our own ``redis-server`` on a free port with its files under the test's temporary
directory; :meth:`PrivateCluster.start` returns once every node reports ``cluster_state:ok``.
"""

import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from dagster_taskiq_tests.private_brokers import PrivateRedis, free_port, require_binary


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except (redis.RedisError, OSError) as exc:
            last = exc
        if last is True:
            return
        time.sleep(0.1)
    raise AssertionError(f"Timed out after {timeout} s waiting for {what} (last: {last!r})")


class PrivateCluster:
    """Three cluster-enabled ``redis-server`` masters sharing the 16384 slots."""

    def __init__(self, workdir: Path, *, masters: int = 3) -> None:
        self.cli = require_binary("redis-cli", "redis-cli")
        self.workdir = workdir
        self.nodes = [
            PrivateRedis(
                workdir / f"node-{i}",
                extra_config=[
                    "cluster-enabled yes",
                    f"cluster-config-file {workdir / f'node-{i}' / 'nodes.conf'}",
                    "cluster-node-timeout 5000",
                    # The default bus port (port + 10000) may be taken or out of range.
                    f"cluster-port {free_port()}",
                ],
            )
            for i in range(masters)
        ]

    def start(self) -> "PrivateCluster":
        """Start the nodes, assign the slots, and wait until the cluster is ok everywhere."""
        for node in self.nodes:
            node.start()
        subprocess.run(
            [self.cli, "--cluster", "create",
             *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        for node in self.nodes:
            _wait(
                lambda n=node: self._info(n.port).get("cluster_state") == "ok"
                and self._info(n.port).get("cluster_known_nodes") == str(len(self.nodes)),
                60,
                f"cluster node {node.port} to be ok",
            )
        return self

    @staticmethod
    def _info(port: int) -> dict[str, str]:
        with redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2) as client:
            raw = client.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line
        )

    def url(self) -> str:
        """The ``redis+cluster://`` URL naming every node as a start-up node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.stop()
