"""The cold-start probe: a fresh worker's start-up, its first step, and a worker's PSS.

Runs after the scenarios, when the session's own workers are stopped, so that each fresh worker
is alone on its queue and its first step is certainly its own. Per round and taskiq executor:

1. ``python -c "import dagster; import benchmarks.jobs"`` is timed from start until it prints
   a line after the imports: the floor for a worker's start-up (an interpreter that loads
   Dagster and the job code).
2. One worker (``-c`` as the session's, ``-i benchmarks.jobs`` so it loads the job code) is
   timed the same way, from start until it logs that it is ready, just before it consumes.
   Odd rounds time the import first, even rounds the worker first, so that neither always
   finds the files in the page cache warmed by the other.
3. A ``chain`` run on it gives each step's latency from the event log (handed out to success):
   the first step is the fresh worker's first; the others are later steps.
4. A one-step ``nap`` run (the op sleeps 1 s) samples the worker's tree PSS while its step child
   sleeps, and after the run the tree's PSS when idle. The ``worker PSS with one idle child``
   figure is the idle tree if the worker keeps a child when idle, else the tree with the
   sleeping step child.
"""

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.env import REPO_ROOT, BenchEnv, WorkerProc
from benchmarks.measure import tree_memory
from benchmarks.scenarios import Scenario

#: The module a worker includes, and the import baseline loads.
JOB_MODULE = "benchmarks.jobs"
IMPORT_COMMAND = f"import dagster; import {JOB_MODULE}"
IMPORTED = "imported"
READY_TIMEOUT_S = 120.0

#: The probe's runs: a short chain for step latencies, one sleeping step for the PSS.
COLD_CHAIN = Scenario("cold_chain_5", "chain_5", "5 ops in a chain on a fresh worker", timeout=300)
COLD_NAP = Scenario("cold_nap", "nap", "one op that sleeps 1 s, for the worker's PSS", timeout=300)

RunOnce = Callable[[Scenario, str, int, dict[str, Any]], dict[str, Any]]


def time_import(env: dict[str, str]) -> float:
    """Seconds from starting the import baseline until it says it has imported everything.

    Timed like a worker: up to a line it prints, not to its exit (interpreter teardown is not
    part of a start-up).
    """
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", f"{IMPORT_COMMAND}; print({IMPORTED!r}, flush=True)"],
        env=env,
        cwd=str(REPO_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    elapsed = time.monotonic() - started
    try:
        _, err = process.communicate(timeout=READY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    if line.strip() != IMPORTED.encode() or process.returncode != 0:
        raise RuntimeError(
            f"The import baseline `python -c {IMPORT_COMMAND!r}` failed with exit code "
            f"{process.returncode}: {err.decode(errors='replace')[-2000:]}"
        )
    return elapsed


def wait_ready(worker: WorkerProc, timeout: float = READY_TIMEOUT_S) -> float:
    """Start ``worker`` and return the seconds until it logged that it is ready."""
    worker.start()
    deadline = time.monotonic() + timeout
    while not worker.is_ready():
        if time.monotonic() > deadline:
            worker.stop()
            raise RuntimeError(f"Worker {worker.name} was not ready within {timeout:.0f} s.")
        time.sleep(0.01)
    assert worker.ready_after_s is not None
    return worker.ready_after_s


class TreeWatch(threading.Thread):
    """Samples one worker's tree PSS; keeps the peak seen with at least one child."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name="bench-cold-pss", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_child_pss_mib = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self._halt.wait(self.interval):
            _, _, pss, count = tree_memory(self.pid)
            if count >= 2:
                self.peak_child_pss_mib = max(self.peak_child_pss_mib, pss)

    def stop(self) -> None:
        """Stop sampling."""
        self._halt.set()
        self.join(5)


def idle_tree(pid: int, samples: int = 5, interval: float = 0.2) -> tuple[float, int]:
    """(tree PSS in MiB, process count) of an idle worker: the last of a few settled samples."""
    pss, count = 0.0, 0
    for _ in range(samples):
        time.sleep(interval)
        _, _, pss, count = tree_memory(pid)
    return pss, count


def later_median(latencies: list[float]) -> float | None:
    """The median latency of every step after the first (None for fewer than two steps)."""
    return statistics.median(latencies[1:]) if len(latencies) > 1 else None


class ColdStartProbe:
    """Runs the probe's rounds for every taskiq executor of a session."""

    def __init__(
        self,
        env: BenchEnv,
        run_once: RunOnce,
        emit: Callable[[dict[str, Any]], None],
        *,
        chain: Scenario = COLD_CHAIN,
        nap: Scenario = COLD_NAP,
        log: Callable[[str], None] = print,
    ) -> None:
        self.env = env
        self.run_once = run_once
        self.emit = emit
        self.chain = chain
        self.nap = nap
        self.log = log

    def run(self, rounds: int) -> None:
        """Stop the session's workers, then probe each taskiq executor ``rounds`` times."""
        executors = [n for n, s in self.env.setups.items() if s.spec.workers == "taskiq"]
        if not executors or rounds <= 0:
            return
        for worker in self.env.workers:
            worker.stop()
        for round_no in range(1, rounds + 1):
            for name in executors:
                record = self._probe(name, round_no)
                self.emit(record)
                self.log(
                    f"{'cold start':<12} {name:<16} round {round_no:<2}  ready "
                    f"{record.get('ready_s', float('nan')):.2f} s (import "
                    f"{record.get('import_s', float('nan')):.2f} s), first step "
                    f"{record.get('first_step_s') or float('nan'):.3f} s, later "
                    f"{record.get('later_step_s') or float('nan'):.3f} s"
                    + ("" if record["success"] else f"  FAILED {record.get('error', '')}")
                )

    def _probe(self, name: str, round_no: int) -> dict[str, Any]:
        setup = self.env.setups[name]
        record: dict[str, Any] = {
            "type": "cold_start",
            "executor": name,
            "round": round_no,
            "success": False,
        }
        import_first = round_no % 2 == 1
        if import_first:
            record["import_s"] = time_import(self.env.orchestrator_env(name))
        worker = self.env.taskiq_worker(
            setup, f"bench-{self.env.uid}-{name}-cold-{round_no}", includes=(JOB_MODULE,)
        )
        setup.workers.append(worker)  # stopped with the session if anything below fails
        try:
            record["ready_s"] = wait_ready(worker)
            if not import_first:
                record["import_s"] = time_import(self.env.orchestrator_env(name))
            chain = self.run_once(self.chain, name, round_no, {"latencies": True})
            latencies = chain.get("step_latencies_s") or []
            record.update(
                chain_wall_s=chain.get("wall_s"),
                step_latencies_s=latencies,
                first_step_s=latencies[0] if latencies else None,
                later_step_s=later_median(latencies),
            )
            watch = TreeWatch(worker.pid)
            watch.start()
            try:
                nap = self.run_once(self.nap, name, round_no, {})
            finally:
                watch.stop()
            idle_pss, idle_processes = idle_tree(worker.pid)
            record.update(
                busy_child_pss_mib=watch.peak_child_pss_mib or None,
                idle_tree_pss_mib=idle_pss,
                idle_processes=idle_processes,
                success=bool(chain.get("success") and nap.get("success") and latencies),
            )
            if not record["success"]:
                record["error"] = chain.get("error") or nap.get("error") or "no step latencies"
        except RuntimeError as exc:
            record["error"] = str(exc)
        finally:
            worker.stop()
        return record
