"""Redis Cluster: a private three-master cluster on loopback is the broker, backend and key store.

The same scenarios as on a single Redis, through one ``redis+cluster://`` URL: a job with routing
and priority runs on real workers (``test_routing_priority``), and the run launcher launches a
run and terminates another (``test_launcher``). Every multi-key script then runs in the one hash
slot of the deployment's key prefix (``{prefix}``), spread over nodes that own other slots.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq_tests.harness import WorkerPool, WorkerProcess, isolated_settings
from dagster_taskiq_tests.launcher_harness import LauncherEnv, launcher_env
from dagster_taskiq_tests.private_cluster import PrivateCluster
from dagster_taskiq_tests.test_launcher import test_noop_run_succeeds as test_launch_on_cluster
from dagster_taskiq_tests.test_launcher import (
    test_terminate_looping_run as test_terminate_on_cluster,
)
from dagster_taskiq_tests.test_routing_priority import order_log  # noqa: F401 - a fixture
from dagster_taskiq_tests.test_routing_priority import (
    test_unserved_queue_waits_then_runs_by_priority as test_routing_and_priority_on_cluster,
)

__all__ = [
    "test_launch_on_cluster",
    "test_routing_and_priority_on_cluster",
    "test_terminate_on_cluster",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """Three cluster-enabled masters sharing the slots, for this module's tests."""
    group = PrivateCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield group
    finally:
        group.stop()


def _cluster_settings(cluster: PrivateCluster, heartbeat_timeout: float) -> TaskiqSettings:
    url = cluster.url()
    return isolated_settings("redis", url, url, heartbeat_timeout=heartbeat_timeout)


@pytest.fixture
def settings(cluster: PrivateCluster) -> TaskiqSettings:
    """Isolated settings on the cluster (the key prefix becomes one hash tag)."""
    return _cluster_settings(cluster, heartbeat_timeout=10.0)


@pytest.fixture
def workers(settings: TaskiqSettings, dagster_home: Path) -> Iterator[WorkerPool]:
    """Workers on the cluster; all stopped at teardown."""
    pool = WorkerPool(settings, dagster_home)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def env(cluster: PrivateCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LauncherEnv]:
    """A launcher instance whose broker and backend are the cluster."""
    with launcher_env("cluster", tmp_path_factory, _cluster_settings(cluster, 5.0)) as env_:
        yield env_


@pytest.fixture(scope="module")
def main_worker(env: LauncherEnv) -> WorkerProcess:
    """The worker serving the launcher's default queue."""
    return env.workers.start(concurrency=2)


def test_keys_spread_over_one_slot_of_a_real_cluster(
    cluster: PrivateCluster, settings: TaskiqSettings
) -> None:
    """The prefix is a hash tag, and the cluster really has several masters owning slots."""
    assert settings.key_prefix.startswith("{dt-test-") and settings.key_prefix.endswith("}")
    node = cluster.nodes[0]
    with redis.Redis(port=node.port, socket_timeout=5) as client:
        slots = client.execute_command("CLUSTER", "SLOTS")
    assert len(slots) == 3
