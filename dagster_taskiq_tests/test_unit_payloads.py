"""Unit tests (no network): payload serdes round trips, the taskiq wire format, bad payloads."""

import base64
import json
import pickle
from pathlib import Path

import pytest
from dagster import reconstructable
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._core.instance.ref import InstanceRef
from dagster._grpc.types import ExecuteStepArgs
from dagster_shared.error import SerializableErrorInfo
from taskiq import TaskiqMessage

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.errors import BadMessageError
from dagster_taskiq.payloads import (
    RUN_TASK_NAME,
    STEP_TASK_NAME,
    RunTaskPayload,
    StepTaskPayload,
    TaskOutcome,
    decode_outcome,
    decode_run,
    decode_step,
    encode,
)
from dagster_taskiq.worker.validation import validate_message
from dagster_taskiq_tests import jobs


def _step_payload(tmp_path: Path) -> StepTaskPayload:
    args = ExecuteStepArgs(
        job_origin=reconstructable(jobs.diamond_job).get_python_origin(),
        run_id="run-1",
        step_keys_to_execute=["add_left"],
        instance_ref=InstanceRef.from_dir(str(tmp_path)),
        retry_mode=RetryMode.ENABLED,
        known_state=KnownExecutionState(
            previous_retry_attempts={"add_left": 2},
            dynamic_mappings={"spread": {"result": ["k0", "k1"]}},
        ),
        should_verify_step=True,
    )
    return StepTaskPayload(execute_step_args=args, step_key="add_left")


def _error() -> SerializableErrorInfo:
    cause = SerializableErrorInfo("ValueError: inner\n", ["  File x, line 1\n"], "ValueError")
    return SerializableErrorInfo("RuntimeError: outer\n", ["  File y\n"], "RuntimeError", cause)


def test_step_payload_round_trip(tmp_path: Path) -> None:
    payload = _step_payload(tmp_path)
    text = encode(payload)
    json.loads(text)  # plain JSON, nothing else
    assert decode_step(text, "t1") == payload


def test_run_payload_round_trip(tmp_path: Path) -> None:
    for payload in (
        RunTaskPayload(run_id="r", instance_ref=InstanceRef.from_dir(str(tmp_path)), resume=True),
        RunTaskPayload(run_id="r", instance_ref=None),
    ):
        assert decode_run(encode(payload), "t2") == payload
    assert decode_run(encode(RunTaskPayload("r", None)), "t2").resume is False


def test_outcome_round_trip() -> None:
    outcome = TaskOutcome(
        status="failure", worker="w1", exit_code=-9, message="killed ✗", error=_error()
    )
    assert decode_outcome(encode(outcome), "t3") == outcome
    assert decode_outcome(encode(TaskOutcome("success", "w1")), "t3").exit_code is None


@pytest.mark.parametrize(
    "broker_url",
    ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1/"],
    ids=["redis", "amqp"],
)
def test_payload_survives_the_taskiq_wire_format(tmp_path: Path, broker_url: str) -> None:
    """What the step handler sends is exactly what a worker decodes (no connection is made)."""
    settings = TaskiqSettings(broker_url=broker_url, backend_url="redis://127.0.0.1:1/0")
    conn = TaskiqConnection(settings)
    payload = _step_payload(tmp_path)
    wire = conn.build_message(
        task_id="run-1.add_left.abc",
        task_name=STEP_TASK_NAME,
        payload=encode(payload),
        queue="gpu",
        priority=7,
    )
    document = json.loads(wire.message)
    assert document["labels"] == {"queue_name": "gpu", "priority": 7, "ack_type": "when_received"}
    message = conn.broker.formatter.loads(wire.message)
    assert validate_message(message, None) == payload


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b"{}", "expected a serdes JSON string for StepTaskPayload, got bytes"),
        (None, "got NoneType"),
        ({"step_key": "a"}, "got dict"),
        ("{not json", "not a valid StepTaskPayload"),
        ('{"step_key": "a"}', "not a valid StepTaskPayload"),
        (encode(TaskOutcome("success", "w")), "not a valid StepTaskPayload"),
        ('{"__class__": "Popen", "args": ["touch", "/tmp/x"]}', "not a valid StepTaskPayload"),
        (base64.b64encode(pickle.dumps({"a": 1})).decode(), "not a valid StepTaskPayload"),
        (pickle.dumps({"a": 1}, protocol=0).decode("latin-1"), "not a valid StepTaskPayload"),
    ],
    ids=[
        "bytes",
        "none",
        "dict",
        "broken-json",
        "plain-json",
        "other-class",
        "unknown-class",
        "b64-pickle",
        "pickle",
    ],
)
def test_bad_step_payloads_are_refused(raw: object, complaint: str) -> None:
    with pytest.raises(BadMessageError) as info:
        decode_step(raw, "task-9")
    assert str(info.value).startswith("Task task-9: ")
    assert complaint in str(info.value)


def test_bad_run_payload_and_outcome_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadMessageError, match="not a valid RunTaskPayload"):
        decode_run(encode(_step_payload(tmp_path)), "t")
    with pytest.raises(BadMessageError, match="not a valid TaskOutcome"):
        decode_outcome(encode(RunTaskPayload("r", None)), "t")


@pytest.mark.parametrize(
    ("task_name", "args", "kwargs", "complaint"),
    [
        ("os.system", ["x"], {}, "names 'os.system', which is not a dagster-taskiq task"),
        (STEP_TASK_NAME, [], {}, "must carry exactly one argument"),
        (STEP_TASK_NAME, ["a", "b"], {}, "must carry exactly one argument"),
        (RUN_TASK_NAME, ["a"], {"x": 1}, "must carry exactly one argument"),
        (RUN_TASK_NAME, ["a"], {}, "not a valid RunTaskPayload"),
    ],
)
def test_worker_refuses_foreign_or_malformed_tasks(
    task_name: str, args: list[object], kwargs: dict[str, object], complaint: str
) -> None:
    message = TaskiqMessage(task_id="t-1", task_name=task_name, labels={}, args=args, kwargs=kwargs)
    with pytest.raises(BadMessageError, match="t-1") as info:
        validate_message(message, None)
    assert complaint in str(info.value)


def test_signed_messages_verify_and_others_are_refused(tmp_path: Path) -> None:
    """With a signing key, only messages signed with that key pass."""
    payload = _step_payload(tmp_path)
    settings = TaskiqSettings(
        broker_url="redis://127.0.0.1:1/0",
        backend_url="redis://127.0.0.1:1/0",
        signing_key="secret-signing-key-1",
    )
    wire = TaskiqConnection(settings).build_message(
        task_id="t-2", task_name=STEP_TASK_NAME, payload=encode(payload), queue="q", priority=5
    )
    signed = TaskiqConnection(settings).broker.formatter.loads(wire.message)
    assert "secret-signing-key-1" not in wire.message.decode()  # the key itself never travels
    assert validate_message(signed, "secret-signing-key-1") == payload
    assert validate_message(signed, None) == payload  # a worker without a key ignores it
    with pytest.raises(BadMessageError, match="wrongly signed"):
        validate_message(signed, "k2")
    unsigned = signed.model_copy(update={"labels": {}})
    with pytest.raises(BadMessageError, match="unsigned"):
        validate_message(unsigned, "secret-signing-key-1")
    tampered = signed.model_copy(update={"args": [encode(payload._replace(step_key="other"))]})
    with pytest.raises(BadMessageError, match="wrongly signed"):
        validate_message(tampered, "secret-signing-key-1")
