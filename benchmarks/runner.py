"""Run scenarios on executors in interleaved rounds and write JSON lines.

Within each scenario, round ``r`` runs every executor once, in the same order (A B C … A B C …),
so drift of a shared, noisy machine hits all executors alike. Each run is its own orchestrator
process (see :mod:`benchmarks.orchestrate`); workers stay up for the whole session.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, TextIO

from benchmarks.coldstart import ColdStartProbe
from benchmarks.env import EXECUTORS, REPO_ROOT, BenchEnv
from benchmarks.measure import Sampler, tree_cpu
from benchmarks.report import summarize
from benchmarks.scenarios import Scenario

VERSIONED = (
    "dagster",
    "dagster-taskiq",
    "taskiq",
    "taskiq-redis",
    "taskiq-aio-pika",
    "redis",
    "aio-pika",
    "dagster-celery",
    "celery",
    "kombu",
)


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _server_versions(env: BenchEnv) -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        import redis

        client = redis.Redis.from_url(env.redis_url)
        found["redis-server"] = str(client.info("server").get("redis_version"))
        client.close()
    except Exception:
        pass
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout:
            found["rabbitmq-server"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0.0
    try:
        pretty = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        pretty = ""
    return {
        "host": platform.node(),
        "os": pretty or platform.platform(),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
    }


class RunProbe(Protocol):
    """Something measured around every run and once after the scenarios (``run lanes``'s
    broker counters, :class:`benchmarks.lanes.BrokerProbe`)."""

    def before(self, executor: str) -> Any:
        """Called just before a run of ``executor``; what it returns goes to :meth:`after`."""

    def after(self, executor: str, token: Any) -> dict[str, Any]:
        """Called just after the run; the fields are added to the run's record."""

    def session_records(self) -> list[dict[str, Any]]:
        """Called once after the scenarios, while the workers are still up; records to write."""


