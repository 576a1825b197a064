"""Execution scenarios on real workers, on Redis and on RabbitMQ."""

from collections import Counter

from dagster import DagsterEventType, DagsterInstance, execute_job, reconstructable

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq_tests import jobs
from dagster_taskiq_tests.harness import WorkerPool, executor_config


def _run(job_def, instance: DagsterInstance, settings: TaskiqSettings, **kwargs):  # type: ignore[no-untyped-def]
    run_config = executor_config(settings, **kwargs.pop("executor", {}))
    run_config.update(kwargs.pop("run_config", {}))
    return execute_job(reconstructable(job_def), instance=instance, run_config=run_config, **kwargs)


def _step_starts(result) -> Counter[str]:  # type: ignore[no-untyped-def]
    return Counter(
        e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_START
    )


def test_single_op(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start()
    with _run(jobs.single_op_job, instance, settings) as result:
        assert result.success
        assert result.output_for_node("emit_one") == 1
        assert _step_starts(result) == {"emit_one": 1}


def test_two_op_chain(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start()
    with _run(jobs.two_op_chain, instance, settings) as result:
        assert result.success
        assert result.output_for_node("add_one") == 2


def test_diamond_with_aliases(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start(concurrency=2)
    with _run(jobs.diamond_job, instance, settings) as result:
        assert result.success
        assert result.output_for_node("combine") == (1 + 1) + (10 + 1)


def test_fanout_ten(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start(concurrency=2)
    workers.start(concurrency=2)
    with _run(jobs.fanout_job, instance, settings) as result:
        assert result.success
        assert result.output_for_node("collect") == 20
        starts = _step_starts(result)
        assert len(starts) == 12 and set(starts.values()) == {1}


def test_nested_graph(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start(concurrency=2)
    with _run(jobs.nested_graph_job, instance, settings) as result:
        assert result.success
        assert result.output_for_node("quad_3") == 1 + 16
        assert len(_step_starts(result)) == 17


def test_optional_outputs_skip(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start(concurrency=2)
    with _run(jobs.optional_outputs_job, instance, settings) as result:
        assert result.success
        skipped = {
            e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_SKIPPED
        }
        assert skipped == {"after_no", "after_no_1", "after_no_2"}
        assert {"after_yes", "after_yes_2"} <= set(_step_starts(result))


def test_failing_op_reports_error_and_blocks_downstream(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start()
    with _run(jobs.failing_job, instance, settings, raise_on_error=False) as result:
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert failure.step_key == "boom"
        assert "42 is not allowed" in failure.step_failure_data.error.cause.message  # type: ignore[union-attr]
        assert "never_runs" not in _step_starts(result)


def test_retry_policy(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start()
    with _run(jobs.retry_policy_job, instance, settings) as result:
        assert result.success
        assert result.output_for_node("flaky") == 2
        assert _step_starts(result)["flaky"] == 1
        kinds = [e.event_type for e in result.all_events if e.step_key == "flaky"]
        assert kinds.count(DagsterEventType.STEP_UP_FOR_RETRY) == 2
        assert kinds.count(DagsterEventType.STEP_RESTARTED) == 2


def test_retry_requested(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start()
    with _run(jobs.retry_requested_job, instance, settings) as result:
        assert result.success
        kinds = [e.event_type for e in result.all_events if e.step_key == "asks_for_retry"]
        assert DagsterEventType.STEP_UP_FOR_RETRY in kinds
        assert DagsterEventType.STEP_RESTARTED in kinds
    with _run(jobs.retry_exhausted_job, instance, settings, raise_on_error=False) as result:
        assert not result.success
        kinds = [e.event_type for e in result.all_events if e.step_key == "always_retry"]
        assert kinds.count(DagsterEventType.STEP_START) == 1
        assert kinds.count(DagsterEventType.STEP_RESTARTED) == 2
        assert kinds[-1] == DagsterEventType.STEP_FAILURE


def test_op_subset(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start()
    with _run(jobs.diamond_job, instance, settings, op_selection=["emit_one", "split"]) as result:
        assert result.success
        assert set(_step_starts(result)) == {"emit_one", "split"}


def test_dynamic_outputs(
    instance: DagsterInstance, settings: TaskiqSettings, workers: WorkerPool
) -> None:
    workers.start(concurrency=2)
    with _run(jobs.dynamic_job, instance, settings) as result:
        assert result.success
        assert result.output_for_node("collect") == 1 + 2 + 3
