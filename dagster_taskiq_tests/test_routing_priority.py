"""Routing, priority and concurrency limits on real workers, on Redis and on RabbitMQ."""

import time
from collections import Counter
from pathlib import Path

import pytest
from dagster import DagsterInstance, reconstructable

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.tags import RUN_PRIORITY_TAG
from dagster_taskiq_tests import jobs
from dagster_taskiq_tests.harness import WorkerPool
from dagster_taskiq_tests.scenario_jobs import LOG_ENV, read_notes, recon
from dagster_taskiq_tests.scenario_support import (
    in_background,
    run_job,
    status,
    task_records,
    wait_heartbeats,
    wait_new_run,
    wait_states,
    worker_record,
)

#: Probe name -> op priority. Three ties at 7 must run in submission order.
PRIORITIES = {
    "p_low": 1,
    "tie_a": 7,
    "p_high": 9,
    "p_mid": 5,
    "tie_b": 7,
    "p_top": 10,
    "p_min": 0,
    "tie_c": 7,
}


@pytest.fixture
def order_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the test ops append to (set before any worker starts)."""
    path = tmp_path / "order.log"
    monkeypatch.setenv(LOG_ENV, str(path))
    return path


def test_unserved_queue_waits_then_runs_by_priority(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    order_log: Path,
) -> None:
    """Probes on a queue nobody serves stay queued; a worker for it then runs them by priority.

    Also checks routing: the gate worker (``-q gate``) never takes a probe, and one worker serves
    two queues (``-q probes -q final``).
    """
    base = settings.default_queue
    gate_q, probe_q, final_q = f"{base}.gate", f"{base}.probes", f"{base}.final"
    gate_worker = workers.start(queues=[gate_q], wait=False)  # boots while the run starts
    job = recon(
        "routed_priority_job",
        gate_queue=gate_q,
        probe_queue=probe_q,
        final_queue=final_q,
        priorities=PRIORITIES,
    )
    future = in_background(lambda: run_job(job, instance, settings))
    run = wait_new_run(instance, set(), future=future)
    gate_worker.wait_registered()
    queued = wait_states(settings, run.run_id, {name: "queued" for name in PRIORITIES})

    # Nobody serves the probe queue: the probes must still wait after the gate worker, idle and
    # polling its own queue, has heartbeated for a while.
    wait_heartbeats(settings, gate_worker.name, after=time.time() + 1.0)
    records = task_records(settings, run.run_id)
    assert {name: records[name].state for name in PRIORITIES} == dict.fromkeys(PRIORITIES, "queued")
    assert records["gate"].state == "done" and records["gate"].worker == gate_worker.name
    info = worker_record(settings, gate_worker.name)
    assert info is not None and info.running == () and info.queues == (gate_q,)
    waiting = {q["name"]: q for q in status(settings)["queues"]}
    assert waiting[probe_q]["waiting"] == len(PRIORITIES)
    assert waiting[probe_q]["by_priority"] == {
        str(p): n for p, n in Counter(PRIORITIES.values()).items()
    }
    assert not future.done()

    probe_worker = workers.start(queues=[probe_q, final_q], concurrency=1)
    summary = future.result(timeout=120)
    assert summary.success

    ran = [what for _, _, run_id, what in read_notes(order_log) if run_id == run.run_id]
    expected = sorted(PRIORITIES, key=lambda n: (-PRIORITIES[n], queued[n].submitted_at))
    assert ran == ["gate", *expected, "finale"]
    # The ties really were submitted in some order, and that order was kept.
    ties = [n for n in expected if PRIORITIES[n] == 7]
    assert len({queued[n].submitted_at for n in ties}) == 3
    records = task_records(settings, run.run_id)
    assert {n: records[n].worker for n in [*PRIORITIES, "finale"]} == dict.fromkeys(
        [*PRIORITIES, "finale"], probe_worker.name
    )
    assert all(summary.starts(name) == 1 for name in [*PRIORITIES, "gate", "finale"])


def test_higher_run_priority_wins(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    order_log: Path,
) -> None:
    """Two runs queue all their steps; the later run with the higher run priority goes first."""
    queue = f"{settings.default_queue}.ranked"
    ranks = {"r_1": 4, "r_2": 6, "r_3": 5}
    job = recon("ranked_job", queue=queue, priorities=ranks)
    low = in_background(lambda: run_job(job, instance, settings, tags={RUN_PRIORITY_TAG: "0"}))
    low_run = wait_new_run(instance, set(), future=low)
    wait_states(settings, low_run.run_id, dict.fromkeys(ranks, "queued"))
    high = in_background(lambda: run_job(job, instance, settings, tags={RUN_PRIORITY_TAG: "3"}))
    high_run = wait_new_run(instance, {low_run.run_id}, future=high)
    high_records = wait_states(settings, high_run.run_id, dict.fromkeys(ranks, "queued"))
    assert {n: r.priority for n, r in high_records.items()} == {n: p + 3 for n, p in ranks.items()}

    workers.start(queues=[queue], concurrency=1)
    assert low.result(timeout=120).success
    assert high.result(timeout=120).success

    ran = [(run_id, what) for _, _, run_id, what in read_notes(order_log)]
    by_rank = sorted(ranks, key=lambda n: -ranks[n])
    assert ran == [(high_run.run_id, n) for n in by_rank] + [(low_run.run_id, n) for n in by_rank]


def test_steps_held_back_by_max_concurrent_follow_dagster_priority(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    order_log: Path,
) -> None:
    """What the README says: steps that ``max_concurrent`` holds in the orchestrator are released
    by Dagster's ``dagster/priority`` tag, so an op tagged with both runs in priority order."""
    queue = f"{settings.default_queue}.held"
    ranks = {"h_1": 2, "h_2": 9, "h_3": 5, "h_4": 7}
    workers.start(queues=[queue], concurrency=1)
    summary = run_job(
        recon("held_back_job", queue=queue, priorities=ranks),
        instance,
        settings,
        {"max_concurrent": 1},
    )
    assert summary.success
    ran = [what for _, _, _, what in read_notes(order_log)]
    assert ran == sorted(ranks, key=lambda n: -ranks[n])


