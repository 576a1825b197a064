"""Tag names and the rules that turn op, job and run tags into a queue and a priority."""

import warnings
from collections.abc import Mapping
from typing import NamedTuple

from dagster_taskiq.errors import InvalidTagError

TAG_PREFIX = "dagster-taskiq/"
QUEUE_TAG = "dagster-taskiq/queue"
PRIORITY_TAG = "dagster-taskiq/priority"
RUN_PRIORITY_TAG = "dagster-taskiq/run_priority"
TASK_ID_TAG = "dagster-taskiq/task_id"

CELERY_QUEUE_TAG = "dagster-celery/queue"
CELERY_PRIORITY_TAG = "dagster-celery/priority"
CELERY_RUN_PRIORITY_TAG = "dagster-celery/run_priority"

_CELERY_FALLBACKS = {
    QUEUE_TAG: CELERY_QUEUE_TAG,
    PRIORITY_TAG: CELERY_PRIORITY_TAG,
    RUN_PRIORITY_TAG: CELERY_RUN_PRIORITY_TAG,
}

DEFAULT_STEP_PRIORITY = 5
DEFAULT_RUN_PRIORITY = 0
#: Priorities are bounded so that they fit the broker's ordering keys; see the README.
MIN_PRIORITY = -1_000_000
MAX_PRIORITY = 1_000_000


class CeleryTagWarning(UserWarning):
    """Emitted (once per place) when a ``dagster-celery/*`` tag is honoured for migration."""


class Routing(NamedTuple):
    """Where a task goes: its queue and its effective priority."""

    queue: str
    priority: int


def _lookup(tags: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """``(tag name actually used, value)`` for ``name`` or its dagster-celery twin."""
    if name in tags:
        return name, tags[name]
    celery_name = _CELERY_FALLBACKS.get(name)
    if celery_name and celery_name in tags:
        warnings.warn(
            f"Honouring the legacy tag '{celery_name}'; rename it to '{name}'. dagster-celery tags "
            "are read only while the dagster-taskiq tag is absent.",
            CeleryTagWarning,
            stacklevel=3,
        )
        return celery_name, tags[celery_name]
    return None


def validate_queue_name(queue: str, where: str) -> str:
    """Return ``queue`` stripped, or raise :class:`InvalidTagError` naming ``where``."""
    name = str(queue).strip()
    if not name or len(name) > 200 or any(ord(ch) < 32 for ch in name):
        raise InvalidTagError(
            f"Invalid queue name {queue!r} on {where}: use 1-200 printable characters, "
            f"for example tags={{'{QUEUE_TAG}': 'gpu'}}."
        )
    return name


def parse_priority(value: object, tag: str, where: str) -> int:
    """Parse an integer priority tag value, raising a message that says how to fix it."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise InvalidTagError(
            f"Tag '{tag}' on {where} must be an integer, got {value!r}. "
            f"For example tags={{'{tag}': '7'}}."
        ) from None
    if not MIN_PRIORITY <= number <= MAX_PRIORITY:
        raise InvalidTagError(
            f"Tag '{tag}' on {where} is {number}; priorities must lie between {MIN_PRIORITY} "
            f"and {MAX_PRIORITY}."
        )
    return number


def queue_from_tags(tags: Mapping[str, str], default_queue: str, where: str) -> str:
    """The queue named by ``dagster-taskiq/queue`` (or its celery twin), else ``default_queue``."""
    found = _lookup(tags, QUEUE_TAG)
    return validate_queue_name(found[1], where) if found is not None else default_queue


def run_priority_from_tags(tags: Mapping[str, str], where: str) -> int:
    """The run priority named by ``dagster-taskiq/run_priority`` (default 0)."""
    found = _lookup(tags, RUN_PRIORITY_TAG)
    if found is None:
        return DEFAULT_RUN_PRIORITY
    return parse_priority(found[1], found[0], where)


def step_routing(
    step_tags: Mapping[str, str], run_tags: Mapping[str, str], default_queue: str, where: str
) -> Routing:
    """Queue and effective priority of a step: op priority plus run priority."""
    found = _lookup(step_tags, PRIORITY_TAG)
    priority = DEFAULT_STEP_PRIORITY if found is None else parse_priority(found[1], found[0], where)
    total = priority + run_priority_from_tags(run_tags, where)
    return Routing(queue_from_tags(step_tags, default_queue, where), total)


def run_routing(run_tags: Mapping[str, str], default_queue: str, where: str) -> Routing:
    """Queue and priority of a whole-run task sent by the run launcher."""
    return Routing(
        queue_from_tags(run_tags, default_queue, where), run_priority_from_tags(run_tags, where)
    )
