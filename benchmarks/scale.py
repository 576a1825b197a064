"""The scale benchmark (``python -m benchmarks run scale``): many runs on N workers, N growing.

For each worker count (``--scale-workers 2,4,8``) it starts a private ``redis-server`` (so no
other traffic counts), a fresh Dagster instance (PostgreSQL storage by default) with
``TaskiqRunLauncher``, and N workers with ``--concurrency`` slots each. It then launches
``--scale-runs`` runs of a ``--scale-steps`` op chain at once through the launcher; each run's
steps go to the workers through ``taskiq_executor``. Per worker count it records:

- throughput: steps per second from the first launch to the last run's end time;
- queue wait p50 and p99: the ``queue_wait_seconds`` metadata of every step-started event;
- Redis commands per step: the private server's ``total_commands_processed`` over the measured
  launch, divided by the steps (idle workers' polling included: that is what grows with N);
- orchestrator CPU per step: the CPU of the runs' own processes on the workers (each run's
  orchestrating process; pids from the worker's "Started run" event), sampled from ``/proc``
  every 0.1 s while they live, divided by the steps; next to it the workers' whole CPU per step
  (run and step processes) and the launching process's CPU.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import psutil

from benchmarks.env import REPO_ROOT, BenchEnv, PrivateRedis
from benchmarks.measure import tree_cpu
from benchmarks.runner import machine, versions
from benchmarks.scalestats import per_step, percentile, scale_check

EXECUTOR = "taskiq_redis"


@dataclasses.dataclass(frozen=True)
class ScaleSpec:
    """What one scale session measures."""

    worker_counts: tuple[int, ...] = (2, 4, 8)
    slots: int = 2
    runs: int = 100
    steps: int = 20
    storage: str = "postgres"
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    warmup: bool = True
    keep: bool = False
    timeout: float = 1800.0

    @property
    def shape(self) -> str:
        """The job shape of every run: a chain of ``steps`` ops."""
        return f"chain_{self.steps}"


class ProcessCpu:
    """Last-seen CPU seconds of every process under some roots, sampled in a thread."""

    def __init__(self, roots: Sequence[int], interval: float = 0.1) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scale-cpu", daemon=True)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (one last sample first)."""
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def sample(self) -> None:
        """Record the CPU of every live process under the roots."""
        for root in self.roots:
            try:
                children = psutil.Process(root).children(recursive=True)
            except psutil.Error:
                continue
            for proc in children:
                try:
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                self.seen[proc.pid] = times.user + times.system

    def total(self, pids: Sequence[int]) -> tuple[float, int]:
        """(CPU seconds summed over ``pids`` that were seen, how many were seen)."""
        found = [self.seen[pid] for pid in pids if pid in self.seen]
        return sum(found), len(found)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def _redis_counters(url: str) -> tuple[int, dict[str, int]]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        total = int(client.info("stats")["total_commands_processed"])
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in stats.items()}
    return total, calls