class Session:
    """One benchmark session: environment, sampler and the JSON lines output."""

    def __init__(
        self,
        env: BenchEnv,
        scenarios: Sequence[Scenario],
        rounds: int,
        out: TextIO,
        *,
        mode: str,
        no_skip: bool = False,
        warmup: bool = True,
        probe_rounds: int = 0,
        log: Callable[[str], None] = print,
        run_probe: Callable[[BenchEnv], RunProbe] | None = None,
    ) -> None:
        self.env = env
        #: Made once the environment is up (it may need the workers' names and queues).
        self.make_run_probe = run_probe
        self.run_probe: RunProbe | None = None
        self.scenarios = list(scenarios)
        self.rounds = rounds
        self.out = out
        self.mode = mode
        self.no_skip = no_skip
        self.warmup = warmup
        self.probe_rounds = probe_rounds
        self.log = log
        self.records: list[dict[str, Any]] = []
        self.sampler: Sampler | None = None

    def emit(self, record: dict[str, Any]) -> None:
        """Write one JSON line (and keep it for the summary)."""
        record = {"session": self.env.uid, "storage": self.env.storage, **record}
        self.records.append(record)
        self.out.write(json.dumps(record, sort_keys=True) + "\n")
        self.out.flush()

    def run(self) -> list[dict[str, Any]]:
        """Start everything, run every scenario, write summaries; return all records."""
        started = time.monotonic()
        self.log(f"Starting brokers and workers in {self.env.root} …")
        try:
            self.env.start()
            self.emit(self._meta(time.monotonic() - started))
            for note in self.env.broker_notes:
                self.log(note)
            for name, reason in self.env.skipped.items():
                self.log(f"Skipping executor {name}: {reason}")
            self.sampler = Sampler({w.name: (w.pid, w.executor) for w in self.env.workers})
            self.sampler.start()
            if self.make_run_probe is not None:
                self.run_probe = self.make_run_probe(self.env)
            for scenario in self.scenarios:
                self._run_scenario(scenario)
            if self.run_probe is not None:
                for record in self.run_probe.session_records():
                    self.emit(record)
            self.sampler.stop()
            for stats in self.sampler.snapshot():
                ready = next(w for w in self.env.workers if w.name == stats.worker).ready_after_s
                self.emit(
                    {
                        "type": "worker_memory",
                        **{k: v for k, v in vars(stats).items()},
                        "ready_after_s": ready,
                    }
                )
            ColdStartProbe(self.env, self._run_once, self.emit, log=self.log).run(
                self.probe_rounds
            )
        finally:
            try:
                if self.sampler is not None:
                    self.sampler.stop()
            finally:
                self.env.stop()
        for record in summarize(self.records):
            self.emit(record)
        return self.records

    def _meta(self, startup_s: float) -> dict[str, Any]:
        return {
            "type": "meta",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": self.mode,
            "rounds": self.rounds,
            "probe_rounds": self.probe_rounds,
            "machine": machine(),
            "versions": {**versions(), **_server_versions(self.env)},
            "git_commit": _git_commit(),
            "executors": {name: EXECUTORS[name].label for name in self.env.setups},
            "skipped_executors": self.env.skipped,
            "scenarios": [s.name for s in self.scenarios],
            "workers_per_executor": self.env.worker_count,
            "slots_per_worker": self.env.concurrency,
            "poll_interval": self.env.poll_interval,
            "startup_s": round(startup_s, 2),
            "storage": (
                "postgres (a fresh database per executor)"
                if self.env.storage == "postgres"
                else "sqlite (default DagsterInstance in a temporary DAGSTER_HOME per executor)"
            ),
        }

    def _run_scenario(self, scenario: Scenario) -> None:
        executors = [name for name in self.env.setups if scenario.applies_to(name, self.no_skip)]
        for name in self.env.setups:
            if name not in executors and (not scenario.only or name in scenario.only):
                self.emit(
                    {
                        "type": "skip",
                        "scenario": scenario.name,
                        "executor": name,
                        "reason": scenario.skip.get(name, "not applicable"),
                    }
                )
        if not executors:
            return
        rounds = self.rounds if not scenario.max_rounds else min(self.rounds, scenario.max_rounds)
        plan = ([0] if (self.warmup and scenario.warmup) else []) + list(range(1, rounds + 1))
        for round_no in plan:
            for name in executors:
                if round_no == 0 and self.env.setups[name].spec.workers is None:
                    continue  # each run is a fresh process: nothing to warm up
                record = self._run_once(scenario, name, round_no)
                self.emit(record)
                status = "ok" if record.get("success") else f"FAILED {record.get('error', '')}"
                self.log(
                    f"{scenario.name:<12} {name:<16} "
                    f"{'warm-up' if round_no == 0 else f'round {round_no}':<8} "
                    f"{record.get('wall_s', float('nan')):8.2f} s  {status}"
                )

    def _run_once(
        self,
        scenario: Scenario,
        name: str,
        round_no: int,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        setup = self.env.setups[name]
        request: dict[str, Any] = {"shape": scenario.shape, "timeout": scenario.timeout}
        if scenario.kind == "launch" and setup.spec.workers is None:
            # The in-process baseline: the same runs one after another in one process.
            request.update(
                family=setup.spec.family, run_config=setup.run_config, repeat=scenario.launch_count
            )
        elif scenario.kind == "launch":
            request.update(family=scenario.run_family, launch=scenario.launch_count)
        else:
            request.update(family=setup.spec.family, run_config=setup.run_config)
        request.update(extra or {})
        workers = setup.workers
        cpu_before = {w.name: tree_cpu(w.pid) for w in workers}
        log_path = setup.home / "orchestrator.log"
        record: dict[str, Any] = {
            "type": "run",
            "scenario": scenario.name,
            "executor": name,
            "round": round_no,
            "warmup": round_no == 0,
            "steps": scenario.steps,
        }
        if self.sampler is not None:
            self.sampler.busy = name
        token = self.run_probe.before(name) if self.run_probe is not None else None
        try:
            with open(log_path, "ab") as log:
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.orchestrate", json.dumps(request)],
                    env=self.env.orchestrator_env(name),
                    cwd=str(REPO_ROOT),
                    stdout=subprocess.PIPE,
                    stderr=log,
                    timeout=scenario.timeout + 60,
                    check=False,
                )
        except subprocess.TimeoutExpired:
            record.update(success=False, error=f"timed out after {scenario.timeout + 60:.0f} s")
            return record
        finally:
            if self.sampler is not None:
                self.sampler.busy = None
                self.sampler.warm.add(name)
        record["worker_cpu_s"] = round(
            sum(tree_cpu(w.pid) - cpu_before[w.name] for w in workers), 3
        )
        if self.run_probe is not None:
            record.update(self.run_probe.after(name, token))
        lines = [line for line in done.stdout.decode(errors="replace").splitlines() if line]
        try:
            result = json.loads(lines[-1])
        except (IndexError, ValueError):
            record.update(
                success=False,
                error=f"orchestrator exited {done.returncode}; see {log_path}",
            )
            return record
        record.update(result)
        steps = scenario.steps
        record["per_step_s"] = record["wall_s"] / steps
        record["cpu_per_step_ms"] = 1000 * record["cpu_s"] / steps
        record["peak_growth_mib"] = record["peak_rss_mib"] - record["rss_before_mib"]
        return record
