"""One measured run, in a fresh process: ``python -m benchmarks.orchestrate '<json request>'``.

Dagster launches each run in its own process, so the benchmark does the same. The process imports
Dagster and the benchmark jobs first (not timed), then times ``execute_job`` from the call to the
end of the run, and prints one JSON object on its last stdout line:

``wall_s``, ``success``, ``cpu_s`` (this process's user + system CPU during the run, all threads),
``rss_before_mib`` (after imports) and ``peak_rss_mib`` (the process's high-water mark).

The request may also ask for a ``launch`` of many runs through the instance's run launcher
(``runs_50``): then the time runs from the first launch until every run has finished. A
``repeat`` of N runs executes the job N times one after another in this process (the in-process
baseline of ``runs_50``), timed from the first call to the end of the last run. With
``latencies``, the result also holds each step's latency from the run's event log
(``step_latencies_s``, in the order the steps finished): from the step's first event (the
executor handing it out) to its success.
"""

import json
import os
import resource
import sys
import time
from typing import Any


def _rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_latencies(instance: Any, run_id: str) -> list[float]:
    """Per step of a finished run: seconds from its first event to its success, in finish order."""
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        key = entry.step_key
        if not key:
            continue
        first.setdefault(key, entry.timestamp)
        event = entry.dagster_event
        if event is not None and event.event_type_value == "STEP_SUCCESS":
            done[key] = entry.timestamp
    return [done[key] - first[key] for key in sorted(done, key=done.__getitem__)]


def execute_one(
    shape: str,
    family: str,
    run_config: dict[str, Any],
    repeat: int = 1,
    latencies: bool = False,
) -> dict[str, Any]:
    """Execute ``repeat`` runs of ``shape`` on ``family``, one after another, and measure them."""
    from dagster import DagsterInstance, execute_job

    from benchmarks.jobs import build_job, job_name, recon

    build_job(job_name(shape, family))  # build the graph before the clock starts, as a loaded
    recon_job = recon(shape, family)  # code location would have it
    run_ids: list[str] = []
    succeeded = 0
    with DagsterInstance.get() as instance:
        rss_before = _rss_mib()
        cpu0 = _cpu_s()
        start = time.perf_counter()
        for _ in range(repeat):
            with execute_job(recon_job, instance=instance, run_config=run_config) as result:
                succeeded += int(result.success)
                run_ids.append(result.run_id)
        wall = time.perf_counter() - start
        cpu = _cpu_s() - cpu0
        found = step_latencies(instance, run_ids[-1]) if latencies else None
    result_record: dict[str, Any] = {
        "wall_s": wall,
        "success": succeeded == repeat,
        "run_id": run_ids[-1],
        "cpu_s": cpu,
        "rss_before_mib": rss_before,
        "peak_rss_mib": _peak_mib(),
    }
    if repeat > 1:
        result_record["succeeded"] = succeeded
    if found is not None:
        result_record["step_latencies_s"] = found
    return result_record


def run_observations(instance: Any, run_ids: list[str]) -> dict[str, Any]:
    """What the scale benchmark reads back from the finished runs' event logs.

    ``queue_waits_s``: the ``queue_wait_seconds`` metadata of every step-started event (the
    worker's event when it starts a step); ``run_pids``: the pid of each run's process on its
    worker (from the worker's "Started run" engine event); ``last_end``: the latest run end time
    (epoch seconds) of the runs' records.
    """
    from dagster._core.storage.dagster_run import RunsFilter

    waits: list[float] = []
    pids: list[int] = []
    for run_id in run_ids:
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            data = getattr(event, "event_specific_data", None) if event is not None else None
            metadata = getattr(data, "metadata", None) or {}
            if "queue_wait_seconds" in metadata:
                waits.append(float(metadata["queue_wait_seconds"].value))
            elif "pid" in metadata and "Started run on taskiq worker" in (entry.message or ""):
                pids.append(int(str(metadata["pid"].value)))
    records = instance.get_run_records(filters=RunsFilter(run_ids=run_ids))
    ends = [r.end_time for r in records if r.end_time is not None]
    return {"queue_waits_s": waits, "run_pids": pids, "last_end": max(ends) if ends else None}


def launch_many(
    shape: str,
    family: str,
    count: int,
    timeout: float,
    run_config: dict[str, Any] | None = None,
    observe: bool = False,
) -> dict[str, Any]:
    """Create ``count`` runs, launch them all through the instance's run launcher, wait.

    ``run_config`` goes into every run (the taskiq executor's config when the runs' steps go to
    the workers too). With ``observe``, the result also holds :func:`run_observations` and
    ``start_epoch``, the wall-clock time of the first launch.
    """
    from dagster import DagsterInstance, DagsterRunStatus
    from dagster._core.storage.dagster_run import RunsFilter

    from benchmarks.jobs import build_job, job_name, recon

    job = build_job(job_name(shape, family))
    recon_job = recon(shape, family)
    origin = recon_job.get_python_origin()
    with DagsterInstance.get() as instance:
        runs = [
            instance.create_run_for_job(job, run_config=run_config, job_code_origin=origin)
            for _ in range(count)
        ]
        run_ids = [run.run_id for run in runs]
        rss_before = _rss_mib()
        cpu0 = _cpu_s()
        start_epoch = time.time()
        start = time.perf_counter()
        for run_id in run_ids:
            instance.launch_run(run_id, workspace=None)  # type: ignore[arg-type]
        launched = time.perf_counter() - start
        deadline = start + timeout
        statuses: dict[str, str] = {}
        while True:
            records = instance.get_runs(filters=RunsFilter(run_ids=run_ids))
            statuses = {run.run_id: run.status.value for run in records}
            if all(run.is_finished for run in records) and len(records) == count:
                break
            if time.perf_counter() > deadline:
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
        cpu = _cpu_s() - cpu0
        observed = run_observations(instance, run_ids) if observe else None
        launcher = instance.run_launcher
        launcher.dispose()
    succeeded = sum(1 for s in statuses.values() if s == DagsterRunStatus.SUCCESS.value)
    extra: dict[str, Any] = {}
    if observed is not None:
        extra = {**observed, "start_epoch": start_epoch}
    return {
        **extra,
        "wall_s": wall,
        "launch_s": launched,
        "success": succeeded == count,
        "succeeded": succeeded,
        "statuses": sorted(set(statuses.values())),
        "cpu_s": cpu,
        "rss_before_mib": rss_before,
        "peak_rss_mib": _peak_mib(),
    }


def main(argv: list[str]) -> int:
    """Entry point: one JSON request in ``argv[0]``, one JSON result on stdout's last line."""
    request = json.loads(argv[0])
    import dagster  # noqa: F401  - imported before the clock starts

    import benchmarks.jobs  # noqa: F401

    if request.get("launch"):
        result = launch_many(
            request["shape"],
            request["family"],
            int(request["launch"]),
            request["timeout"],
            run_config=request.get("run_config"),
            observe=bool(request.get("observe")),
        )
    else:
        result = execute_one(
            request["shape"],
            request["family"],
            request["run_config"],
            repeat=int(request.get("repeat", 1)),
            latencies=bool(request.get("latencies")),
        )
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
