"""Tracing without a network: inject and extract through message labels, signatures and message
validation with trace labels, malformed trace contexts, the no-op mode without OpenTelemetry,
and the worker's set-up from the ``OTEL_*`` environment."""

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from dagster_taskiq import tracing
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.errors import BadMessageError
from dagster_taskiq.payloads import RUN_TASK_NAME, RunTaskPayload, encode
from dagster_taskiq.signing import SIGNATURE_LABEL
from dagster_taskiq.worker.validation import validate_message
from dagster_taskiq_tests.harness import REPO_ROOT
from dagster_taskiq_tests.tracing_support import console_spans, in_memory_exporter

VALID_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _spans(task_id: str) -> dict[str, ReadableSpan]:
    """This process's ended spans of one task, by name."""
    return {
        span.name: span
        for span in in_memory_exporter().get_finished_spans()
        if span.attributes and span.attributes.get("dagster_taskiq.task_id") == task_id
    }


def _enqueue(task_id: str, parent: Any = None) -> dict[str, str]:
    with tracing.enqueue_span(
        parent=parent, kind="step", run_id="run-1", step_key="add", queue="compute", task_id=task_id
    ) as labels:
        return labels


def test_enqueue_injects_and_execute_continues_the_trace() -> None:
    in_memory_exporter()
    task_id = f"t-{uuid.uuid4().hex}"
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("orchestrator") as root:
        labels = _enqueue(task_id, tracing.current_context())
    assert set(labels) == {tracing.TRACEPARENT_LABEL}
    parent = tracing.extract({**labels, "queue_name": "compute", "priority": 3})
    assert parent is not None
    span = tracing.start_execute_span(
        parent,
        kind="step",
        run_id="run-1",
        step_key="add",
        queue="compute",
        task_id=task_id,
        worker="w1",
    )
    span.end("failure", "Step add failed.")
    spans = _spans(task_id)
    enqueue, execute = spans["enqueue"], spans["execute"]
    trace_id = root.get_span_context().trace_id
    assert enqueue.context is not None and execute.context is not None
    assert enqueue.context.trace_id == execute.context.trace_id == trace_id
    assert enqueue.parent is not None and enqueue.parent.span_id == root.get_span_context().span_id
    assert execute.parent is not None and execute.parent.span_id == enqueue.context.span_id
    assert execute.parent.is_remote
    assert labels[tracing.TRACEPARENT_LABEL].startswith(
        f"00-{trace_id:032x}-{enqueue.context.span_id:016x}-"
    )
    assert (enqueue.kind, execute.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert dict(execute.attributes or {}) == {
        "messaging.system": "taskiq",
        "dagster_taskiq.kind": "step",
        "dagster.run_id": "run-1",
        "dagster.step_key": "add",
        "dagster_taskiq.queue": "compute",
        "dagster_taskiq.task_id": task_id,
        "dagster_taskiq.worker": "w1",
        "dagster_taskiq.outcome": "failure",
    }
    assert "dagster_taskiq.worker" not in (enqueue.attributes or {})
    assert execute.status.status_code is StatusCode.ERROR
    assert execute.status.description == "Step add failed."


def test_a_task_process_runs_inside_its_execute_span() -> None:
    in_memory_exporter()
    task_id = f"t-{uuid.uuid4().hex}"
    span = tracing.start_execute_span(
        None, kind="run", run_id="run-2", step_key=None, queue="q", task_id=task_id, worker="w"
    )
    with tracing.activated(span.context()):
        nested = _enqueue(f"{task_id}-step")
    span.end("success")
    execute = _spans(task_id)["execute"]
    step_enqueue = _spans(f"{task_id}-step")["enqueue"]
    assert execute.parent is None, "a task without a trace context starts a new trace"
    assert execute.status.status_code is StatusCode.UNSET
    assert "dagster.step_key" not in (execute.attributes or {})
    assert step_enqueue.parent is not None and execute.context is not None
    assert step_enqueue.parent.span_id == execute.context.span_id
    assert nested[tracing.TRACEPARENT_LABEL].split("-")[1] == f"{execute.context.trace_id:032x}"


def test_trace_labels_pass_message_validation_and_leave_the_signature_valid() -> None:
    in_memory_exporter()
    settings_ = TaskiqSettings(
        broker_url="redis://127.0.0.1:6379/0",
        backend_url="redis://127.0.0.1:6379/0",
        signing_key="k" * 32,
    )
    conn = TaskiqConnection(settings_)  # builds messages only: no connection is opened
    payload = encode(RunTaskPayload(run_id="run-3", instance_ref=None, resume=False))
    task_id = f"t-{uuid.uuid4().hex}"
    labels = _enqueue(task_id)
    message = conn.build_message(
        task_id=task_id,
        task_name=RUN_TASK_NAME,
        payload=payload,
        queue="runs",
        priority=0,
        trace_labels={**labels, "queue_name": "forged", SIGNATURE_LABEL: "forged"},
    )
    decoded = conn.broker.formatter.loads(message.message)
    assert decoded.labels[tracing.TRACEPARENT_LABEL] == labels[tracing.TRACEPARENT_LABEL]
    # Trace labels never override the routing labels or the signature.
    assert decoded.labels["queue_name"] == "runs"
    assert decoded.labels[SIGNATURE_LABEL] != "forged"
    validated = validate_message(decoded, "k" * 32)
    assert isinstance(validated, RunTaskPayload) and validated.run_id == "run-3"
    with pytest.raises(BadMessageError, match="wrongly signed"):
        validate_message(decoded, "another-key-" + "x" * 20)
    extracted = tracing.extract(decoded.labels)
    assert extracted is not None
    assert trace.get_current_span(extracted).get_span_context().span_id == (
        _spans(task_id)["enqueue"].context.span_id  # type: ignore[union-attr]
    )


@pytest.mark.parametrize(
    "labels",
    [
        {},
        {"traceparent": ""},
        {"traceparent": "garbage"},
        {"traceparent": 42},
        {"traceparent": ["00", "a"]},
        {"traceparent": {"trace_id": 1}},
        {"traceparent": None},
        {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},
        {"traceparent": "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + "x" * 1000},
        {"traceparent": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"},
        {"tracestate": "vendor=value"},
        None,
        "traceparent",
        ["traceparent", VALID_TRACEPARENT],
    ],
)
def test_a_malformed_trace_context_is_ignored(labels: Any) -> None:
    assert tracing.extract(labels) is None


def test_a_bad_tracestate_keeps_the_valid_traceparent() -> None:
    context = tracing.extract(
        {"traceparent": VALID_TRACEPARENT, "tracestate": "=,,=broken" + "y" * 600}
    )
    assert context is not None
    span_context = trace.get_current_span(context).get_span_context()
    assert f"{span_context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["traceparent", "tracestate", "queue_name", "x"]),
        st.one_of(
            st.text(max_size=80),
            st.from_regex(r"[0-9a-f]{2}-[0-9a-fA-F]{32}-[0-9a-f]{16}-[0-9a-f]{2}.{0,3}"),
            st.integers(),
            st.none(),
            st.lists(st.text(max_size=5), max_size=3),
        ),
    )
)
def test_extract_never_raises(labels: dict[str, Any]) -> None:
    context = tracing.extract(labels)
    if context is not None:
        assert trace.get_current_span(context).get_span_context().is_valid


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), environment.get("PYTHONPATH", "")])
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_everything_is_a_no_op_without_opentelemetry() -> None:
    result = _python(
        """
        import sys

        class NoOpenTelemetry:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoOpenTelemetry())

        from dagster_taskiq import tracing
        from dagster_taskiq.config import TaskiqSettings
        from dagster_taskiq.connection import TaskiqConnection

        assert not tracing.available()
        assert tracing.current_context() is None
        with tracing.enqueue_span(
            parent=None, kind="step", run_id="r", step_key="s", queue="q", task_id="t"
        ) as labels:
            assert labels == {}
        trace_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        assert tracing.extract({"traceparent": trace_parent}) is None
        span = tracing.start_execute_span(
            None, kind="step", run_id="r", step_key="s", queue="q", task_id="t", worker="w"
        )
        assert span.context() is None
        span.end("failure", "boom")
        with tracing.activated(span.context()):
            pass
        tracing.flush()
        assert tracing.configure_from_environment() is None
        conn = TaskiqConnection(TaskiqSettings(broker_url="redis://127.0.0.1:6379/0"))
        message = conn.build_message(
            task_id="t", task_name="n", payload="{}", queue="q", priority=0
        )
        assert "traceparent" not in conn.broker.formatter.loads(message.message).labels
        assert not any(name.startswith("opentelemetry") for name in sys.modules)
        print("no-op ok")
        """,
        {"OTEL_TRACES_EXPORTER": "console"},
    )
    assert result.returncode == 0, result.stderr
    assert "no-op ok" in result.stdout
    assert "OpenTelemetry is not installed" in result.stderr


