"""The task lifecycle guarantees, checked from the ledger, the Dagster instance and the key store.

Each check returns a list of violation strings (empty when the guarantee held), so a test can
collect them all and ``assert violations == []`` with every one printed:

(i)   every run is terminal within a bound;
(ii)  no two executions of the same step of a run overlap in time (whatever their attempts);
(iii) each step has exactly one ``STEP_SUCCESS`` in the event log;
(iv)  once the runs are terminal no task record is left unfinished (queued, claimed, running,
      revoking) and no index still lists a task as in flight;
(v)   no forged message's code ran (its marker file does not exist);
(vi)  every key left under the prefix has a TTL, except the keys ``allow`` names.

The key store is read with a plain (synchronous) redis client and ``SCAN``, so the checks do not
depend on the package's key-store API, which is being rewritten: task records are found as
``<prefix>:task:*`` (both ``task:ID`` and the hash-tagged ``task:{ID}``).
"""

import fnmatch
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import redis
from dagster import DagsterEventType, DagsterInstance

from dagster_taskiq_tests.chaos.ledger import Execution

#: Task states in which a task still waits for, or is held by, a worker.
ACTIVE_STATES = frozenset({"queued", "claimed", "running", "revoking"})

#: Keys (glob patterns, relative to ``<prefix>:``) that may live without a TTL: per-deployment
#: structures whose size is bounded by the number of queues or workers, not of tasks or runs.
DEFAULT_ALLOW_NO_TTL: tuple[str, ...] = (
    "dead_letter",  # the dead-letter list (kept for operators; trimmed to dead_letter_max)
    "dead_letters",  # same, new layout
    "seq",  # the Redis broker's submission counter
    "workers",  # registry of worker names (pruned when listed)
    "idx:workers",  # same, new layout
    "idx:consumers",  # registry of broker consumers
    "idx:queues",  # registry of queue names
    "q:*:notify",  # per-queue wake-up list, trimmed to 64 entries
    "notify:*",  # same, new layout
)

#: Zsets (relative to ``<prefix>:``) that list unfinished task ids.
INFLIGHT_INDEXES = ("inflight", "idx:inflight", "idx:due")


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _client(redis_url: str) -> "redis.Redis":
    return redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)


def _task_id(key: str, prefix: str) -> str:
    task_id = key[len(f"{prefix}:task:") :]
    if task_id.startswith("{") and task_id.endswith("}"):
        task_id = task_id[1:-1]
    return task_id


# -- (i) ---------------------------------------------------------------------------------------
def check_runs_terminal(
    instance: DagsterInstance, run_ids: Iterable[str], bound: float, since: float | None = None
) -> list[str]:
    """(i) Wait until every run is terminal, at most until ``since + bound`` (monotonic clock;
    ``since`` defaults to now)."""
    deadline = (time.monotonic() if since is None else since) + bound
    pending = list(run_ids)
    while True:
        pending = [
            run_id
            for run_id in pending
            if (run := instance.get_run_by_id(run_id)) is None or not run.is_finished
        ]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    violations = []
    for run_id in pending:
        run = instance.get_run_by_id(run_id)
        status = run.status.value if run is not None else "missing"
        violations.append(f"(i) run {run_id} is not terminal within {bound:.0f} s (it is {status})")
    return violations


# -- (ii) --------------------------------------------------------------------------------------
def check_no_overlap(executions: Sequence[Execution], origin: float | None = None) -> list[str]:
    """(ii) No two executions of the same (run, step) overlap, whatever their attempts.

    An execution lasts from its start line to its end line, or to when its process was seen
    dead, or forever (unknown end).
    """
    if origin is None:
        origin = min((e.start for e in executions), default=0.0)
    by_step: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    for execution in executions:
        by_step[(execution.run_id, execution.step_key)].append(execution)
    violations = []
    for (run_id, step_key), group in sorted(by_step.items()):
        group.sort(key=lambda e: e.start)
        for i, first in enumerate(group):
            for second in group[i + 1 :]:
                if second.start < first.end:
                    overlap = min(first.end, second.end) - second.start
                    amount = f"{overlap:.2f} s" if math.isfinite(overlap) else "an unbounded time"
                    violations.append(
                        f"(ii) run {run_id} step {step_key}: {first.describe(origin)} overlaps "
                        f"{second.describe(origin)} by {amount}"
                    )
    return violations


# -- (iii) -------------------------------------------------------------------------------------
def _records(instance: DagsterInstance, run_id: str, event_type: DagsterEventType) -> list[object]:
    found: list[object] = []
    cursor = None
    while True:
        connection = instance.get_records_for_run(
            run_id, cursor=cursor, of_type=event_type, limit=1000
        )
        found.extend(connection.records)
        if not connection.has_more:
            return found
        cursor = connection.cursor


def check_one_success(
    instance: DagsterInstance, run_ids: Iterable[str], step_keys: Sequence[str]
) -> list[str]:
    """(iii) Each of ``step_keys`` has exactly one STEP_SUCCESS in each run's event log."""
    violations = []
    for run_id in run_ids:
        counts: Counter[str] = Counter()
        for record in _records(instance, run_id, DagsterEventType.STEP_SUCCESS):
            counts[record.event_log_entry.step_key or "?"] += 1  # type: ignore[attr-defined]
        wrong = {key: counts.get(key, 0) for key in step_keys if counts.get(key, 0) != 1}
        extra = sorted(set(counts) - set(step_keys))
        if not wrong and not extra:
            continue
        run = instance.get_run_by_id(run_id)
        status = run.status.value if run is not None else "missing"
        failures = [
            f"{r.event_log_entry.step_key or 'run'}: {r.event_log_entry.message}"  # type: ignore[attr-defined]
            for event_type in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE)
            for r in _records(instance, run_id, event_type)
        ]
        detail = f"; failures: {' | '.join(f[:300] for f in failures[:4])}" if failures else ""
        for key, count in sorted(wrong.items()):
            violations.append(
                f"(iii) run {run_id} ({status}) step {key} has {count} STEP_SUCCESS events, "
                f"expected exactly 1{detail}"
            )
        for key in extra:
            violations.append(f"(iii) run {run_id} has STEP_SUCCESS for unexpected step {key}")
    return violations


