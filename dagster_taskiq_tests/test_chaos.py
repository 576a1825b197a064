"""Chaos tier: break a broker or a worker mid-run, then check the task lifecycle guarantees
("Task lifecycle guarantees" in the design) from a ledger of what actually ran.

Every round runs ``chaos_job`` (``fan_0 .. fan_3 -> join``, ``RetryPolicy(max_retries=3)``) in its
own orchestrator process, injects one fault, and then checks, with :mod:`chaos.invariants`:
(i) the run is terminal within a bound, (ii) no two executions of a step overlap, (iii) each step
has exactly one STEP_SUCCESS, (iv) no task record is left unfinished, (v) no forged code ran,
(vi) every key under the prefix has a TTL (except the allowed ones). All violations of all
rounds are collected and printed together.

Short form (CI): one round per test, about 3 minutes of test time in all::

    .venv/bin/python -m pytest dagster_taskiq_tests/test_chaos.py -n 3

Long form: ``CHAOS_ROUNDS=N`` repeats every test's round N times (fault timings vary with
``CHAOS_SEED``, printed at the start of each test)::

    CHAOS_ROUNDS=20 CHAOS_SEED=7 .venv/bin/python -m pytest dagster_taskiq_tests/test_chaos.py -s
"""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from dagster import DagsterInstance, RunsFilter
from dagster._serdes import ConfigurableClassData
from dagster_shared.record import copy as copy_record
from dagster_shared.record import is_record
from taskiq import BrokerMessage, TaskiqMessage

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq.connection import TaskiqConnection
from dagster_taskiq.payloads import STEP_TASK_NAME, decode_step, encode
from dagster_taskiq_tests.chaos import invariants
from dagster_taskiq_tests.chaos import jobs as chaos_jobs
from dagster_taskiq_tests.chaos.ledger import (
    WORKER_ENV,
    DeathWatch,
    Execution,
    append,
    proc_start_ticks,
    read_executions,
)
from dagster_taskiq_tests.chaos.proxy import ChaosProxy
from dagster_taskiq_tests.harness import (
    REPO_ROOT,
    WorkerProcess,
    executor_config,
    isolated_settings,
    run_async,
    wait_for,
)
from dagster_taskiq_tests.private_brokers import PrivateRabbitMQ, PrivateRedis
from dagster_taskiq_tests.services import AMQP_URL, REDIS_URL, require

ROUNDS = max(1, int(os.environ.get("CHAOS_ROUNDS", "1")))
SEED = int(os.environ.get("CHAOS_SEED", str(random.SystemRandom().randrange(1_000_000))))
#: Seconds a run may take to become terminal once the fault has ended.
TERMINAL_BOUND = 90.0
#: Short leases, so that lost tasks are detected within seconds.
HEARTBEAT_TIMEOUT = 5.0
#: redis-py's socket timeout in dagster_taskiq.brokers.factory.
SOCKET_TIMEOUT = 5.0

pytestmark = pytest.mark.timeout(150 * ROUNDS + 150)