_CONFIGURE = """
    from dagster_taskiq import tracing

    print("configured:", tracing.configure_from_environment())
    with tracing.enqueue_span(
        parent=None, kind="run", run_id="r9", step_key=None, queue="runs", task_id="t9"
    ) as labels:
        print("labels:", sorted(labels))
    tracing.flush()
    """


def test_the_worker_configures_the_sdk_from_the_otel_environment(tmp_path: Path) -> None:
    result = _python(
        _CONFIGURE, {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "svc-under-test"}
    )
    assert result.returncode == 0, result.stderr
    assert (
        "configured: OpenTelemetry tracing: service 'svc-under-test', exporter console"
        in result.stdout
    )
    assert "labels: ['traceparent']" in result.stdout
    out = tmp_path / "out.txt"
    out.write_text(result.stdout)
    (span,) = console_spans(out)
    assert span["name"] == "enqueue"
    assert span["resource"]["attributes"]["service.name"] == "svc-under-test"
    assert span["attributes"]["dagster_taskiq.task_id"] == "t9"


def test_the_worker_defaults_its_service_name_and_skips_unknown_exporters() -> None:
    default = _python(_CONFIGURE, {"OTEL_TRACES_EXPORTER": "console"})
    assert default.returncode == 0, default.stderr
    assert f"service '{tracing.DEFAULT_WORKER_SERVICE_NAME}'" in default.stdout
    unknown = _python(_CONFIGURE, {"OTEL_TRACES_EXPORTER": "no-such-exporter"})
    assert unknown.returncode == 0, unknown.stderr
    assert "configured: None" in unknown.stdout
    assert "no installed package provides that span exporter" in unknown.stderr
    off = _python(_CONFIGURE, {"OTEL_TRACES_EXPORTER": "none", "OTEL_SERVICE_NAME": "x"})
    assert "configured: None" in off.stdout
    unset = _python(_CONFIGURE)
    assert "configured: None" in unset.stdout
    assert "labels: []" in unset.stdout
