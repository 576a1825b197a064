"""Security: authenticated and encrypted brokers end to end, no leaked secrets, never pickle.

Each test runs real workers and real Dagster runs against a broker that demands credentials (a
private ``redis-server`` with ``requirepass``, an ACL user, or TLS; a RabbitMQ user on its own
vhost) and then greps everything an operator or user can see for the password: run tags and
config, every event in the event log, worker logs, ``status`` output and exception text.
"""

import ast
import json
import pickle
import subprocess
import traceback
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from dagster import DagsterInstance, execute_job, reconstructable
from dagster._serdes import serialize_value
from taskiq.serializers import JSONSerializer

from dagster_taskiq.cli import main as cli_main
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqClient, TaskiqConnection
from dagster_taskiq.errors import BadMessageError, BrokerUnavailableError
from dagster_taskiq.payloads import TaskOutcome, encode
from dagster_taskiq_tests import jobs
from dagster_taskiq_tests.harness import (
    REPO_ROOT,
    WorkerPool,
    WorkerProcess,
    executor_config,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.private_brokers import PrivateRedis
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, require

PACKAGE = REPO_ROOT / "dagster_taskiq"


def _secret() -> str:
    return f"pw-{uuid.uuid4().hex}"


def _settings(broker: str, backend: str, **source: Any) -> TaskiqSettings:
    uid = uuid.uuid4().hex[:10]
    config_source: dict[str, Any] = {"key_prefix": f"dt-sec-{uid}", "result_ttl": 600, **source}
    if broker.startswith("amqp"):
        config_source["exchange"] = f"dt-sec-{uid}"
        config_source["queue_arguments"] = {"x-expires": 600_000}
    return TaskiqSettings(
        broker_url=broker,
        backend_url=backend,
        default_queue=f"dt-sec-{uid}",
        heartbeat_timeout=10.0,
        config_source=config_source,
    )


def _env_run_config(settings: TaskiqSettings, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Executor config that reads the URLs from env vars, as the docs recommend for secrets."""
    monkeypatch.setenv("DT_SEC_BROKER_URL", settings.broker_url)
    monkeypatch.setenv("DT_SEC_BACKEND_URL", settings.backend_url)
    config = executor_config(settings)
    config["execution"]["config"]["broker"] = {"env": "DT_SEC_BROKER_URL"}
    config["execution"]["config"]["backend"] = {"env": "DT_SEC_BACKEND_URL"}
    return config


def _run_texts(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """Everything Dagster keeps about a run: its record (tags, config) and every event."""
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return {
        "run tags": json.dumps(dict(run.tags)),
        "run record": serialize_value(run),
        "events": "\n".join(serialize_value(entry) for entry in instance.all_logs(run_id)),
    }


def _cli(settings: TaskiqSettings, workdir: Path, *args: str) -> Result:
    """Run a ``dagster-taskiq`` command in-process (click's runner) against ``settings``."""
    config = workdir / f"cli-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(json.dumps(executor_config(settings)))
    return CliRunner().invoke(cli_main, [*args, "-y", str(config)], catch_exceptions=False)


def assert_no_secret(secret: str, texts: Mapping[str, str]) -> None:
    """Fail naming every place where ``secret`` shows up."""
    leaks = [where for where, text in texts.items() if secret in text]
    assert not leaks, f"the password leaked into: {', '.join(leaks)}"


def _exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@pytest.fixture
def pool_factory(dagster_home: Path) -> Iterator[Any]:
    """``pool_factory(settings)`` gives a :class:`WorkerPool`; all are stopped at teardown."""
    pools: list[WorkerPool] = []

    def _make(settings: TaskiqSettings) -> WorkerPool:
        pool = WorkerPool(settings, dagster_home)
        pools.append(pool)
        return pool

    yield _make
    for pool in pools:
        pool.stop_all()


def _end_to_end(
    settings: TaskiqSettings,
    secret: str,
    instance: DagsterInstance,
    pool_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> tuple[dict[str, str], WorkerProcess]:
    """Run a two-step job on a worker with ``settings``; return every text that must be clean."""
    run_config = _env_run_config(settings, monkeypatch)  # workers inherit these env vars too
    worker = pool_factory(settings).start()
    with execute_job(
        reconstructable(jobs.two_op_chain), instance=instance, run_config=run_config
    ) as result:
        assert result.success
        assert result.output_for_node("add_one") == 2
        run_id = result.run_id
    status = _cli(settings, tmp_path, "status")
    status_json = _cli(settings, tmp_path, "status", "--json")
    listing = _cli(settings, tmp_path, "worker", "list")
    assert status.exit_code == status_json.exit_code == listing.exit_code == 0
    assert worker.name in listing.output
    texts = {
        **_run_texts(instance, run_id),
        "worker log": worker.log(),
        "status": status.output,
        "status --json": status_json.output,
        "worker list": listing.output,
    }
    return texts, worker


def _unreachable_texts(settings: TaskiqSettings, tmp_path: Path) -> dict[str, str]:
    """Error text from the client and the CLI when the server is down or refuses us."""
    client = TaskiqClient(settings)
    try:
        with pytest.raises(BrokerUnavailableError) as caught:
            client.connect()
    finally:
        client.close()
    status = _cli(settings, tmp_path, "status")
    assert status.exit_code == 1
    assert status.output.startswith("Error: "), status.output
    return {"client exception": _exception_text(caught.value), "status error": status.output}


def test_redis_requirepass_and_acl_user_end_to_end(
    instance: DagsterInstance,
    pool_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    default_pw, acl_pw = _secret(), _secret()
    acl_prefix = f"dt-sec-acl-{uuid.uuid4().hex[:6]}"
    server = PrivateRedis(
        tmp_path / "redis",
        password=default_pw,
        # Least privilege: only our key prefix, no dangerous commands.
        acl_users=[f"dtsec on >{acl_pw} ~{acl_prefix}:* resetchannels +@all -@dangerous"],
    ).start()
    try:
        # 1. requirepass (the default user).
        settings = _settings(server.url(password=default_pw), server.url(password=default_pw))
        texts, first = _end_to_end(
            settings, default_pw, instance, pool_factory, monkeypatch, tmp_path
        )
        assert first.stop() == 0
        texts["worker log"] = first.log()
        assert_no_secret(default_pw, texts)
        assert "***" in texts["worker log"]  # the worker names its broker, redacted

        # 2. An ACL user limited to the configured key prefix.
        acl_url = server.url("dtsec", acl_pw)
        acl = _settings(acl_url, acl_url, key_prefix=acl_prefix)
        texts, acl_worker = _end_to_end(acl, acl_pw, instance, pool_factory, monkeypatch, tmp_path)
        assert_no_secret(acl_pw, texts)

        # 3. A wrong password is refused with a clear error that does not echo it.
        wrong = _secret()
        bad = _settings(server.url("dtsec", wrong), server.url("dtsec", wrong))
        errors = _unreachable_texts(bad, tmp_path)
        assert "invalid username-password pair" in errors["client exception"]
        assert_no_secret(wrong, errors)
    finally:
        server.stop()

    # 4. With the server gone: the client, the CLI and the live worker's log stay clean.
    errors = _unreachable_texts(acl, tmp_path)
    assert (
        "Could not reach the Redis backend at redis://dtsec:***@127.0.0.1"
        in (errors["client exception"])
    )
    wait_for(
        lambda: "Heartbeat failed" in acl_worker.log(), 30, what="the worker to notice the outage"
    )
    errors["worker log during the outage"] = acl_worker.log()
    assert_no_secret(acl_pw, errors)


def test_redis_over_tls_end_to_end(
    instance: DagsterInstance,
    pool_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    secret = _secret()
    server = PrivateRedis(tmp_path / "redis-tls", tls=True, password=secret).start()
    try:
        url = server.url(password=secret)
        assert url.startswith("rediss://")
        settings = _settings(url, url, **server.tls_options())
        texts, worker = _end_to_end(settings, secret, instance, pool_factory, monkeypatch, tmp_path)
        assert worker.stop() == 0
        texts["worker log"] = worker.log()
        assert_no_secret(secret, texts)

        # Without our CA the self-signed certificate is refused: TLS is verified, not just on.
        untrusted = _settings(url, url, connect_timeout=3)
        errors = _unreachable_texts(untrusted, tmp_path)
        assert "certificate verify failed" in errors["client exception"], errors
        assert_no_secret(secret, errors)
    finally:
        server.stop()


def test_rabbitmq_user_on_its_own_vhost_end_to_end(
    instance: DagsterInstance,
    pool_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    require(REDIS_URL, "Redis")
    require(AMQP_URL, "RabbitMQ")
    user, vhost, secret = (
        f"dt-sec-{uuid.uuid4().hex[:8]}",
        f"dt-sec-{uuid.uuid4().hex[:8]}",
        _secret(),
    )

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)

    ctl("add_vhost", vhost)
    worker: WorkerProcess | None = None
    try:
        ctl("add_user", user, secret)
        ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        url = f"amqp://{user}:{secret}@127.0.0.1:5672/{vhost}"
        settings = _settings(url, REDIS_URL)
        texts, worker = _end_to_end(settings, secret, instance, pool_factory, monkeypatch, tmp_path)
        assert worker.stop() == 0
        texts["worker log"] = worker.log()
        assert_no_secret(secret, texts)
        # The same user cannot reach the default vhost.
        denied = _settings(f"amqp://{user}:{secret}@127.0.0.1:5672/", REDIS_URL, connect_timeout=3)
        errors = _unreachable_texts(denied, tmp_path)
        assert "Could not reach the broker at amqp://" in errors["client exception"]
        assert_no_secret(secret, errors)
    finally:
        if worker is not None:
            worker.stop()  # before its vhost goes away
        subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)


class _TouchOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_result_backend_values_are_never_unpickled_or_interpreted(
    redis_url: str, tmp_path: Path
) -> None:
    settings = _settings(redis_url, redis_url)
    marker = tmp_path / "unpickled.marker"
    good = encode(TaskOutcome(status="success", worker="w"))

    async def _poison(conn: TaskiqConnection) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        poisons: dict[str, bytes | str] = {
            "pickle": pickle.dumps({"return_value": _TouchOnUnpickle(marker)}),
            "json without return_value": json.dumps({"is_err": False}),
            "return_value that is not serdes": json.dumps({"return_value": {"a": 1}}),
            # taskiq itself would rebuild this 'error' into an exception object; we ignore it.
            "error field": json.dumps(
                {
                    "return_value": good,
                    "is_err": True,
                    "execution_time": 0,
                    "error": {"exc_type": "system", "exc_module": "os", "exc_message": ["id"]},
                }
            ),
        }
        for name, value in poisons.items():
            task_id = uuid.uuid4().hex
            await conn.backend_redis.set(conn.result_key(task_id), value, ex=60)
            try:
                seen[name] = await conn.outcome(task_id)
            except BadMessageError as exc:
                seen[name] = exc
        # Our own writes are taskiq's JSON result format and read back.
        task_id = uuid.uuid4().hex
        value = conn.result_value(TaskOutcome(status="success", worker="w"), 0.1)
        await conn.backend_redis.set(conn.result_key(task_id), value, ex=60)
        stored = await conn.backend_redis.get(conn.result_key(task_id))
        seen["stored"] = json.loads(stored)
        seen["read back"] = await conn.outcome(task_id)
        seen["backend serializer"] = conn.broker.result_backend.serializer
        seen["broker serializer"] = conn.broker.serializer
        return seen

    seen = run_async(settings, _poison)
    assert not marker.exists(), "a pickle from the result backend was unpickled"
    for name in ("pickle", "json without return_value", "return_value that is not serdes"):
        assert isinstance(seen[name], BadMessageError), (name, seen[name])
        assert str(seen[name]).startswith("Task "), seen[name]
    assert seen["error field"] == TaskOutcome(status="success", worker="w")
    assert isinstance(seen["stored"]["return_value"], str)
    assert seen["read back"] == TaskOutcome(status="success", worker="w")
    assert isinstance(seen["backend serializer"], JSONSerializer)
    assert isinstance(seen["broker serializer"], JSONSerializer)


def test_the_package_never_imports_a_pickle_capable_serializer() -> None:
    forbidden = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {node.module or "", *(alias.name for alias in node.names)}
            else:
                continue
            if any(n.split(".")[0] in forbidden or "pickle" in n.lower() for n in names):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"pickle-capable imports: {offenders}"