# -- harness ---------------------------------------------------------------------------------
class ChaosWorker(WorkerProcess):
    """A real worker process that also gets the chaos environment (its own name, for the
    ledger, and the forged-code marker directory)."""

    def __init__(self, *args: Any, env: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_env = dict(env)
        #: Set when the test stops or kills the worker (any other exit is reported).
        self.ended_by_test = False

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(self.extra_env)
        env[WORKER_ENV] = self.name
        return env

    def kill(self) -> None:
        self.ended_by_test = True
        super().kill()

    def stop(self, timeout: float = 20.0) -> int | None:
        self.ended_by_test = True
        return super().stop(timeout)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Orchestrator:
    """``chaos_job`` orchestrated by its own process (``execute_job``), so that a run that never
    ends can be stopped at teardown."""

    def __init__(self, directory: Path, dagster_home: Path, run_config: Mapping[str, Any]) -> None:
        self.tag = uuid.uuid4().hex[:12]
        self.spec = directory / f"orchestrator-{self.tag}.json"
        self.log_path = directory / f"orchestrator-{self.tag}.log"
        self.spec.write_text(
            json.dumps({"run_config": run_config, "tags": {"chaos/round": self.tag}})
        )
        env = dict(os.environ)
        env["DAGSTER_HOME"] = str(dagster_home)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dagster_taskiq_tests.chaos.jobs", "orchestrate",
                 str(self.spec)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT),
            )  # fmt: skip
        self.run_id = ""

    def wait_run_id(self, instance: DagsterInstance, timeout: float = 60.0) -> str:
        """The id of the run this process created."""

        def _run_id() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"orchestrator exited early:\n{self.log()[-3000:]}")
            runs = instance.get_runs(filters=RunsFilter(tags={"chaos/round": self.tag}))
            return runs[0].run_id if runs else None

        self.run_id = wait_for(_run_id, timeout, interval=0.1, what="the orchestrator's run")
        return self.run_id

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class KeyStore:
    """Raw, synchronous reads of the key store (independent of the key-store API)."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.prefix = prefix
        self.client = redis.Redis.from_url(redis_url, socket_timeout=10)

    def tasks(self) -> dict[str, dict[str, str]]:
        """Task id to its record's fields (without the message)."""
        keys = [k.decode() for k in self.client.scan_iter(match=f"{self.prefix}:task:*")]
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, ["state", "step_key", "run_id", "worker", "queue", "priority"])
            rows = pipe.execute() if keys else []
        names = ("state", "step_key", "run_id", "worker", "queue", "priority")
        return {
            invariants._task_id(key, self.prefix): {
                n: v.decode() for n, v in zip(names, row, strict=True) if v is not None
            }
            for key, row in zip(keys, rows, strict=True)
        }

    def message(self, task_id: str) -> bytes:
        """The message registered for ``task_id``."""
        for key in (f"{self.prefix}:task:{task_id}", f"{self.prefix}:task:{{{task_id}}}"):
            raw = self.client.hget(key, "message")
            if raw:
                return bytes(raw)
        raise AssertionError(f"task {task_id} has no registered message")

    def close(self) -> None:
        self.client.close()


@dataclasses.dataclass
class Round:
    """What one round did, for the report."""

    index: int
    run_id: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    violations: list[str] = dataclasses.field(default_factory=list)


