"""What a worker checks in a message before it claims the task: only our task names, one serdes
argument, and (with a ``signing_key``) a valid signature. Nothing in a message is imported or
called."""

from taskiq import TaskiqMessage

from dagster_taskiq.brokers.factory import QUEUE_LABEL
from dagster_taskiq.errors import BadMessageError
from dagster_taskiq.lifecycle.states import TaskKind
from dagster_taskiq.metrics.recorder import UNKNOWN_LABEL
from dagster_taskiq.payloads import (
    KNOWN_TASK_NAMES,
    STEP_TASK_NAME,
    RunTaskPayload,
    StepTaskPayload,
    decode_run,
    decode_step,
)
from dagster_taskiq.signing import SIGNATURE_LABEL, verify


def validate_message(
    message: TaskiqMessage, signing_key: str | None
) -> StepTaskPayload | RunTaskPayload:
    """The payload of a well-formed dagster-taskiq message, else :class:`BadMessageError`.

    Only our two task names, exactly one serdes argument, and (with ``signing_key``) a valid
    signature pass. Nothing in the message is imported or called.
    """
    if message.task_name not in KNOWN_TASK_NAMES:
        raise BadMessageError(
            f"Task {message.task_id} names '{message.task_name}', which is not a "
            "dagster-taskiq task; workers run only " + ", ".join(sorted(KNOWN_TASK_NAMES)) + "."
        )
    if len(message.args) != 1 or message.kwargs:
        raise BadMessageError(
            f"Task {message.task_id} ({message.task_name}) must carry exactly one argument."
        )
    if signing_key and not verify(
        signing_key,
        message.task_id,
        message.task_name,
        str(message.args[0]),
        message.labels.get(SIGNATURE_LABEL),
    ):
        state = "unsigned" if SIGNATURE_LABEL not in message.labels else "wrongly signed"
        raise BadMessageError(
            f"Task {message.task_id} is {state}; this worker has a signing_key and runs only "
            "messages signed with it."
        )
    if message.task_name == STEP_TASK_NAME:
        return decode_step(message.args[0], message.task_id)
    return decode_run(message.args[0], message.task_id)


def labels_of(message: TaskiqMessage) -> tuple[str, str]:
    """The metric ``queue`` and ``kind`` of a message, as far as it tells them."""
    queue = message.labels.get(QUEUE_LABEL)
    if message.task_name == STEP_TASK_NAME:
        kind = TaskKind.STEP.value
    elif message.task_name in KNOWN_TASK_NAMES:
        kind = TaskKind.RUN.value
    else:
        kind = UNKNOWN_LABEL
    return (str(queue) if queue else UNKNOWN_LABEL), kind
