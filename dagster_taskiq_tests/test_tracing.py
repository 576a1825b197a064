"""One trace across processes: the orchestrator (this test process, spans kept in memory) and a
real worker (configured from ``OTEL_TRACES_EXPORTER=console``, its stdout read back)."""

import contextlib
import json
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, execute_job, reconstructable
from dagster._core.storage.dagster_run import DagsterRunStatus
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan

from dagster_taskiq import connection
from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq_tests import jobs
from dagster_taskiq_tests.harness import (
    WorkerPool,
    executor_config,
    isolated_settings,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.launcher_harness import launcher_env
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, require
from dagster_taskiq_tests.tracing_support import console_spans, hex_id, in_memory_exporter


def _tracing_env(service: str) -> dict[str, str]:
    """The standard OTEL environment of a worker that prints its spans to stdout."""
    return {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


def _memory_spans(run_id: str) -> list[ReadableSpan]:
    return [
        span
        for span in in_memory_exporter().get_finished_spans()
        if (span.attributes or {}).get("dagster.run_id") == run_id
    ]


def _worker_spans(path: Path, run_id: str) -> list[dict[str, Any]]:
    return [s for s in console_spans(path) if s["attributes"].get("dagster.run_id") == run_id]


def _by_task(spans: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    return {s["attributes"]["dagster_taskiq.task_id"]: s for s in spans if s["name"] == name}


def _wait_worker_spans(
    path: Path, run_id: str, wanted: Mapping[str, int], log: Any
) -> list[dict[str, Any]]:
    """Wait until the worker has exported ``wanted`` (span name to count) spans of the run."""

    def _exported() -> list[dict[str, Any]] | None:
        spans = _worker_spans(path, run_id)
        found = {name: sum(1 for s in spans if s["name"] == name) for name in wanted}
        return spans if found == dict(wanted) else None

    return wait_for(
        _exported, 60, 0.2, f"the worker to export {dict(wanted)} spans of run {run_id}: {log()}"
    )


def test_one_trace_spans_the_orchestrator_and_the_worker(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool, tmp_path: Path
) -> None:
    spans_path = tmp_path / "worker-spans.txt"
    worker = workers.start(env=_tracing_env("trace-test-worker"), stdout_path=spans_path)
    tracer = trace.get_tracer("dagster_taskiq_tests")
    in_memory_exporter()
    with tracer.start_as_current_span("orchestrate") as root:
        with execute_job(
            reconstructable(jobs.two_op_chain),
            instance=instance,
            run_config=executor_config(settings),
        ) as result:
            assert result.success
            run_id = result.run_id
    trace_id = hex_id(root.get_span_context().trace_id, 32)

    enqueued = {
        str(span.attributes["dagster_taskiq.task_id"]): span  # type: ignore[index]
        for span in _memory_spans(run_id)
        if span.name == "enqueue"
    }
    assert len(enqueued) == 2, enqueued
    executed = _by_task(
        _wait_worker_spans(spans_path, run_id, {"execute": 2}, worker.log), "execute"
    )
    assert set(executed) == set(enqueued)
    for task_id, execute in executed.items():
        enqueue = enqueued[task_id]
        assert enqueue.context is not None
        assert hex_id(enqueue.context.trace_id, 32) == trace_id
        assert hex_id(execute["context"]["trace_id"], 32) == trace_id
        assert hex_id(execute["parent_id"], 16) == hex_id(enqueue.context.span_id, 16)
        attributes = execute["attributes"]
        assert attributes["dagster_taskiq.worker"] == worker.name
        assert attributes["dagster_taskiq.queue"] == settings.default_queue
        assert attributes["dagster.step_key"] == (enqueue.attributes or {})["dagster.step_key"]
        assert attributes["dagster_taskiq.outcome"] == "success"
        assert execute["resource"]["attributes"]["service.name"] == "trace-test-worker"


def test_a_launched_run_is_one_trace_from_launcher_to_its_steps(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Launcher (this process) -> the run's process on the worker -> its steps on the worker."""
    require(REDIS_URL, "Redis")
    settings = isolated_settings("redis", REDIS_URL, AMQP_URL, heartbeat_timeout=10.0)
    spans_path = tmp_path / "worker-spans.txt"
    tracer = trace.get_tracer("dagster_taskiq_tests")
    in_memory_exporter()
    with launcher_env("redis", tmp_path_factory, settings) as env:
        worker = env.workers.start(
            concurrency=2, env=_tracing_env("launched-run-worker"), stdout_path=spans_path
        )
        with tracer.start_as_current_span(f"launch-{uuid.uuid4().hex[:6]}") as root:
            run_id = env.launch(
                "stepped_job", {"execution": {"config": {"default_queue": settings.default_queue}}}
            )
        run = env.wait_status(run_id)
        assert run.status == DagsterRunStatus.SUCCESS, env.describe(run_id)
        spans = _wait_worker_spans(spans_path, run_id, {"execute": 3, "enqueue": 2}, worker.log)
    trace_id = hex_id(root.get_span_context().trace_id, 32)
    (run_enqueue,) = [s for s in _memory_spans(run_id) if s.name == "enqueue"]
    assert run_enqueue.context is not None
    assert (run_enqueue.attributes or {})["dagster_taskiq.kind"] == "run"
    assert {hex_id(s["context"]["trace_id"], 32) for s in spans} == {trace_id}

    executed = _by_task(spans, "execute")
    enqueued = _by_task(spans, "enqueue")
    (run_execute,) = [
        s for s in executed.values() if s["attributes"]["dagster_taskiq.kind"] == "run"
    ]
    assert hex_id(run_execute["parent_id"], 16) == hex_id(run_enqueue.context.span_id, 16)
    run_span_id = hex_id(run_execute["context"]["span_id"], 16)
    assert {s["attributes"]["dagster.step_key"] for s in enqueued.values()} == {
        "first_step",
        "second_step",
    }
    for task_id, enqueue in enqueued.items():
        # The step was sent from the run's process, inside the run's execute span ...
        assert hex_id(enqueue["parent_id"], 16) == run_span_id
        # ... and the step's execute span continues from that send.
        execute = executed[task_id]
        assert hex_id(execute["parent_id"], 16) == hex_id(enqueue["context"]["span_id"], 16)
        assert execute["attributes"]["dagster_taskiq.worker"] == worker.name


MALFORMED_TRACE_LABELS = {
    "traceparent": "00-ZZZZ-not-a-trace-" + "f" * 40,
    "tracestate": "=,=" * 10,
}


@contextlib.contextmanager
def _malformed_enqueue_span(**_: Any) -> Iterator[dict[str, str]]:
    yield dict(MALFORMED_TRACE_LABELS)


def test_a_worker_runs_tasks_whose_trace_context_is_malformed(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sender that writes garbage trace labels: the worker runs the steps, each in a new
    trace of its own, and keeps serving."""
    spans_path = tmp_path / "worker-spans.txt"
    worker = workers.start(env=_tracing_env("malformed-trace-worker"), stdout_path=spans_path)
    monkeypatch.setattr(connection, "enqueue_span", _malformed_enqueue_span)
    with execute_job(
        reconstructable(jobs.two_op_chain), instance=instance, run_config=executor_config(settings)
    ) as result:
        assert result.success
        run_id = result.run_id

    async def _registered_messages(conn: TaskiqConnection) -> list[bytes | None]:
        tasks = await conn.keystore.run_tasks(run_id)
        return [await conn.keystore.message(task_id) for task_id in tasks.values()]

    messages = run_async(settings, _registered_messages)
    assert len(messages) == 2
    for message in messages:
        assert message is not None
        labels = json.loads(message)["labels"]
        assert labels["traceparent"] == MALFORMED_TRACE_LABELS["traceparent"]
    spans = _wait_worker_spans(spans_path, run_id, {"execute": 2}, worker.log)
    for execute in spans:
        assert execute.get("parent_id") is None, execute
        assert execute["attributes"]["dagster_taskiq.outcome"] == "success"
    assert len({s["context"]["trace_id"] for s in spans}) == 2
    assert worker.process is not None and worker.process.poll() is None
