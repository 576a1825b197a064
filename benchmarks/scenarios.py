"""The benchmark scenarios, the modes that select them, and the targets they are judged by."""

import dataclasses
from collections.abc import Mapping

from benchmarks.lanes import LANES_EXECUTORS
from benchmarks.shapes import step_count

TASKIQ = ("taskiq_redis", "taskiq_rabbitmq")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One thing to measure on each applicable executor."""

    name: str
    shape: str
    description: str
    #: "execute": one run through ``execute_job``; "launch": many runs through the run launcher.
    kind: str = "execute"
    #: For "launch": how many runs, and which executor family the runs themselves use.
    launch_count: int = 0
    run_family: str = "in_process"
    #: For "launch": also run the same ``launch_count`` runs one after another inside one
    #: orchestrator process on the in-process executor (the baseline of the runs_50 target).
    sequential_baseline: bool = False
    #: Executors this scenario applies to (empty: all).
    only: tuple[str, ...] = ()
    #: Executors skipped by default, with the reason (``--no-skip`` runs them anyway).
    skip: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Whether an unmeasured warm-up round comes first (imports job code in the workers).
    warmup: bool = True
    #: At most this many measured rounds, whatever ``--rounds`` says (0: no cap).
    max_rounds: int = 0
    timeout: float = 600.0

    @property
    def steps(self) -> int:
        """Steps per run (for launch scenarios: all steps of all runs)."""
        per_run = step_count(self.shape)
        return per_run * self.launch_count if self.kind == "launch" else per_run

    def applies_to(self, executor: str, no_skip: bool = False) -> bool:
        """Whether this scenario runs on ``executor`` (a ``*_metrics`` variant like its base)."""
        executor = executor.removesuffix("_metrics")
        if self.sequential_baseline and executor == "in_process":
            return True
        if self.only and executor not in self.only:
            return False
        return no_skip or executor not in self.skip


def _runs(count: int) -> Scenario:
    return Scenario(
        f"runs_{count}",
        "tiny",
        f"{count} two-op runs (in-process executor inside each) launched at once through "
        "TaskiqRunLauncher, timed from the first launch until all have finished; on in_process, "
        f"the same {count} runs one after another in one process",
        kind="launch",
        launch_count=count,
        only=TASKIQ,
        sequential_baseline=True,
        timeout=600.0,
    )


_SLOW_MULTIPROCESS = (
    "multiprocess_executor starts a new interpreter per step (~0.65 s/step in the baseline): "
    "{} min per run"
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("chain_20", "chain_20", "20 ops in a strict chain, each passing a small value"),
        Scenario("fanout_10", "fanout_10", "root -> 10 independent ops -> collect (12 steps)"),
        Scenario("fanout_100", "fanout_100", "root -> 100 independent ops -> collect (102 steps)"),
        Scenario(
            "fanout_500",
            "fanout_500",
            "root -> 500 independent ops -> collect (502 steps)",
            skip={"multiprocess": _SLOW_MULTIPROCESS.format("about 5.5")},
            warmup=False,
            max_rounds=2,
            timeout=1200.0,
        ),
        Scenario("sleepy", "sleepy", "8 independent ops that each sleep 1 s"),
        _runs(50),
        Scenario(
            "fanout_1000",
            "fanout_1000",
            "root -> 1,000 independent ops -> collect: the orchestrator's cost per step",
            only=TASKIQ,
            warmup=False,
            max_rounds=2,
            timeout=1800.0,
        ),
        # The smoke mode's tiny sizes: every row of the targets table, in seconds.
        Scenario("chain_3", "chain_3", "3 ops in a strict chain (smoke)"),
        Scenario("fanout_5", "fanout_5", "root -> 5 independent ops -> collect (smoke)"),
        Scenario("sleepy_2", "sleepy_2", "2 independent ops that each sleep 1 s (smoke)"),
        _runs(3),
        Scenario(
            "fanout_20",
            "fanout_20",
            "root -> 20 independent ops -> collect: orchestrator cost per step (smoke)",
            only=TASKIQ,
            warmup=False,
        ),
    )
}

@dataclasses.dataclass(frozen=True)
class Mode:
    """What ``python -m benchmarks run <mode>`` runs unless options say otherwise."""

    rounds: int
    scenarios: tuple[str, ...]
    #: Dagster storages, each a session of its own, one after the other, into one file.
    storages: tuple[str, ...] = ("sqlite",)
    #: Rounds of the cold-start probe (fresh worker, import baseline, first step, idle PSS).
    probe_rounds: int = 0
    #: Default executors (empty: all).
    executors: tuple[str, ...] = ()
    #: Whether the unmeasured warm-up round runs by default.
    warmup: bool = True


#: The executors the targets table needs, and the two it is compared with in the README.
TARGET_EXECUTORS = ("taskiq_redis", "taskiq_rabbitmq", "in_process", "celery_redis")

MODES: dict[str, Mode] = {
    "quick": Mode(1, ("chain_20", "fanout_10", "fanout_100", "sleepy", "runs_50")),
    "full": Mode(
        3,
        (
            "chain_20",
            "fanout_10",
            "fanout_100",
            "fanout_500",
            "sleepy",
            "runs_50",
            "fanout_1000",
        ),
    ),
    "targets": Mode(
        3,
        ("chain_20", "fanout_100", "sleepy", "runs_50", "fanout_1000"),
        storages=("sqlite", "postgres"),
        probe_rounds=3,
        executors=TARGET_EXECUTORS,
    ),
    "smoke": Mode(
        1,
        ("chain_3", "fanout_5", "sleepy_2", "runs_3", "fanout_20"),
        probe_rounds=1,
        executors=("taskiq_redis", "in_process"),
        warmup=False,
    ),
    # The cost of RabbitMQ priority lanes: classic queues against quorum queues with 1, 3 and 5
    # lanes, side by side, plus the broker-side counters (benchmarks.lanes).
    "lanes": Mode(3, ("chain_20", "fanout_100"), executors=LANES_EXECUTORS),
}

#: Per-hop target for chain_20 (seconds), fan-out ratios, and the sleepy slack over the ideal.
CHAIN_HOP_TARGET_S = 0.25
FANOUT_VS_CELERY_TARGET = 0.5
FANOUT_VS_IN_PROCESS_TARGET = 1.5
SLEEPY_SLACK = 1.15