def _max_overlap(order_log: Path, prefix: str) -> int:
    """Most steps named ``prefix*`` running at once, from their recorded start/end times."""
    edges = []
    for line in order_log.read_text(encoding="utf-8").splitlines():
        stamp, _pid, what = line.split(" ", 2)
        kind, _, name = what.partition(" ")
        if name.startswith(prefix):
            edges.append((float(stamp), 1 if kind == "start" else -1))
    assert len(edges) % 2 == 0 and edges, f"no complete start/end records for {prefix}"
    current = peak = 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):
        current += delta
        peak = max(peak, current)
    return peak


def test_max_concurrent_and_tag_limits(
    instance: DagsterInstance,
    settings: TaskiqSettings,
    workers: WorkerPool,
    order_log: Path,
) -> None:
    """With four free slots, ``max_concurrent: 2`` and a tag limit of 1 still hold."""
    workers.start(concurrency=4, wait=False)  # the run waits for it
    # One-second steps, so that two of them surely overlap even on a loaded machine.
    seconds = {f"sleep_{i}": {"config": {"seconds": 1.0}} for i in range(6)}
    summary = run_job(
        reconstructable(jobs.sleepy_job),
        instance,
        settings,
        {"max_concurrent": 2},
        run_config={"ops": seconds},
    )
    assert summary.success
    assert _max_overlap(order_log, "sleep_") == 2

    limits = [{"key": "database", "value": "warehouse", "limit": 1}]
    summary = run_job(
        reconstructable(jobs.tag_limited_job),
        instance,
        settings,
        {"tag_concurrency_limits": limits},
    )
    assert summary.success
    assert _max_overlap(order_log, "db_") == 1