class Chaos:
    """One chaos test: its ledger, workers, orchestrators and rounds."""

    def __init__(
        self,
        tmp_path: Path,
        dagster_home: Path,
        instance: DagsterInstance,
        settings: TaskiqSettings,
        name: str,
    ) -> None:
        self.dir = tmp_path / "chaos"
        self.dir.mkdir()
        self.dagster_home = dagster_home
        self.instance = instance
        self.settings = settings
        self.name = name
        self.ledger = self.dir / "ledger.jsonl"
        self.markers = self.dir / "markers"
        self.markers.mkdir()
        self.watch = DeathWatch(self.ledger).__enter__()
        self.workers: list[ChaosWorker] = []
        self.orchestrators: list[Orchestrator] = []
        self.rounds: list[Round] = []
        self.keystore = KeyStore(settings.backend_url, settings.key_prefix)
        self.rng = random.Random(f"{SEED}-{name}")
        print(f"[chaos] {name}: CHAOS_SEED={SEED} rounds={ROUNDS} dir={self.dir}")

    # -- workers and runs -------------------------------------------------------------------
    def start_workers(
        self,
        count: int,
        *,
        concurrency: int = 2,
        settings: TaskiqSettings | None = None,
        prefix: str = "w",
    ) -> list[ChaosWorker]:
        """Start ``count`` workers at once and wait until all are registered."""
        started = []
        for _ in range(count):
            worker = ChaosWorker(
                settings or self.settings,
                self.dagster_home,
                concurrency=concurrency,
                name=f"{prefix}-{uuid.uuid4().hex[:6]}",
                log_dir=self.dir,
                env={chaos_jobs.MARKERS_ENV: str(self.markers)},
            )
            self.workers.append(worker)
            started.append(worker.start(wait=False))
        for worker in started:
            worker.wait_registered(60)
        return started

    def live_workers(self) -> list[ChaosWorker]:
        return [w for w in self.workers if w.alive]

    def start_run(
        self, *, sleep: float = 1.0, hold: bool = False, settings: TaskiqSettings | None = None
    ) -> Orchestrator:
        """Start ``chaos_job`` in a new orchestrator process; return once the run exists."""
        hold_file = self.hold_file if hold else None
        config = chaos_jobs.run_config(
            executor_config(settings or self.settings),
            ledger=self.ledger,
            sleep=sleep,
            hold_file=hold_file,
        )
        orchestrator = Orchestrator(self.dir, self.dagster_home, config)
        self.orchestrators.append(orchestrator)
        orchestrator.wait_run_id(self.instance)
        return orchestrator

    @property
    def hold_file(self) -> Path:
        """The current round's release file: the held fan steps end once it exists."""
        return self.dir / f"release-{len(self.rounds)}"

    def release(self) -> None:
        self.hold_file.touch()

    def new_round(self) -> Round:
        current = Round(len(self.rounds) + 1)
        self.rounds.append(current)
        return current

    # -- observing --------------------------------------------------------------------------
    def executions(self, run_id: str) -> list[Execution]:
        return [e for e in self.watch.executions() if e.run_id == run_id]

    def wait_executions(
        self,
        run_id: str,
        condition: Callable[[list[Execution]], Any],
        timeout: float,
        what: str,
    ) -> Any:
        return wait_for(
            lambda: condition(self.executions(run_id)), timeout, interval=0.05, what=what
        )

    # -- checking ---------------------------------------------------------------------------
    def check(
        self,
        current: Round,
        *,
        since: float,
        markers: Mapping[str, Path] | None = None,
        allow_no_ttl: Sequence[str] = invariants.DEFAULT_ALLOW_NO_TTL,
    ) -> list[str]:
        """Check every invariant for the round's run; remember and return the violations."""
        run_id = current.run_id
        since_wall = time.time() - (time.monotonic() - since)
        found = invariants.check_all(
            instance=self.instance,
            run_ids=[run_id],
            executions_after_settle=lambda: self.executions(run_id),
            redis_url=self.settings.backend_url,
            prefix=self.settings.key_prefix,
            step_keys=chaos_jobs.STEP_KEYS,
            markers=markers,
            terminal_bound=TERMINAL_BOUND,
            since=since,
            allow_no_ttl=allow_no_ttl,
        )
        for worker in self.workers:
            if not worker.ended_by_test and worker.process is not None and not worker.alive:
                found.append(
                    f"(harness) worker {worker.name} exited by itself with code "
                    f"{worker.process.returncode}"
                )
        executions = self.executions(run_id)
        origin = min((e.start for e in executions), default=0.0)
        current.notes += [f"  {e.step_key}: {e.describe(origin)}" for e in executions]
        current.violations = [f"[round {current.index}] {v}" for v in found]
        self._report(current, executions, since_wall)
        print(f"[chaos] {self.name} round {current.index}, run {run_id}:")
        for note in current.notes:
            print(f"[chaos]   {note}")
        for violation in current.violations:
            print(f"[chaos]   VIOLATION {violation}")
        return current.violations

    def _report(self, current: Round, executions: Sequence[Any], since_wall: float) -> None:
        """Note how long the run took to end after the fault, and append one JSON line to the
        file named by ``CHAOS_REPORT`` (the long form's figures)."""
        record = self.instance.get_run_record_by_id(current.run_id)
        ended = record.end_time if record is not None else None
        recovery = None if ended is None else round(max(0.0, ended - since_wall), 2)
        status = record.dagster_run.status.value if record is not None else "missing"
        current.notes.append(f"run {status}, terminal {recovery} s after the fault ended")
        report = os.environ.get("CHAOS_REPORT")
        if report:
            line = {
                "test": self.name,
                "round": current.index,
                "seed": SEED,
                "status": status,
                "terminal_after_fault_s": recovery,
                "executions": len(executions),
                "violations": len(current.violations),
            }
            with open(report, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")

    def finish_round(self, current: Round) -> None:
        """Stop the round's orchestrator if it is still running (its run is then not terminal
        and has been reported)."""
        for orchestrator in self.orchestrators:
            if orchestrator.run_id == current.run_id:
                orchestrator.stop()

    def violations(self) -> list[str]:
        return [v for r in self.rounds for v in r.violations]

    def assert_no_violations(self) -> None:
        violations = self.violations()
        logs = "\n".join(f"  {p}" for p in sorted(self.dir.glob("*.log")))
        assert violations == [], (
            f"{len(violations)} lifecycle violation(s) (CHAOS_SEED={SEED}):\n"
            + "\n".join(violations)
            + f"\nlogs:\n{logs}"
        )

    def close(self) -> None:
        for orchestrator in self.orchestrators:
            orchestrator.stop()
        running = [w for w in self.workers if w.alive]
        for worker in running:  # SIGTERM all first: they shut down in parallel
            worker.ended_by_test = True
            assert worker.process is not None
            worker.process.terminate()
        deadline = time.monotonic() + 20
        for worker in running:
            assert worker.process is not None
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self.watch.stop()
        self.keystore.close()


def _worker_of(execution: Execution, workers: Sequence[ChaosWorker]) -> ChaosWorker | None:
    return next((w for w in workers if w.name == execution.worker), None)


@pytest.fixture
def redis_settings() -> TaskiqSettings:
    """Redis broker and backend on the shared Redis, isolated prefix, short leases."""
    require(REDIS_URL, "Redis")
    return isolated_settings(
        "redis", REDIS_URL, AMQP_URL, heartbeat_timeout=HEARTBEAT_TIMEOUT, connect_timeout=5
    )


def _chaos(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    dagster_home: Path,
    instance: DagsterInstance,
    settings: TaskiqSettings,
) -> Iterator[Chaos]:
    chaos = Chaos(tmp_path, dagster_home, instance, settings, request.node.name)
    try:
        yield chaos
    finally:
        chaos.close()


@pytest.fixture
def chaos(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    dagster_home: Path,
    instance: DagsterInstance,
    redis_settings: TaskiqSettings,
) -> Iterator[Chaos]:
    """A chaos test on the shared Redis (broker and backend)."""
    yield from _chaos(request, tmp_path, dagster_home, instance, redis_settings)


# -- kill -9 of a worker ---------------------------------------------------------------------
def _kill_at_claim(chaos: Chaos, run_id: str, workers: list[ChaosWorker]) -> tuple[Any, str]:
    """Poll the key store as fast as it answers; kill the first worker seen holding a claimed
    (not yet running) task of the run. If the claim window is missed, kill the first worker seen
    running a task."""
    names = {w.name: w for w in workers}

    def _claimed() -> tuple[ChaosWorker, str, dict[str, str]] | None:
        held = [
            (tid, rec)
            for tid, rec in chaos.keystore.tasks().items()
            if rec.get("run_id") == run_id and rec.get("worker") in names
        ]
        for state in ("claimed", "running"):
            for task_id, record in held:
                if record.get("state") == state:
                    return names[record["worker"]], task_id, record
        return None

    victim, task_id, record = wait_for(_claimed, 60, interval=0.005, what="a claim")
    victim.kill()
    return victim, f"task {task_id} ({record.get('step_key')}) was {record.get('state')}"


def _kill_mid_step(chaos: Chaos, run_id: str, workers: list[ChaosWorker]) -> tuple[Any, str]:
    """Wait for a step to start on one of ``workers`` (ledger), kill that worker."""
    first = chaos.wait_executions(
        run_id,
        lambda ex: next((e for e in ex if _worker_of(e, workers) is not None), None),
        60,
        "a step to start",
    )
    victim = _worker_of(first, workers)
    assert victim is not None
    victim.kill()
    after = time.time() - first.start
    return victim, f"{first.step_key} attempt {first.attempt} had run {after:.2f} s"


@pytest.mark.parametrize("window", ["claim", "step"])
def test_worker_killed(chaos: Chaos, window: str) -> None:
    """``kill -9`` of a worker just after it claims a task, or while its step runs; a second
    worker takes over (claims of the dead worker are released, lost steps retried)."""
    for _ in range(ROUNDS):
        current = chaos.new_round()
        live = chaos.live_workers()
        workers = live + chaos.start_workers(2 - len(live))
        sleep = chaos.rng.uniform(1.0, 3.0) if ROUNDS > 1 else 1.5
        orchestrator = chaos.start_run(sleep=sleep)
        current.run_id = orchestrator.run_id
        kill = _kill_at_claim if window == "claim" else _kill_mid_step
        victim, where = kill(chaos, current.run_id, workers)
        fault_end = time.monotonic()
        current.notes.append(f"killed {victim.name} (kill -9): {where}; op sleep {sleep:.1f} s")
        chaos.check(current, since=fault_end)
        chaos.finish_round(current)
    chaos.assert_no_violations()


# -- Redis paused (SIGSTOP) ------------------------------------------------------------------
@pytest.fixture
def paused_chaos(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    dagster_home: Path,
    instance: DagsterInstance,
    private_redis: PrivateRedis,
) -> Iterator[Chaos]:
    """A chaos test whose broker and backend are a private Redis it may pause."""
    uid = uuid.uuid4().hex[:8]
    settings = TaskiqSettings(
        broker_url=private_redis.url(),
        backend_url=private_redis.url(),
        default_queue=f"chaos-{uid}",
        heartbeat_timeout=HEARTBEAT_TIMEOUT + 1,
        config_source={"key_prefix": f"chaos-{uid}", "result_ttl": 3600, "connect_timeout": 5},
    )
    yield from _chaos(request, tmp_path, dagster_home, instance, settings)


def _pause(
    chaos: Chaos, server: PrivateRedis, seconds: float, workers: Sequence[ChaosWorker]
) -> None:
    """SIGSTOP ``server`` for ``seconds`` (and at least until every worker noticed), SIGCONT."""
    offsets = {w.name: len(w.log()) for w in workers}

    def _noticed(worker: ChaosWorker) -> bool:
        log = worker.log()[offsets[worker.name] :]
        return "Heartbeat failed" in log or "Lost the broker connection" in log

    paused_at = time.monotonic()
    server.pause()
    try:
        wait_for(
            lambda: time.monotonic() - paused_at >= seconds,
            seconds + 5,
            interval=0.1,
            what=f"{seconds:.0f} s of silence",
        )
        wait_for(
            lambda: all(_noticed(w) for w in workers),
            30,
            interval=0.2,
            what="every worker to notice the silence",
        )
    finally:
        server.resume()


@pytest.mark.parametrize("when", ["idle", "running"])
def test_redis_paused(paused_chaos: Chaos, private_redis: PrivateRedis, when: str) -> None:
    """SIGSTOP of the (private) Redis that is broker and key store, for longer than the client
    socket timeout: while the workers are idle (then a run), or while they run steps (longer
    than the lease, too, so every running step's lease lapses during the silence)."""
    chaos = paused_chaos
    workers = chaos.start_workers(2)
    for _ in range(ROUNDS):
        current = chaos.new_round()
        if when == "idle":
            seconds = chaos.rng.uniform(6.0, 10.0) if ROUNDS > 1 else SOCKET_TIMEOUT + 2
            _pause(chaos, private_redis, seconds, workers)
            resumed = time.monotonic()
            orchestrator = chaos.start_run(sleep=1.0)
            current.run_id = orchestrator.run_id
        else:
            seconds = (
                chaos.rng.uniform(6.0, 12.0) if ROUNDS > 1 else chaos.settings.heartbeat_timeout + 2
            )
            orchestrator = chaos.start_run(sleep=0.5, hold=True)
            current.run_id = orchestrator.run_id
            chaos.wait_executions(
                current.run_id,
                lambda ex: len({e.step_key for e in ex}) >= len(chaos_jobs.FAN_STEPS),
                60,
                "every fan step to run",
            )
            _pause(chaos, private_redis, seconds, workers)
            resumed = time.monotonic()
            chaos.release()
        current.notes.append(f"Redis paused {seconds:.1f} s ({when})")
        chaos.check(current, since=resumed)
        chaos.finish_round(current)
    chaos.assert_no_violations()


# -- one worker partitioned from Redis, or stalled -------------------------------------------
def _lone_worker_fault_round(
    chaos: Chaos,
    fault: Callable[[ChaosWorker], None],
    heal: Callable[[ChaosWorker], None],
    what: str,
    settings: TaskiqSettings | None = None,
) -> None:
    """One worker (``settings``: how it reaches the brokers) takes two fan steps, a healthy one
    the others; ``fault`` strikes the first for longer than the lease while its steps run. Its
    steps must stop before their leases can be handed over: the healthy worker's retries never
    overlap them, and no step succeeds twice. The held steps are released while the fault
    lasts, then ``heal``."""
    current = chaos.new_round()
    for worker in chaos.live_workers():
        worker.stop()
    (isolated,) = chaos.start_workers(1, settings=settings, prefix="cut")
    orchestrator = chaos.start_run(sleep=0.5, hold=True)
    current.run_id = run_id = orchestrator.run_id

    def _on(worker: ChaosWorker, count: int) -> Callable[[list[Execution]], Any]:
        return lambda ex: len([e for e in ex if e.worker == worker.name]) >= count

    chaos.wait_executions(run_id, _on(isolated, 2), 60, "two steps on the faulty worker")
    # Started only now, so that the faulty worker holds two of the fan steps.
    (healthy,) = chaos.start_workers(1, concurrency=4, prefix="ok")
    chaos.wait_executions(run_id, _on(healthy, 2), 60, "two steps on the healthy worker")
    held = {e.step_key for e in chaos.executions(run_id) if e.worker == isolated.name}
    fault(isolated)
    cut_at = time.monotonic()

    def _taken_over(ex: list[Execution]) -> bool:
        again = {e.step_key for e in ex if e.worker == healthy.name and e.attempt > 0}
        return held <= again

    try:
        chaos.wait_executions(
            run_id,
            _taken_over,
            chaos.settings.heartbeat_timeout * 2 + 20,
            "the healthy worker to retry the faulty worker's steps",
        )
        current.notes.append(f"retries started {time.monotonic() - cut_at:.1f} s after the fault")
    except AssertionError as exc:
        current.notes.append(f"no takeover during the fault: {exc}")
    chaos.release()
    # Let the faulty worker's own executions end (or be seen dead) before healing.
    try:
        chaos.wait_executions(
            run_id,
            lambda ex: all(e.finished for e in ex if e.worker == isolated.name),
            15,
            "the faulty worker's executions to end",
        )
    except AssertionError as exc:
        current.notes.append(f"faulty worker's executions still open: {exc}")
    # The fault lasts longer than the lease in any case.
    minimum = chaos.settings.heartbeat_timeout + 2
    wait_for(
        lambda: time.monotonic() - cut_at >= minimum,
        minimum + 5,
        interval=0.1,
        what=f"the fault to last {minimum:g} s",
    )
    heal(isolated)
    healed = time.monotonic()
    current.notes.append(
        f"{isolated.name} {what} for {healed - cut_at:.1f} s holding "
        f"{sorted(held)} (heartbeat_timeout {chaos.settings.heartbeat_timeout:g} s)"
    )
    chaos.check(current, since=healed)
    chaos.finish_round(current)


def test_worker_partitioned_from_redis(chaos: Chaos) -> None:
    """One worker reaches Redis through a proxy that is cut (connections dropped, new ones
    blackholed) for longer than heartbeat_timeout while it runs steps; a second worker is
    healthy. The cut-off worker's lease guard stops its steps in time."""
    port = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    with ChaosProxy(port) as proxy:
        proxied = dataclasses.replace(
            chaos.settings, broker_url=proxy.url(), backend_url=proxy.url()
        )
        for _ in range(ROUNDS):
            _lone_worker_fault_round(
                chaos,
                lambda _: proxy.cut(),
                lambda _: proxy.heal(),
                "cut off from Redis",
                settings=proxied,
            )
    chaos.assert_no_violations()


def test_worker_stalled(chaos: Chaos) -> None:
    """SIGSTOP of one worker's own process (not of its step processes) for longer than
    heartbeat_timeout: a worker whose event loop stalls (a long GC pause, a blocked call)
    renews nothing and stops nothing. Its step processes' own watchdogs must stop them before
    their leases lapse and the healthy worker retries them. After SIGCONT the stalled worker
    must carry on (its stale outcomes are refused by their fences)."""

    def _stop(worker: ChaosWorker) -> None:
        os.kill(worker.pid, signal.SIGSTOP)

    def _resume(worker: ChaosWorker) -> None:
        os.kill(worker.pid, signal.SIGCONT)

    for _ in range(ROUNDS):
        _lone_worker_fault_round(chaos, _stop, _resume, "stopped (SIGSTOP)")
        stalled = next(w for w in chaos.workers if w.name.startswith("cut-") and w.alive)
        # Resumed, it beats again: it has not exited and its liveness record is back.
        stalled.wait_registered(30)
    chaos.assert_no_violations()


# -- RabbitMQ restarted mid-run --------------------------------------------------------------
@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    node = PrivateRabbitMQ(tmp_path_factory.mktemp("chaos-rabbit")).start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def rabbit_chaos(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    dagster_home: Path,
    instance: DagsterInstance,
    rabbit: PrivateRabbitMQ,
) -> Iterator[Chaos]:
    """A chaos test with the broker on a private RabbitMQ node, the backend on shared Redis."""
    require(REDIS_URL, "Redis")
    rabbit.ensure_running()
    settings = isolated_settings(
        "rabbitmq", REDIS_URL, rabbit.url(), heartbeat_timeout=HEARTBEAT_TIMEOUT, connect_timeout=5
    )
    yield from _chaos(request, tmp_path, dagster_home, instance, settings)


def test_rabbitmq_restarted_mid_run(rabbit_chaos: Chaos, rabbit: PrivateRabbitMQ) -> None:
    """The RabbitMQ node restarts while two fan steps run and two wait in the queue."""
    chaos = rabbit_chaos
    chaos.start_workers(2, concurrency=1)
    for _ in range(ROUNDS):
        current = chaos.new_round()
        sleep = chaos.rng.uniform(1.0, 3.0) if ROUNDS > 1 else 2.0
        orchestrator = chaos.start_run(sleep=sleep)
        current.run_id = orchestrator.run_id
        chaos.wait_executions(current.run_id, lambda ex: len(ex) >= 2, 60, "two steps to run")
        started = time.monotonic()
        rabbit.restart()
        restarted = time.monotonic()
        current.notes.append(
            f"RabbitMQ restarted in {restarted - started:.1f} s; op sleep {sleep:.1f} s"
        )
        chaos.check(current, since=restarted)
        chaos.finish_round(current)
    chaos.assert_no_violations()


# -- forged messages -------------------------------------------------------------------------
def _replaced(value: Any, **changes: Any) -> Any:
    """``value`` with ``changes``, for Dagster's named tuples and ``@record`` classes alike."""
    return copy_record(value, **changes) if is_record(value) else value._replace(**changes)


def _forge(
    chaos: Chaos, variant: str, task_id: str, registered: bytes, marker: Path
) -> BrokerMessage:
    """A message for ``task_id`` (a queued task of a real run) whose code differs from what was
    registered, built with the connection's own formatter."""

    async def _build(conn: TaskiqConnection) -> BrokerMessage:
        real: TaskiqMessage = conn.broker.formatter.loads(registered)
        queue = str(real.labels["queue_name"])
        priority = int(real.labels.get("priority") or 0) + 1  # taken before the real one
        if variant == "task_name":
            return conn.build_message(
                task_id=task_id,
                task_name=f"{chaos_jobs.__name__}:forged_task",
                payload=str(marker),
                queue=queue,
                priority=priority,
            )
        payload = decode_step(real.args[0], task_id)
        args = payload.execute_step_args
        if variant == "job_origin":
            origin = args.job_origin
            repository = origin.repository_origin
            pointer = _replaced(repository.code_pointer, fn_name="forged_job_factory")
            args = _replaced(
                args,
                job_origin=_replaced(
                    origin, repository_origin=_replaced(repository, code_pointer=pointer)
                ),
            )
        else:  # instance_ref
            ref = args.instance_ref
            assert ref is not None
            base_dir = yaml.safe_load(ref.local_artifact_storage_data.config_yaml)["base_dir"]
            storage = ConfigurableClassData(
                module_name=chaos_jobs.__name__,
                class_name="MarkerArtifactStorage",
                config_yaml=yaml.safe_dump({"base_dir": base_dir, "marker": str(marker)}),
            )
            args = _replaced(args, instance_ref=_replaced(ref, local_artifact_storage_data=storage))
        return conn.build_message(
            task_id=task_id,
            task_name=STEP_TASK_NAME,
            payload=encode(_replaced(payload, execute_step_args=args)),
            queue=queue,
            priority=priority,
        )

    return run_async(chaos.settings, _build)


FORGERIES = ("task_name", "job_origin", "instance_ref")


def _forged_round(chaos: Chaos) -> None:
    current = chaos.new_round()
    for worker in chaos.live_workers():
        worker.stop()
    orchestrator = chaos.start_run(sleep=0.5)
    current.run_id = run_id = orchestrator.run_id

    def _queued() -> dict[str, str] | None:
        queued = {
            rec.get("step_key", ""): tid
            for tid, rec in chaos.keystore.tasks().items()
            if rec.get("run_id") == run_id and rec.get("state") == "queued"
        }
        return queued if set(chaos_jobs.FAN_STEPS) <= set(queued) else None

    queued = wait_for(_queued, 60, interval=0.1, what="the fan steps to be queued")
    steps = chaos.rng.sample(chaos_jobs.FAN_STEPS, len(FORGERIES))
    markers = {}
    for variant, step_key in zip(FORGERIES, steps, strict=True):
        task_id = queued[step_key]
        # (forged_job_factory writes forged-job_origin.marker under the workers' markers dir)
        marker = chaos.markers / f"forged-{variant}.marker"
        forged = _forge(chaos, variant, task_id, chaos.keystore.message(task_id), marker)
        run_async(chaos.settings, lambda c, m=forged: c.broker.kick(m))
        markers[f"{variant} forgery of {step_key}"] = marker
        current.notes.append(f"forged a {variant} message for {step_key} (task {task_id})")
    chaos.start_workers(1, concurrency=1)
    chaos.check(current, since=time.monotonic(), markers=markers)
    chaos.finish_round(current)


def test_forged_messages_never_run(chaos: Chaos) -> None:
    """Three messages reuse the task ids of three queued steps of a real run but name other
    code: another task function (``task_name``), a job origin whose loading runs code
    (``job_origin``), and an instance whose storage class is the forger's (``instance_ref``).
    They are pushed ahead of the real messages. No forged code may ever run (each would create
    its own marker file); the real steps run once each."""
    for _ in range(ROUNDS):
        _forged_round(chaos)
    chaos.assert_no_violations()


# -- the checks themselves -------------------------------------------------------------------
def test_invariant_checks_catch_violations(tmp_path: Path, instance: DagsterInstance) -> None:
    """Each check reports a planted violation (so a passing chaos test is not vacuous), and
    the death watch turns a killed process into an execution end."""
    require(REDIS_URL, "Redis")
    ledger_path = tmp_path / "ledger.jsonl"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        base = {"ev": "start", "run_id": "r", "step_key": "s", "host": "h", "ppid": 1}
        append(ledger_path, {**base, "exec": "a", "attempt": 0, "pid": 1, "t": 100.0})
        append(ledger_path, {"ev": "end", "exec": "a", "outcome": "returned", "t": 110.0})
        append(ledger_path, {**base, "exec": "b", "attempt": 1, "pid": 2, "t": 105.0})
        append(ledger_path, {"ev": "end", "exec": "b", "outcome": "returned", "t": 106.0})
        start = {**base, "step_key": "t", "attempt": 0, "pid": victim.pid, "t": time.time()}
        append(ledger_path, {**start, "exec": "c", "proc_start": proc_start_ticks(victim.pid)})
        with DeathWatch(ledger_path) as watch:
            wait_for(lambda: not watch.poll() and "c" in watch._open, 5, what="the watch")
            victim.kill()
            victim.wait()
            wait_for(lambda: "c" in watch.deaths, 5, what="the death to be seen")
            executions = {e.exec_id: e for e in watch.executions()}
    finally:
        victim.kill()
        victim.wait()
    assert executions["c"].outcome == "died" and executions["c"].finished
    assert not {e.exec_id: e for e in read_executions(ledger_path)}["c"].finished
    overlaps = invariants.check_no_overlap(list(executions.values()))
    assert len(overlaps) == 1 and "step s" in overlaps[0] and "by 1.00 s" in overlaps[0]

    prefix = f"dt-test-selfcheck-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.hset(f"{prefix}:task:{{t1}}", mapping={"state": "running", "step_key": "s"})
        client.hset(f"{prefix}:task:t2", mapping={"state": "done"})
        client.expire(f"{prefix}:task:t2", 60)
        client.zadd(f"{prefix}:idx:inflight", {"t1": 1.0})
        client.set(f"{prefix}:leaked", "1")
        client.lpush(f"{prefix}:dead_letters", "x")
        unfinished = invariants.check_task_records(REDIS_URL, prefix, settle=0)
        assert len(unfinished) == 2, unfinished
        assert "task t1 (step s of run ?) is left running" in unfinished[0], unfinished
        ttls = invariants.check_ttls(REDIS_URL, prefix)
        assert sorted(v.split()[2] for v in ttls) == sorted(
            f"{prefix}:{k}" for k in ("task:{t1}", "idx:inflight", "leaked")
        ), ttls
    finally:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        client.close()

    marker = tmp_path / "forged.marker"
    assert invariants.check_markers({"x": marker}) == []
    marker.write_text("ran\n")
    assert len(invariants.check_markers({"x": marker})) == 1
    missing = "00000000-0000-0000-0000-000000000000"
    assert invariants.check_runs_terminal(instance, [missing], bound=0) == [
        f"(i) run {missing} is not terminal within 0 s (it is missing)"
    ]
    assert len(invariants.check_one_success(instance, [missing], ["a", "b"])) == 2