class ScaleBench:
    """Runs the scale benchmark for each worker count and writes JSON lines."""

    def __init__(self, spec: ScaleSpec, out: TextIO, log: Callable[[str], None] = print) -> None:
        self.spec = spec
        self.out = out
        self.log = log
        self.records: list[dict[str, Any]] = []

    def emit(self, record: dict[str, Any]) -> None:
        """Write one JSON line and keep it."""
        self.records.append(record)
        self.out.write(json.dumps(record, sort_keys=True) + "\n")
        self.out.flush()

    def run(self) -> list[dict[str, Any]]:
        """Measure every worker count, then the flatness check; return all records."""
        spec = self.spec
        self.emit(
            {
                "type": "meta",
                "mode": "scale",
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine(),
                "versions": versions(),
                "scale": {**dataclasses.asdict(spec), "shape": spec.shape},
                "storage": spec.storage,
            }
        )
        scale_records = []
        for count in spec.worker_counts:
            record = self.measure(count)
            self.emit(record)
            scale_records.append(record)
            self.log(
                f"scale {count} workers × {spec.slots}: "
                f"{record.get('throughput_steps_per_s') or float('nan'):.2f} steps/s, "
                f"{record.get('redis_commands_per_step') or float('nan'):.1f} Redis cmds/step, "
                f"{record.get('succeeded', 0)}/{spec.runs} runs ok"
            )
        self.emit(scale_check(scale_records))
        return self.records

    def measure(self, workers: int) -> dict[str, Any]:
        """Start a private Redis, an instance and ``workers`` workers; launch and measure."""
        spec = self.spec
        record: dict[str, Any] = {
            "type": "scale",
            "workers": workers,
            "slots": spec.slots,
            "runs": spec.runs,
            "steps_per_run": spec.steps,
            "steps": spec.runs * spec.steps,
            "storage": spec.storage,
        }
        workdir = Path(tempfile.mkdtemp(prefix="dagster-taskiq-scale-redis-"))
        redis_server = PrivateRedis(workdir)
        env = BenchEnv(
            [EXECUTOR],
            redis_url=redis_server.url,
            workers=workers,
            concurrency=spec.slots,
            storage=spec.storage,
            postgres_url=spec.postgres_url,
            keep=spec.keep,
            log=self.log,
        )
        record["session"] = env.uid
        try:
            env.start()
            if spec.warmup:
                warm = self._launch(env, workers, observe=False)
                if not warm.get("success"):
                    self.log(f"scale warm-up with {workers} workers did not succeed: {warm}")
            record.update(self._measured(env, redis_server.url))
        finally:
            try:
                env.stop()
            finally:
                redis_server.stop()
                shutil.rmtree(workdir, ignore_errors=True)
        return record

    def _measured(self, env: BenchEnv, redis_url: str) -> dict[str, Any]:
        spec = self.spec
        steps = spec.runs * spec.steps
        roots = [w.pid for w in env.workers]
        worker_cpu0 = {pid: tree_cpu(pid) for pid in roots}
        sampler = ProcessCpu(roots)
        sampler.start()
        commands0, calls0 = _redis_counters(redis_url)
        try:
            result = self._launch(env, spec.runs, observe=True)
        finally:
            sampler.stop()
        commands1, calls1 = _redis_counters(redis_url)
        worker_cpu = sum(tree_cpu(pid) - worker_cpu0[pid] for pid in roots)
        # The two INFO calls of the first reading count in the second one.
        commands = commands1 - commands0 - 2
        by_command = {
            name: calls1[name] - calls0.get(name, 0)
            for name in calls1
            if calls1[name] - calls0.get(name, 0) > 0
        }
        waits = [float(w) for w in result.get("queue_waits_s", [])]
        pids = [int(p) for p in result.get("run_pids", [])]
        run_cpu, seen = sampler.total(pids)
        start, end = result.get("start_epoch"), result.get("last_end")
        wall = end - start if (start is not None and end is not None) else result.get("wall_s")
        figures: dict[str, Any] = {
            "success": bool(result.get("success")),
            "succeeded": result.get("succeeded", 0),
            "statuses": result.get("statuses", []),
            "wall_s": wall,
            "poll_wall_s": result.get("wall_s"),
            "launch_s": result.get("launch_s"),
            "throughput_steps_per_s": (steps / wall) if wall else None,
            "queue_waits_n": len(waits),
            "queue_wait_p50_s": percentile(waits, 50),
            "queue_wait_p99_s": percentile(waits, 99),
            "queue_wait_max_s": max(waits) if waits else None,
            "redis_commands": commands,
            "redis_commands_per_step": per_step(commands, steps),
            "redis_commands_by_name": dict(sorted(by_command.items(), key=lambda kv: -kv[1])),
            "run_processes": len(pids),
            "run_processes_sampled": seen,
            "orchestrator_cpu_s": run_cpu if seen else None,
            "orchestrator_cpu_per_step_ms": per_step(run_cpu if seen else None, steps, 1000),
            "worker_cpu_s": worker_cpu,
            "worker_cpu_per_step_ms": per_step(worker_cpu, steps, 1000),
            "launcher_cpu_s": result.get("cpu_s"),
        }
        if "error" in result:
            figures["error"] = result["error"]
        return figures

    def _launch(self, env: BenchEnv, count: int, observe: bool) -> dict[str, Any]:
        setup = env.setups[EXECUTOR]
        request = {
            "shape": self.spec.shape,
            "family": "taskiq",
            "launch": count,
            "timeout": self.spec.timeout,
            "run_config": setup.run_config,
            "observe": observe,
        }
        log_path = setup.home / "orchestrator.log"
        try:
            with open(log_path, "ab") as log:
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.orchestrate", json.dumps(request)],
                    env=env.orchestrator_env(EXECUTOR),
                    cwd=str(REPO_ROOT),
                    stdout=subprocess.PIPE,
                    stderr=log,
                    timeout=self.spec.timeout + 120,
                    check=False,
                )
        except subprocess.TimeoutExpired:
            return {"success": False, "error": f"timed out after {self.spec.timeout + 120:.0f} s"}
        lines = [line for line in done.stdout.decode(errors="replace").splitlines() if line]
        try:
            parsed: dict[str, Any] = json.loads(lines[-1])
        except (IndexError, ValueError):
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            return {"success": False, "error": f"orchestrator exited {done.returncode}: {tail}"}
        return parsed
