"""What travels on the wire and into the result backend: Dagster serdes JSON, never pickle."""

from typing import NamedTuple

from dagster_taskiq.compat import (
    ExecuteStepArgs,
    InstanceRef,
    SerializableErrorInfo,
    deserialize_value,
    serialize_value,
    whitelist_for_serdes,
)
from dagster_taskiq.errors import BadMessageError

STEP_TASK_NAME = "dagster_taskiq.execute_step"
RUN_TASK_NAME = "dagster_taskiq.execute_run"
#: The only task names a worker runs. A message naming anything else is dead-lettered.
KNOWN_TASK_NAMES = frozenset({STEP_TASK_NAME, RUN_TASK_NAME})


@whitelist_for_serdes
class StepTaskPayload(NamedTuple):
    """Arguments of a step task: Dagster's own ``ExecuteStepArgs`` for exactly one step."""

    execute_step_args: ExecuteStepArgs
    step_key: str


@whitelist_for_serdes
class RunTaskPayload(NamedTuple):
    """Arguments of a run task sent by the run launcher."""

    run_id: str
    instance_ref: InstanceRef | None
    resume: bool = False


@whitelist_for_serdes
class TaskOutcome(NamedTuple):
    """What a worker stores in the result backend when a task's process ends.

    ``status`` is one of ``success`` (the process exited 0), ``failure`` (it exited non-zero or
    crashed), ``revoked`` (it was revoked before or while running), ``lost`` (its worker stopped
    it after the task was declared lost) or ``skipped`` (a duplicate delivery or a run that had
    already ended). ``step_failed`` is set when a step task ran to its end (``success``) but
    the step itself failed or asked for a retry (worker metrics count it as a failure).
    """

    status: str
    worker: str
    exit_code: int | None = None
    message: str = ""
    error: SerializableErrorInfo | None = None
    step_failed: bool = False


def encode(value: StepTaskPayload | RunTaskPayload | TaskOutcome) -> str:
    """Serialize one of our payloads to a JSON string."""
    return serialize_value(value)


def decode_step(raw: object, task_id: str) -> StepTaskPayload:
    """Decode a step task argument, raising :class:`BadMessageError` on anything unexpected."""
    return _decode(raw, StepTaskPayload, task_id)


def decode_run(raw: object, task_id: str) -> RunTaskPayload:
    """Decode a run task argument, raising :class:`BadMessageError` on anything unexpected."""
    return _decode(raw, RunTaskPayload, task_id)


def decode_outcome(raw: object, task_id: str) -> TaskOutcome:
    """Decode a task result read from the result backend."""
    return _decode(raw, TaskOutcome, task_id)


def _decode(raw: object, cls: type, task_id: str):  # type: ignore[no-untyped-def]
    if not isinstance(raw, str):
        raise BadMessageError(
            f"Task {task_id}: expected a serdes JSON string for {cls.__name__}, got "
            f"{type(raw).__name__}."
        )
    try:
        value = deserialize_value(raw, cls)
    except Exception as exc:
        raise BadMessageError(
            f"Task {task_id}: argument is not a valid {cls.__name__} ({type(exc).__name__}: "
            f"{str(exc)[:200]})."
        ) from None
    return value