# -- (iv) --------------------------------------------------------------------------------------
def unfinished_tasks(redis_url: str, prefix: str) -> list[str]:
    """Descriptions of task records in an active state, and of in-flight index entries."""
    client = _client(redis_url)
    try:
        found = []
        keys = [
            _text(k) for k in client.scan_iter(match=f"{_glob_escape(prefix)}:task:*", count=1000)
        ]
        fields = ["state", "kind", "run_id", "step_key", "worker"]
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, fields)
            rows = pipe.execute() if keys else []
        for key, row in zip(keys, rows, strict=True):
            state, kind, run_id, step_key, worker = (_text(v) if v else "" for v in row)
            if state in ACTIVE_STATES:
                what = f"step {step_key}" if step_key else (kind or "task")
                found.append(
                    f"(iv) task {_task_id(key, prefix)} ({what} of run {run_id or '?'}) is left "
                    f"{state}" + (f" on worker {worker}" if worker else "")
                )
        for index in INFLIGHT_INDEXES:
            members = [_text(m) for m in client.zrange(f"{prefix}:{index}", 0, -1)]
            for member in members:
                found.append(f"(iv) index {prefix}:{index} still lists task {member} as in flight")
        return found
    finally:
        client.close()


def check_task_records(redis_url: str, prefix: str, settle: float = 15.0) -> list[str]:
    """(iv) Once the runs are terminal no task is left unfinished. Waits up to ``settle`` s for
    workers to record the outcomes of tasks that were ending as the runs ended."""
    deadline = time.monotonic() + settle
    while True:
        found = unfinished_tasks(redis_url, prefix)
        if not found or time.monotonic() >= deadline:
            return [f"{v} ({settle:.0f} s after the runs ended)" for v in found]
        time.sleep(0.2)


# -- (v) ---------------------------------------------------------------------------------------
def check_markers(markers: Mapping[str, str | os.PathLike[str]]) -> list[str]:
    """(v) No forged message's code ran: none of the marker files exists. ``markers`` maps a
    description of the forgery to its marker path."""
    violations = []
    for what, path in markers.items():
        marker = Path(path)
        if marker.exists():
            ran = marker.read_text(errors="replace").strip().replace("\n", " | ")
            violations.append(f"(v) forged code ran ({what}): {marker.name} exists: {ran[:300]}")
    return violations


# -- (vi) --------------------------------------------------------------------------------------
def check_ttls(
    redis_url: str, prefix: str, allow: Sequence[str] = DEFAULT_ALLOW_NO_TTL
) -> list[str]:
    """(vi) Every key under ``prefix`` has a TTL, except those matching ``allow`` (glob patterns
    relative to ``<prefix>:``)."""
    client = _client(redis_url)
    try:
        keys = sorted(
            _text(k) for k in client.scan_iter(match=f"{_glob_escape(prefix)}:*", count=1000)
        )
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.ttl(key)
                pipe.type(key)
            raw = pipe.execute() if keys else []
    finally:
        client.close()
    violations = []
    for i, key in enumerate(keys):
        ttl, kind = int(raw[2 * i]), _text(raw[2 * i + 1])
        if ttl != -1:
            continue
        relative = key[len(prefix) + 1 :]
        if any(fnmatch.fnmatchcase(relative, pattern) for pattern in allow):
            continue
        violations.append(f"(vi) key {key} ({kind}) has no TTL")
    return violations


# -- all of them -------------------------------------------------------------------------------
def check_all(
    *,
    instance: DagsterInstance,
    run_ids: Sequence[str],
    executions: Sequence[Execution] | None = None,
    executions_after_settle: Callable[[], Sequence[Execution]] | None = None,
    redis_url: str,
    prefix: str,
    step_keys: Sequence[str],
    markers: Mapping[str, str | os.PathLike[str]] | None = None,
    terminal_bound: float = 120.0,
    since: float | None = None,
    settle: float = 15.0,
    allow_no_ttl: Sequence[str] = DEFAULT_ALLOW_NO_TTL,
) -> list[str]:
    """Run checks (i)-(vi) in order and return every violation.

    ``executions_after_settle`` is a callable returning the ledger's executions; it is called
    after the key store has settled, so executions that were still ending are complete. Pass
    ``executions`` instead for a fixed list.
    """
    violations = check_runs_terminal(instance, run_ids, terminal_bound, since)
    records = check_task_records(redis_url, prefix, settle)
    if executions_after_settle is not None:
        executions = executions_after_settle()
    violations += check_no_overlap(list(executions or []))
    violations += check_one_success(instance, run_ids, step_keys)
    violations += records
    violations += check_markers(markers or {})
    violations += check_ttls(redis_url, prefix, allow_no_ttl)
    return violations


__all__ = [
    "ACTIVE_STATES",
    "DEFAULT_ALLOW_NO_TTL",
    "check_all",
    "check_markers",
    "check_no_overlap",
    "check_one_success",
    "check_runs_terminal",
    "check_task_records",
    "check_ttls",
    "unfinished_tasks",
]
