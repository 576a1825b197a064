"""Bad input: poisoned messages are dead-lettered with one clear log line, the worker keeps serving.

Also: oversized arguments, odd queue and op names, and malformed priority tags fail at submit
time with a message that says what to do.
"""

import json
import os
import pickle
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterInvalidDefinitionError,
    execute_job,
    job,
    op,
    reconstructable,
)
from dagster._core.execution.retries import RetryMode
from dagster._grpc.types import ExecuteStepArgs
from taskiq import BrokerMessage, TaskiqMessage

from dagster_taskiq import taskiq_executor
from dagster_taskiq.cli import main as cli_main
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.payloads import (
    RUN_TASK_NAME,
    STEP_TASK_NAME,
    RunTaskPayload,
    StepTaskPayload,
    encode,
)
from dagster_taskiq_tests import jobs
from dagster_taskiq_tests.harness import (
    WorkerPool,
    executor_config,
    run_async,
    wait_for,
)

REJECTED = "Rejected a message to the dead-letter list"


class _TouchOnUnpickle:
    """Unpickling this creates a marker file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _raw(conn: TaskiqConnection, queue: str, body: bytes, task_id: str) -> BrokerMessage:
    return BrokerMessage(
        task_id=task_id, task_name="", message=body, labels={"queue_name": queue, "priority": 5}
    )


def _envelope(conn: TaskiqConnection, task_name: str, args: list[Any]) -> tuple[str, bytes]:
    task_id = uuid.uuid4().hex
    message = TaskiqMessage(task_id=task_id, task_name=task_name, labels={}, args=args, kwargs={})
    return task_id, conn.broker.formatter.dumps(message).message


def status_json(settings: TaskiqSettings, workdir: Path) -> dict[str, Any]:
    """``dagster-taskiq status --json`` for ``settings`` (the CLI command, run in-process)."""
    config = workdir / f"status-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(json.dumps(executor_config(settings)))
    result = CliRunner().invoke(cli_main, ["status", "--json", "-y", str(config)])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_poison_messages_are_dead_lettered_and_worker_keeps_serving(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    dagster_home: Path,
    tmp_path: Path,
) -> None:
    worker = workers.start()
    queue = settings.default_queue
    marker = tmp_path / "unpickled.marker"
    origin = reconstructable(jobs.single_op_job).get_python_origin()
    missing_run = uuid.uuid4().hex

    async def _push_all(conn: TaskiqConnection) -> list[str]:
        ids = []
        # 1. random bytes
        await conn.broker.kick(_raw(conn, queue, os.urandom(96) + b"\xff\x00", "random"))
        # 2. valid JSON naming a callable that is not ours
        task_id, body = _envelope(conn, "os.system", ["touch /tmp/should-never-exist"])
        await conn.broker.kick(_raw(conn, queue, body, task_id))
        ids.append(task_id)
        # 3. our task name, arguments that fail validation
        task_id, body = _envelope(conn, STEP_TASK_NAME, [{"__class__": "ExecuteStepArgs"}])
        await conn.broker.kick(_raw(conn, queue, body, task_id))
        ids.append(task_id)
        # 4. a pickle, both as the whole message and inside a valid envelope
        await conn.broker.kick(
            _raw(conn, queue, pickle.dumps(_TouchOnUnpickle(marker)), "pickle-body")
        )
        task_id, body = _envelope(
            conn, STEP_TASK_NAME, [pickle.dumps(_TouchOnUnpickle(marker)).decode("latin-1")]
        )
        await conn.broker.kick(_raw(conn, queue, body, task_id))
        ids.append(task_id)
        # 5. registered tasks whose run does not exist (a step task and a run task)
        step_args = ExecuteStepArgs(
            job_origin=origin,
            run_id=missing_run,
            step_keys_to_execute=["emit_one"],
            instance_ref=instance.get_ref(),
            retry_mode=RetryMode.DISABLED,
        )
        for task_name, payload, kind, step_key in (
            (
                STEP_TASK_NAME,
                encode(StepTaskPayload(execute_step_args=step_args, step_key="emit_one")),
                "step",
                "emit_one",
            ),
            (
                RUN_TASK_NAME,
                encode(RunTaskPayload(run_id=missing_run, instance_ref=None)),
                "run",
                None,
            ),
        ):
            task_id = f"{missing_run}.{kind}.{uuid.uuid4().hex[:6]}"
            await conn.submit(
                task_id=task_id,
                task_name=task_name,
                payload=payload,
                kind=kind,
                run_id=missing_run,
                step_key=step_key,
                queue=queue,
                priority=5,
                heartbeat_timeout=settings.heartbeat_timeout,
            )
            ids.append(task_id)
        return ids

    run_async(settings, _push_all)
    expected = 7

    def _dead() -> list[dict[str, Any]]:
        letters: list[dict[str, Any]] = run_async(settings, lambda c: c.keystore.dead_letters())
        return letters if len(letters) >= expected else []

    letters = wait_for(_dead, 60, what="7 dead letters")
    assert len(letters) == expected
    reasons = "\n".join(letter["reason"] for letter in letters)
    assert reasons.count("Undecodable message") == 2, reasons  # random bytes, bare pickle
    assert "'os.system', which is not a dagster-taskiq task" in reasons
    assert reasons.count("for StepTaskPayload, got dict") == 1, reasons  # bad arguments
    assert reasons.count("not a valid StepTaskPayload") == 1, reasons  # pickle in an envelope
    assert reasons.count(f"Run {missing_run} does not exist") == 2, reasons
    assert {letter["worker"] for letter in letters} == {worker.name}
    assert not marker.exists(), "a pickle was unpickled"
    assert not Path("/tmp/should-never-exist").exists()

    # One clear line per refused message, no tracebacks, and the worker still runs.
    log = worker.log()
    assert log.count(REJECTED) == expected, log
    assert "Traceback" not in log, log
    assert worker.process is not None and worker.process.poll() is None

    # status reports them, and nothing of ours is stuck in flight.
    document = status_json(settings, tmp_path)
    assert document["dead_letters"] == expected
    assert document["in_flight"] == []
    assert all(q["waiting"] == 0 for q in document["queues"])

    # It still serves real work.
    with execute_job(
        reconstructable(jobs.single_op_job), instance=instance, run_config=executor_config(settings)
    ) as result:
        assert result.success
        assert result.output_for_node("emit_one") == 1


def test_oversized_arguments_fail_at_submit_time(
    instance: DagsterInstance, settings: TaskiqSettings
) -> None:
    config = executor_config(settings)
    config["execution"]["config"]["config_source"]["max_message_bytes"] = 512
    with execute_job(
        reconstructable(jobs.single_op_job),
        instance=instance,
        run_config=config,
        raise_on_error=False,
    ) as result:
        assert not result.success
        text = _failure_text(result)
        assert "max_message_bytes (512)" in text, text
        assert "step 'emit_one'" in text, text
        assert settings.default_queue in text, text


SPACE_QUEUE = "gpu queue 1"
UNICODE_QUEUE = "gpü ☃ queue"


@op(tags={"dagster-taskiq/queue": SPACE_QUEUE})
def space_queue_op() -> int:
    return 3


@op(tags={"dagster-taskiq/queue": UNICODE_QUEUE})
def unicode_queue_op(value: int) -> int:
    return value + 1


@job(executor_def=taskiq_executor)
def odd_queue_names_job() -> None:
    unicode_queue_op(space_queue_op())


def test_queue_names_with_spaces_and_unicode(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    broker_kind: str,
    dagster_home: Path,
) -> None:
    """Redis takes any printable queue name; RabbitMQ takes spaces but rejects non-ASCII clearly."""
    if broker_kind == "redis":
        workers.start(queues=[SPACE_QUEUE, UNICODE_QUEUE])
        with execute_job(
            reconstructable(odd_queue_names_job),
            instance=instance,
            run_config=executor_config(settings),
        ) as result:
            assert result.success
            assert result.output_for_node("unicode_queue_op") == 4
        return
    # RabbitMQ: the worker refuses to start on such a queue, with one line and exit code 1 ...
    refused = workers.start(wait=False, queues=[UNICODE_QUEUE], name="w-unicode")
    assert refused.process is not None
    assert refused.process.wait(60) == 1
    log = refused.log()
    assert "cannot be used with RabbitMQ" in log and "Traceback" not in log, log
    # ... and a step routed to it fails the run at submit time, after the space queue worked.
    workers.start(queues=[SPACE_QUEUE])
    with execute_job(
        reconstructable(odd_queue_names_job),
        instance=instance,
        run_config=executor_config(settings),
        raise_on_error=False,
    ) as result:
        assert not result.success
        assert result.output_for_node("space_queue_op") == 3
        text = _failure_text(result)
        assert f"Queue name {UNICODE_QUEUE!r}" in text, text
        assert "cannot be used with RabbitMQ" in text, text


def test_unicode_op_names_are_rejected_by_dagster_with_a_clear_message() -> None:
    with pytest.raises(DagsterInvalidDefinitionError, match="is not a valid name"):

        @op(name="größe rechnen")
        def _bad() -> None: ...


@op(tags={"dagster-taskiq/queue": "   "})
def blank_queue_op() -> int:
    return 1


@job(executor_def=taskiq_executor)
def blank_queue_job() -> None:
    blank_queue_op()


@pytest.mark.parametrize(
    ("job_def", "expected"),
    [
        (jobs.bad_priority_job, "Tag 'dagster-taskiq/priority' on step 'bad_priority_op'"),
        (blank_queue_job, "Invalid queue name '   '"),
    ],
)
def test_malformed_tags_give_a_clear_error(
    instance: DagsterInstance, settings: TaskiqSettings, job_def: Any, expected: str
) -> None:
    with execute_job(
        reconstructable(job_def),
        instance=instance,
        run_config=executor_config(settings),
        raise_on_error=False,
    ) as result:
        assert not result.success
        text = _failure_text(result)
        assert expected in text, text
        starts = Counter(
            e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_START
        )
        assert not starts


def _failure_text(result: Any) -> str:
    parts = []
    for event in result.all_events:
        if event.event_type in (
            DagsterEventType.RUN_FAILURE,
            DagsterEventType.ENGINE_EVENT,
            DagsterEventType.STEP_FAILURE,
        ):
            parts.append(event.message or "")
            data = event.event_specific_data
            error = getattr(data, "error", None)
            if error is not None:
                parts.append(error.to_string())
    return "\n".join(parts)
