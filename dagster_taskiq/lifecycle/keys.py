"""Every Redis key dagster-taskiq writes, in one place.

Layout (``P`` is ``config_source.key_prefix``, default ``dagster_taskiq``)::

    P:task:{ID}          hash    a task's record                       (per task, hash tag ID)
    P:lease:{ID}         string  a running task's lease; TTL = heartbeat_timeout
    P:result:ID          string  a task's outcome, in taskiq's result format
    P:run:{RUN}          hash    a run's tasks: step key (or __run__) -> latest task id
    P:wake:{RUN}         list    pushed when a step task of the run finishes
    P:idx:inflight       zset    unfinished task ids by submit time
    P:idx:due            zset    unfinished task ids by the time they next need a look
    P:idx:workers        set     names of registered workers
    P:idx:consumers      set     names of registered broker consumers
    P:idx:queues         set     names of queues that have had messages
    P:worker:NAME        hash    a worker's liveness record; TTL = liveness
    P:shutdown:NAME      string  asks worker NAME to shut down
    P:revoked:NAME       list    ids of tasks worker NAME runs that were revoked (read each beat)
    P:turn:recovery      string  whose turn it is to look for dead consumers; TTL = one turn
    P:dead:entries       hash    refused messages: dead-letter id -> JSON entry
    P:dead:index         zset    dead-letter ids by the time they were refused
    P:q:QUEUE            zset    a queue's waiting messages (Redis broker)
    P:notify:QUEUE       list    wakes consumers blocked on QUEUE
    P:seq                string  submission counter (ties within a priority)
    P:unacked:CONSUMER   hash    messages a consumer popped and has not acknowledged
    P:consumer:CONSUMER  string  a consumer's liveness; TTL = liveness

The dead letters are capped at ``dead_letter_max`` entries and expire ``result_ttl`` after the
last one was added (older entries are pruned whenever one is added).

Registries, the sequence counter and notify lists expire ``INDEX_TTL_SECONDS`` after their last
use; the due and in-flight indexes empty (and so vanish) when no task is in flight.

Per-task keys carry the task id as a Redis Cluster hash tag, so that a task's record and its lease
live in one slot. Queue names only ever appear after ``P:q:`` and ``P:notify:``, and worker and
consumer names are validated (no ``:``), so no queue or worker name can collide with an internal
key.
"""

import re

from dagster_taskiq.errors import TaskiqConfigError

#: Worker and consumer names: letters, digits and ``._@-`` (no ``:``, no spaces), 1-128 chars.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
#: TTL of registries, counters and wake-up lists, refreshed whenever they are used: they outlive
#: any pause in a deployment's work, and vanish a week after it stops (no key lives forever).
INDEX_TTL_SECONDS = 7 * 86400
#: Key under which a run's task index keeps the run task (steps use their step key).
RUN_TASK_INDEX_FIELD = "__run__"


def validate_worker_name(name: str) -> str:
    """Return ``name`` if it can name a worker, else raise :class:`TaskiqConfigError`."""
    if not NAME_PATTERN.match(name):
        raise TaskiqConfigError(
            f"Invalid worker name {name!r}: use 1-128 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit (no ':' or spaces)."
        )
    return name


def _tag(value: str) -> str:
    """``value`` as a Redis Cluster hash tag."""
    return "{" + value + "}"


class KeySpace:
    """The key names under one prefix. Cheap to build; holds no connection."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    # -- per task --------------------------------------------------------------------------
    def task(self, task_id: str) -> str:
        """Hash holding a task's record."""
        return f"{self.prefix}:task:{_tag(task_id)}"

    def lease(self, task_id: str) -> str:
        """String whose TTL is a running task's lease (its heartbeat)."""
        return f"{self.prefix}:lease:{_tag(task_id)}"

    @property
    def result_prefix(self) -> str:
        """Prefix of the taskiq result backend's keys (``result_prefix:ID``)."""
        return f"{self.prefix}:result"

    def result(self, task_id: str) -> str:
        """String holding a task's outcome in taskiq's result format."""
        return f"{self.result_prefix}:{task_id}"

    # -- per run ---------------------------------------------------------------------------
    def run_index(self, run_id: str) -> str:
        """Hash of a run's tasks: step key (or ``__run__``) to the latest task id."""
        return f"{self.prefix}:run:{_tag(run_id)}"

    def run_wake(self, run_id: str) -> str:
        """List pushed to when a step task of the run finishes."""
        return f"{self.prefix}:wake:{_tag(run_id)}"

    # -- indexes ---------------------------------------------------------------------------
    @property
    def inflight(self) -> str:
        """Sorted set of unfinished task ids, scored by submit time."""
        return f"{self.prefix}:idx:inflight"

    @property
    def due(self) -> str:
        """Sorted set of unfinished task ids, scored by when they next need a look."""
        return f"{self.prefix}:idx:due"

    @property
    def workers(self) -> str:
        """Set of registered worker names."""
        return f"{self.prefix}:idx:workers"

    @property
    def consumers(self) -> str:
        """Set of registered broker consumer names (Redis broker)."""
        return f"{self.prefix}:idx:consumers"

    @property
    def queues(self) -> str:
        """Set of queue names that have had messages (Redis broker)."""
        return f"{self.prefix}:idx:queues"

    # -- workers ---------------------------------------------------------------------------
    def worker(self, name: str) -> str:
        """Hash holding a worker's liveness record (expires when the worker dies)."""
        return f"{self.prefix}:worker:{name}"

    def shutdown(self, name: str) -> str:
        """String that asks worker ``name`` to shut down gracefully."""
        return f"{self.prefix}:shutdown:{name}"

    def revocations(self, name: str) -> str:
        """List of ids of tasks running on worker ``name`` that were revoked since its last
        heartbeat: it renews those at once, so a revocation does not wait for their next
        renewal."""
        return f"{self.prefix}:revoked:{name}"

    @property
    def recovery_turn(self) -> str:
        """String held (with a TTL) by the consumer whose turn it is to look for dead ones."""
        return f"{self.prefix}:turn:recovery"

    @property
    def dead_letter_entries(self) -> str:
        """Hash of the messages workers refused: dead-letter id to its JSON entry."""
        return f"{self.prefix}:dead:entries"

    @property
    def dead_letter_index(self) -> str:
        """Sorted set of dead-letter ids, scored by when they were refused."""
        return f"{self.prefix}:dead:index"

    # -- Redis broker ----------------------------------------------------------------------
    def queue(self, name: str) -> str:
        """Sorted set of the messages waiting in queue ``name``."""
        return f"{self.prefix}:q:{name}"

    def queue_notify(self, name: str) -> str:
        """List that wakes consumers blocked on queue ``name``."""
        return f"{self.prefix}:notify:{name}"

    @property
    def sequence(self) -> str:
        """Counter that orders messages of equal priority."""
        return f"{self.prefix}:seq"

    def unacked(self, consumer: str) -> str:
        """Hash of the messages ``consumer`` popped and has not acknowledged."""
        return f"{self.prefix}:unacked:{consumer}"

    def consumer_alive(self, consumer: str) -> str:
        """String whose TTL says ``consumer`` is alive."""
        return f"{self.prefix}:consumer:{consumer}"
