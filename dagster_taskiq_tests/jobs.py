"""Jobs the tests run on real workers. Every job uses ``taskiq_executor``."""

import os
import time
from pathlib import Path

from dagster import (
    Backoff,
    Config,
    DynamicOut,
    DynamicOutput,
    In,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    RetryPolicy,
    RetryRequested,
    graph,
    job,
    op,
)

from dagster_taskiq import taskiq_executor

QUEUE_TAG = "dagster-taskiq/queue"
PRIORITY_TAG = "dagster-taskiq/priority"


def _record(name: str) -> None:
    """Append ``name`` and the pid to $DAGSTER_TASKIQ_TEST_LOG (order and concurrency probes)."""
    path = os.environ.get("DAGSTER_TASKIQ_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{time.time():.6f} {os.getpid()} {name}\n")


@op
def emit_one() -> int:
    return 1


@op
def add_one(value: int) -> int:
    return value + 1


@job(executor_def=taskiq_executor)
def single_op_job() -> None:
    emit_one()


@job(executor_def=taskiq_executor)
def two_op_chain() -> None:
    add_one(emit_one())


@op(out={"left": Out(int), "right": Out(int)})
def split(value: int):  # type: ignore[no-untyped-def]
    yield Output(value, "left")
    yield Output(value * 10, "right")


@op
def combine(left: int, right: int) -> int:
    return left + right


@job(executor_def=taskiq_executor)
def diamond_job() -> None:
    left, right = split(emit_one())
    combine(add_one.alias("add_left")(left), add_one.alias("add_right")(right))


@op
def collect(values: list[int]) -> int:
    return sum(values)


@job(executor_def=taskiq_executor)
def fanout_job() -> None:
    root = emit_one()
    collect([add_one.alias(f"branch_{i}")(root) for i in range(10)])


@graph
def pair(value: int) -> int:
    return add_one.alias("inner_b")(add_one.alias("inner_a")(value))


@graph
def quad(value: int) -> int:
    return pair.alias("pair_b")(pair.alias("pair_a")(value))


@job(executor_def=taskiq_executor)
def nested_graph_job() -> None:
    value = emit_one()
    for i in range(4):
        value = quad.alias(f"quad_{i}")(value)


@op(out={"yes": Out(int, is_required=False), "no": Out(int, is_required=False)})
def maybe(value: int):  # type: ignore[no-untyped-def]
    yield Output(value, "yes")


@job(executor_def=taskiq_executor)
def optional_outputs_job() -> None:
    yes, no = maybe(emit_one())
    add_one.alias("after_yes")(yes)
    add_one.alias("after_yes_2")(add_one.alias("after_yes_1")(yes))
    add_one.alias("after_no")(no)
    add_one.alias("after_no_2")(add_one.alias("after_no_1")(no))


@op
def boom() -> int:
    raise ValueError("the op failed on purpose: 42 is not allowed")


@job(executor_def=taskiq_executor)
def failing_job() -> None:
    add_one.alias("never_runs")(boom())


@op(retry_policy=RetryPolicy(max_retries=2, delay=0.1, backoff=Backoff.LINEAR))
def flaky(context: OpExecutionContext) -> int:
    if context.retry_number < 2:
        raise RuntimeError(f"transient failure on attempt {context.retry_number}")
    return context.retry_number


@job(executor_def=taskiq_executor)
def retry_policy_job() -> None:
    add_one(flaky())


@op
def asks_for_retry(context: OpExecutionContext) -> int:
    if context.retry_number < 1:
        raise RetryRequested(max_retries=1, seconds_to_wait=0.1)
    return 1


@job(executor_def=taskiq_executor)
def retry_requested_job() -> None:
    asks_for_retry()


@op
def always_retry() -> int:
    raise RetryRequested(max_retries=2, seconds_to_wait=0.1)


@job(executor_def=taskiq_executor)
def retry_exhausted_job() -> None:
    always_retry()


class SleepConfig(Config):
    seconds: float = 0.5


@op
def sleeper(context: OpExecutionContext, config: SleepConfig) -> int:
    _record(f"start {context.op.name}")
    time.sleep(config.seconds)
    _record(f"end {context.op.name}")
    return 1


@job(executor_def=taskiq_executor)
def sleepy_job() -> None:
    for i in range(6):
        sleeper.alias(f"sleep_{i}")()


@job(executor_def=taskiq_executor)
def tag_limited_job() -> None:
    for i in range(4):
        sleeper.alias(f"db_{i}").tag({"database": "warehouse"})()


@op(ins={"start": In(Nothing)})
def probe(context: OpExecutionContext) -> str:
    _record(context.op.name)
    return context.op.name


@op
def gate(context: OpExecutionContext) -> None:
    _record("gate")


def priority_job_for(priorities: dict[str, int], queue: str | None = None):  # type: ignore[no-untyped-def]
    """A job whose probes, all released at once by ``gate``, carry the given priorities."""

    @job(executor_def=taskiq_executor, name="priority_job")
    def priority_job() -> None:
        done = gate()
        for name, priority in priorities.items():
            tags = {PRIORITY_TAG: str(priority)}
            if queue:
                tags[QUEUE_TAG] = queue
            probe.alias(name).tag(tags)(start=done)

    return priority_job


PRIORITIES = {"p_low": 1, "p_high": 9, "p_mid": 5, "p_top": 10, "p_min": 0}
priority_job = priority_job_for(PRIORITIES)


@op(tags={QUEUE_TAG: "special"})
def on_special_queue() -> int:
    return 7


@job(executor_def=taskiq_executor)
def special_queue_job() -> None:
    add_one(on_special_queue())


@op(tags={PRIORITY_TAG: "high"})
def bad_priority_op() -> int:
    return 1


@job(executor_def=taskiq_executor)
def bad_priority_job() -> None:
    bad_priority_op()


@op
def slow_then_done(context: OpExecutionContext) -> int:
    _record(f"start {context.op.name}")
    marker = os.environ.get("DAGSTER_TASKIQ_TEST_MARKER")
    deadline = time.time() + 120
    while time.time() < deadline:
        if marker and Path(marker).exists():
            break
        time.sleep(0.05)
    _record(f"end {context.op.name}")
    return 1


@job(executor_def=taskiq_executor)
def long_step_job() -> None:
    add_one(slow_then_done())


@op(retry_policy=RetryPolicy(max_retries=2))
def crash_once(context: OpExecutionContext) -> int:
    """Runs until killed on its first attempt (the test kills the worker); succeeds after."""
    _record(f"attempt {context.retry_number} {context.op.name}")
    if context.retry_number == 0:
        time.sleep(120)
    return 1


@job(executor_def=taskiq_executor)
def crash_job() -> None:
    add_one(crash_once())


@op
def forever(context: OpExecutionContext) -> None:
    _record(f"start {context.op.name}")
    time.sleep(300)


@op(ins={"start": In(Nothing)})
def after_forever() -> None:
    _record("after_forever")


@job(executor_def=taskiq_executor)
def terminate_job() -> None:
    forever.alias("running_a")()
    after_forever(start=forever.alias("running_b")())


@op(out=DynamicOut(int))
def spread():  # type: ignore[no-untyped-def]
    for i in range(3):
        yield DynamicOutput(i, mapping_key=f"k{i}")


@job(executor_def=taskiq_executor)
def dynamic_job() -> None:
    collect(spread().map(add_one).collect())


@op
def os_exit_op() -> None:
    os._exit(1)


@job(executor_def=taskiq_executor)
def os_exit_job() -> None:
    os_exit_op()
