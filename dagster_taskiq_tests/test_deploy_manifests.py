"""deploy/kubernetes/, checked without a cluster.

Every manifest parses; every command is a real invocation of our CLI (parsed by the real click
tree, so each flag exists); the ports the commands open are the ports the containers, probes and
Service name; the probes point at the endpoints the worker and exporter serve; the config files
they mount exist in the ConfigMap and match the example's; the KEDA objects scale a real worker
Deployment on a metric the exporter exports, or on the RabbitMQ queue the worker consumes.
"""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dagster_taskiq.metrics.cluster import cluster_families
from dagster_taskiq.metrics.server import HEALTH_PATH, METRICS_PATH, READY_PATH
from dagster_taskiq_tests.harness import REPO_ROOT
from dagster_taskiq_tests.test_compose import resolve_click

MANIFESTS = REPO_ROOT / "deploy" / "kubernetes"
EXAMPLE = REPO_ROOT / "example"
WORKER_START = ["dagster-taskiq", "worker", "start"]
EXPORTER = ["dagster-taskiq", "exporter"]


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                found.append((path, document))
    return found


@pytest.fixture(scope="module")
def documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every manifest document, with its file."""
    return _documents()


def _of_kind(documents: list[tuple[Path, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for _, d in documents if d["kind"] == kind]


def _containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from deployment["spec"]["template"]["spec"]["containers"]


def _our_containers(
    documents: list[tuple[Path, dict[str, Any]]],
) -> Iterator[tuple[dict[str, Any], dict[str, Any], list[str], dict[str, Any]]]:
    for deployment in _of_kind(documents, "Deployment"):
        for container in _containers(deployment):
            command = [str(part) for part in container["command"]]
            assert command[0] == "dagster-taskiq", deployment["metadata"]["name"]
            path, params = resolve_click(command[0], command[1:])
            yield deployment, container, path, params


def _port(container: dict[str, Any], port: int | str) -> int:
    """A container port by number or by name."""
    for entry in container["ports"]:
        if port in (entry["containerPort"], entry.get("name")):
            return int(entry["containerPort"])
    raise AssertionError(f"container {container['name']} has no port {port!r}")


def test_every_manifest_parses_and_names_itself(
    documents: list[tuple[Path, dict[str, Any]]],
) -> None:
    files = {path.name for path, _ in documents}
    assert files == {
        "configmap.yaml",
        "exporter.yaml",
        "keda-scaledobject-rabbitmq.yaml",
        "keda-scaledobject.yaml",
        "secret.example.yaml",
        "worker-deployment.yaml",
    }
    for path, document in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(document), path
        assert re.fullmatch(r"[a-z0-9-]+", document["metadata"]["name"]), path
    kinds = sorted(document["kind"] for _, document in documents)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "ScaledObject",
        "ScaledObject",
        "Secret",
        "Service",
        "TriggerAuthentication",
    ]


def test_commands_ports_and_probes(documents: list[tuple[Path, dict[str, Any]]]) -> None:
    seen = []
    for deployment, container, path, params in _our_containers(documents):
        seen.append(path)
        name = deployment["metadata"]["name"]
        if path == WORKER_START:
            port, host = params["metrics_port"], params["metrics_host"]
            assert params["queues"] and params["concurrency"] >= 1, name
        else:
            assert path == EXPORTER, name
            port, host = params["port"], params["host"]
        # Probes and Prometheus come from outside the pod: bind every address.
        assert host == "0.0.0.0", name
        assert _port(container, "metrics") == port, name
        liveness = container["livenessProbe"]["httpGet"]
        readiness = container["readinessProbe"]["httpGet"]
        assert (liveness["path"], readiness["path"]) == (HEALTH_PATH, READY_PATH), name
        assert _port(container, liveness["port"]) == _port(container, readiness["port"]) == port
        annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
        if annotations:
            assert int(annotations["prometheus.io/port"]) == port, name
            assert annotations["prometheus.io/path"] == METRICS_PATH, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    assert sorted(seen) == sorted([WORKER_START, EXPORTER])


def test_the_exporter_service_reaches_the_exporter(
    documents: list[tuple[Path, dict[str, Any]]],
) -> None:
    (service,) = _of_kind(documents, "Service")
    (exporter,) = [(d, c) for d, c, path, _ in _our_containers(documents) if path == EXPORTER]
    deployment, container = exporter
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert _port(container, port["targetPort"]) == port["port"]
    assert int(service["metadata"]["annotations"]["prometheus.io/port"]) == port["port"]


def test_mounted_config_files_come_from_the_configmap(
    documents: list[tuple[Path, dict[str, Any]]],
) -> None:
    (configmap,) = _of_kind(documents, "ConfigMap")
    for deployment, container, _, params in _our_containers(documents):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        mount = mounts[params["config_yaml"]]
        volume = volumes[mount["name"]]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        assert mount["subPath"] in configmap["data"]
        env = {e["name"]: e.get("value") for e in container.get("env") or ()}
        if "DAGSTER_HOME" in env:
            assert f"{env['DAGSTER_HOME']}/dagster.yaml" in mounts
    # The files are the example stack's, so the compose tests' validation covers them.
    for key in ("dagster.yaml", "taskiq.yaml"):
        expected = yaml.safe_load((EXAMPLE / key).read_text())
        assert yaml.safe_load(configmap["data"][key]) == expected, key


def test_secrets_named_by_the_pods_exist(documents: list[tuple[Path, dict[str, Any]]]) -> None:
    (secret,) = _of_kind(documents, "Secret")
    keys = set(secret["stringData"])
    configmap = _of_kind(documents, "ConfigMap")[0]
    wanted = set(re.findall(r"\{env: (\w+)\}", "".join(configmap["data"].values())))
    assert wanted <= keys
    for _deployment, container, _, _ in _our_containers(documents):
        for source in container["envFrom"]:
            assert source["secretRef"]["name"] == secret["metadata"]["name"]
    (auth,) = _of_kind(documents, "TriggerAuthentication")
    for target in auth["spec"]["secretTargetRef"]:
        assert target["name"] == secret["metadata"]["name"] and target["key"] in keys


def test_keda_scales_a_worker_on_what_it_consumes(
    documents: list[tuple[Path, dict[str, Any]]],
) -> None:
    workers = {
        d["metadata"]["name"]: params["queues"]
        for d, _, path, params in _our_containers(documents)
        if path == WORKER_START
    }
    exported = {
        family.name
        for family in cluster_families(
            {"queues": [], "workers": [], "in_flight": [], "dead_letters": 0}
        )
    }
    triggers = set()
    for scaled in _of_kind(documents, "ScaledObject"):
        queues = workers[scaled["spec"]["scaleTargetRef"]["name"]]
        assert scaled["spec"]["minReplicaCount"] >= 1  # a queue must never lose its last worker
        for trigger in scaled["spec"]["triggers"]:
            triggers.add(trigger["type"])
            metadata = trigger["metadata"]
            if trigger["type"] == "prometheus":
                metric, queue = re.fullmatch(
                    r"sum\((\w+)\{queue=\"([\w.-]+)\"\}\) or vector\(0\)", metadata["query"]
                ).groups()  # type: ignore[union-attr]
                assert metric in exported and metric == "dagster_taskiq_queue_waiting"
                assert queue in queues
            else:
                assert trigger["type"] == "rabbitmq"
                assert metadata["queueName"] in queues
                assert metadata["mode"] == "QueueLength"
                auths = {
                    a["metadata"]["name"] for a in _of_kind(documents, "TriggerAuthentication")
                }
                assert trigger["authenticationRef"]["name"] in auths
            assert float(metadata.get("threshold") or metadata["value"]) > 0
    assert triggers == {"prometheus", "rabbitmq"}


def test_a_wrong_port_would_be_caught() -> None:
    container = {"name": "c", "ports": [{"name": "metrics", "containerPort": 9540}]}
    with pytest.raises(AssertionError):
        _port(container, "http")
    with pytest.raises(AssertionError):
        _port(container, 9541)


def _exported_names() -> set[str]:
    """Every series name the worker and the exporter can produce."""
    from prometheus_client import CollectorRegistry

    from dagster_taskiq.metrics.worker_metrics import PrometheusRecorder

    registry = CollectorRegistry()
    PrometheusRecorder(registry, 1)
    names = set()
    for family in registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    empty = {"queues": [], "workers": [], "in_flight": [], "dead_letters": 0}
    names |= {family.name for family in cluster_families(empty)}
    return names | {"dagster_taskiq_exporter_up"}


def _metric_names(expression: str) -> set[str]:
    return set(re.findall(r"\bdagster_taskiq_\w+", expression))


def test_dashboard_and_alerts_use_real_metrics() -> None:
    import json

    exported = _exported_names()
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "dagster-taskiq.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in _metric_names(target["expr"])
    }
    assert used and used <= exported, used - exported
    alerts_path = REPO_ROOT / "deploy" / "prometheus" / "dagster-taskiq-alerts.yaml"
    rules = yaml.safe_load(alerts_path.read_text())["groups"][0]["rules"]
    alerted = {name for rule in rules for name in _metric_names(rule["expr"])}
    assert alerted <= exported, alerted - exported
    assert {rule["alert"] for rule in rules} == {
        "DagsterTaskiqQueueWithoutWorker",
        "DagsterTaskiqTasksLost",
        "DagsterTaskiqDeadLettersGrowing",
        "DagsterTaskiqQueueWaitHigh",
    }
    assert alerts_path.read_text() in (REPO_ROOT / "README.md").read_text()
