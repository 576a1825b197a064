"""The performance-round-2 targets table: every target as a ratio, fastest and median.

:func:`target_rows` turns the raw records of one storage (``meta``, ``run``, ``cold_start``)
into ``target_row`` records, one per taskiq executor and target. Every timed figure is given
twice: fastest against fastest and median against median over the interleaved rounds. A target
is met when both are within its limit; a row without data says so (``met`` is None).

The scenarios are found by name, so the same code judges the full sizes (``chain_20``,
``fanout_100``, ``sleepy``, ``runs_50``, ``fanout_1000``) and the smoke mode's tiny ones
(``chain_3``, ``fanout_5``, ``sleepy_2``, ``runs_3``, ``fanout_20``).
"""

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.lanes import lanes_of
from benchmarks.shapes import sleep_count

IN_PROCESS = "in_process"
#: The sizes the issue names; other sizes (the smoke mode's) stand in when these are absent.
PREFERRED = {"chain": "chain_20", "fanout": "fanout_100", "runs": "runs_50"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One row of the table: what is measured, its unit and its limit."""

    key: str
    label: str
    limit: float
    unit: str  # "x" (a ratio), "ms" or "MiB"


TARGETS: tuple[Target, ...] = (
    Target("chain_hop", "{chain} per hop ÷ in-process per hop", 1.2, "x"),
    Target("fanout", "{fanout} wall ÷ in-process wall", 0.8, "x"),
    Target("sleepy", "{sleepy} wall ÷ ideal {ideal:g} s", 1.10, "x"),
    Target("runs", "{runs} via the launcher ÷ the same runs in-process, in a row", 1.0, "x"),
    Target("worker_ready", "worker ready ÷ python -c 'import dagster; import jobs'", 1.3, "x"),
    Target("first_step", "first step on a fresh worker ÷ a later step", 1.1, "x"),
    Target("orch_cpu", "orchestrator CPU per step at {wide} steps", 8.0, "ms"),
    Target("orch_cpu_flat", "orchestrator CPU per step, {wide} ÷ {narrow} steps (flat)", 1.2, "x"),
    Target("worker_pss", "worker PSS with one idle child", 130.0, "MiB"),
)
TARGET_KEYS = tuple(t.key for t in TARGETS)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _fastest(values: Sequence[float]) -> float | None:
    return min(values) if values else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if (a is not None and b) else None


def _size(name: str) -> int:
    try:
        return int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return 0


@dataclasses.dataclass
class _Figures:
    """The raw figures of one row, before they become a record."""

    fastest: float | None = None
    median: float | None = None
    fastest_detail: str = ""
    median_detail: str = ""
    names: dict[str, Any] = dataclasses.field(default_factory=dict)
    n: int = 0


class _Index:
    """Measured, successful runs and cold-start probes of one storage, by scenario/executor."""

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        self.meta = next((r for r in records if r.get("type") == "meta"), {})
        self.walls: dict[tuple[str, str], list[float]] = {}
        self.cpu_per_step: dict[tuple[str, str], list[float]] = {}
        self.steps: dict[str, int] = {}
        for run in records:
            if run.get("type") != "run" or run.get("warmup") or not run.get("success"):
                continue
            key = (run["scenario"], run["executor"])
            self.walls.setdefault(key, []).append(run["wall_s"])
            self.cpu_per_step.setdefault(key, []).append(1000 * run["cpu_s"] / run["steps"])
            self.steps[run["scenario"]] = run["steps"]
        self.cold = [r for r in records if r.get("type") == "cold_start" and r.get("success")]

    def scenarios(self, prefix: str, executor: str, with_baseline: bool) -> list[str]:
        """Scenarios named ``<prefix>_…`` (or ``prefix``) run on ``executor``, smallest first."""
        found = {
            s
            for s, e in self.walls
            if e == executor
            and (s == prefix or s.startswith(prefix + "_"))
            and (not with_baseline or (s, IN_PROCESS) in self.walls)
        }
        return sorted(found, key=lambda s: (_size(s), s))

    def pick(self, prefix: str, executor: str, with_baseline: bool = True) -> str | None:
        """The issue's size of ``prefix`` if it was run, else the largest one run."""
        found = self.scenarios(prefix, executor, with_baseline)
        if not found:
            return None
        return PREFERRED[prefix] if PREFERRED.get(prefix) in found else found[-1]

    def slots(self) -> int:
        """Step slots per executor in this session."""
        workers = int(self.meta.get("workers_per_executor", 2))
        return max(1, workers * int(self.meta.get("slots_per_worker", 1)))

    def cold_of(self, executor: str) -> list[dict[str, Any]]:
        """Successful cold-start probes of ``executor``."""
        return [r for r in self.cold if r["executor"] == executor]


def _versus(
    mine: Sequence[float], base: Sequence[float], scale: float = 1.0, unit: str = "s"
) -> _Figures:
    """Fastest ÷ fastest and median ÷ median, with the figures behind them."""
    fig = _Figures(n=min(len(mine), len(base)))
    fm, fb = _fastest(mine), _fastest(base)
    mm, mb = _median(mine), _median(base)
    fig.fastest, fig.median = _div(fm, fb), _div(mm, mb)
    if fm is not None and fb is not None:
        fig.fastest_detail = _pair(fm * scale, fb * scale, unit)
    if mm is not None and mb is not None:
        fig.median_detail = _pair(mm * scale, mb * scale, unit)
    return fig


def _pair(a: float, b: float, unit: str) -> str:
    spec = ".0f" if unit in ("ms", "MiB") else ".2f"
    return f"{a:{spec}} ÷ {b:{spec}} {unit}"


def _chain(index: _Index, executor: str) -> _Figures:
    name = index.pick("chain", executor)
    if name is None:
        return _Figures()
    steps = index.steps[name]
    fig = _versus(
        index.walls[(name, executor)], index.walls[(name, IN_PROCESS)], 1000 / steps, "ms"
    )
    fig.names["chain"] = name
    return fig


def _fanout(index: _Index, executor: str) -> _Figures:
    name = index.pick("fanout", executor)
    if name is None:
        return _Figures()
    fig = _versus(index.walls[(name, executor)], index.walls[(name, IN_PROCESS)])
    fig.names["fanout"] = name
    return fig


def _sleepy(index: _Index, executor: str) -> _Figures:
    found = index.scenarios("sleepy", executor, with_baseline=False)
    if not found:
        return _Figures()
    name = found[-1]
    ideal = sleep_count(name) / index.slots()
    walls = index.walls[(name, executor)]
    fig = _versus(walls, [ideal] * len(walls))
    fig.names.update(sleepy=name, ideal=ideal)
    return fig


def _runs(index: _Index, executor: str) -> _Figures:
    name = index.pick("runs", executor)
    if name is None:
        return _Figures()
    fig = _versus(index.walls[(name, executor)], index.walls[(name, IN_PROCESS)])
    fig.names["runs"] = name
    return fig


def _ready(index: _Index, executor: str) -> _Figures:
    cold = index.cold_of(executor)
    return _versus([r["ready_s"] for r in cold], [r["import_s"] for r in cold])


def _first_step(index: _Index, executor: str) -> _Figures:
    cold = [r for r in index.cold_of(executor) if r.get("later_step_s")]
    return _versus(
        [r["first_step_s"] for r in cold], [r["later_step_s"] for r in cold], 1000, "ms"
    )


def _wide(index: _Index, executor: str) -> list[str]:
    return index.scenarios("fanout", executor, with_baseline=False)


def _orch_cpu(index: _Index, executor: str) -> _Figures:
    found = _wide(index, executor)
    if not found:
        return _Figures()
    name = found[-1]
    values = index.cpu_per_step[(name, executor)]
    fig = _Figures(fastest=_fastest(values), median=_median(values), n=len(values))
    fig.names["wide"] = f"{index.steps[name]:,}"
    return fig


def _orch_flat(index: _Index, executor: str) -> _Figures:
    found = _wide(index, executor)
    if len(found) < 2:
        return _Figures()
    narrow, wide = found[0], found[-1]
    if PREFERRED["fanout"] in found[:-1]:
        narrow = PREFERRED["fanout"]
    fig = _versus(
        index.cpu_per_step[(wide, executor)], index.cpu_per_step[(narrow, executor)], 1, "ms"
    )
    fig.names.update(wide=f"{index.steps[wide]:,}", narrow=f"{index.steps[narrow]:,}")
    return fig


def one_child_pss(probe: dict[str, Any]) -> float | None:
    """A worker's tree PSS with one child: idle, if it keeps one; else with a sleeping step."""
    if probe.get("idle_processes", 0) >= 2:
        return float(probe["idle_tree_pss_mib"])
    busy = probe.get("busy_child_pss_mib")
    return float(busy) if busy else None


def _pss(index: _Index, executor: str) -> _Figures:
    cold = index.cold_of(executor)
    values = [v for v in (one_child_pss(r) for r in cold) if v is not None]
    fig = _Figures(fastest=_fastest(values), median=_median(values), n=len(values))
    if cold:
        idle_child = all(r.get("idle_processes", 0) >= 2 for r in cold)
        fig.median_detail = "idle child" if idle_child else "no idle child: with a sleeping step"
    return fig


_MEASURES: dict[str, Callable[[_Index, str], _Figures]] = {
    "chain_hop": _chain,
    "fanout": _fanout,
    "sleepy": _sleepy,
    "runs": _runs,
    "worker_ready": _ready,
    "first_step": _first_step,
    "orch_cpu": _orch_cpu,
    "orch_cpu_flat": _orch_flat,
    "worker_pss": _pss,
}

_DEFAULT_NAMES = {
    "chain": "chain",
    "fanout": "fanout",
    "sleepy": "sleepy",
    "ideal": 0.0,
    "runs": "runs",
    "wide": "the widest fan-out's",
    "narrow": "the narrowest fan-out's",
}


def _executors(records: Sequence[dict[str, Any]]) -> list[str]:
    found: list[str] = []
    meta = next((r for r in records if r.get("type") == "meta"), {})
    candidates = list(meta.get("executors", {})) + [
        str(r.get("executor")) for r in records if r.get("type") in ("run", "cold_start")
    ]
    for name in candidates:
        if (
            name.startswith("taskiq_")
            and not name.endswith("_metrics")
            and not lanes_of(name)  # the quorum variants have a table of their own
            and name not in found
        ):
            found.append(name)
    order = ("taskiq_redis", "taskiq_rabbitmq")
    return sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n))


def target_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets table of one storage's raw records: one row per taskiq executor and target."""
    index = _Index(records)
    rows: list[dict[str, Any]] = []
    for executor in _executors(records):
        for target in TARGETS:
            fig = _MEASURES[target.key](index, executor)
            names = {**_DEFAULT_NAMES, **fig.names}
            values = [v for v in (fig.fastest, fig.median) if v is not None]
            met = all(v <= target.limit for v in values) if values else None
            rows.append(
                {
                    "type": "target_row",
                    "executor": executor,
                    "target": target.key,
                    "label": target.label.format(**names),
                    "unit": target.unit,
                    "fastest": fig.fastest,
                    "median": fig.median,
                    "fastest_detail": fig.fastest_detail,
                    "median_detail": fig.median_detail,
                    "limit": target.limit,
                    "met": met,
                    "n": fig.n,
                }
            )
    return rows


# -- printing ----------------------------------------------------------------------------------
def format_value(value: float | None, unit: str) -> str:
    """``1.23×``, ``7.9 ms`` or ``128 MiB``; ``-`` when not measured."""
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}×"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:.0f} MiB"


def _limit(row: dict[str, Any]) -> str:
    return "≤ " + format_value(row["limit"], row["unit"])


def verdict(row: dict[str, Any]) -> str:
    """``met``, ``MISSED`` or ``not measured``."""
    if row["met"] is None:
        return "not measured"
    return "met" if row["met"] else "MISSED"


def _cell(row: dict[str, Any], which: str) -> str:
    value = format_value(row[which], row["unit"])
    detail = row.get(f"{which}_detail")
    return f"{value} ({detail})" if detail and row[which] is not None else value


def _storage(row: dict[str, Any]) -> str:
    return str(row.get("storage", "sqlite"))


def format_rows_text(rows: Sequence[dict[str, Any]]) -> str:
    """The targets table as plain text."""
    lines = [
        "== targets (fastest vs fastest, median vs median; met = both within the limit)",
        f"  {'storage':<9} {'executor':<16} {'target':<58} {'fastest':<26} {'median':<26} "
        f"{'limit':<10} verdict",
    ]
    for row in rows:
        lines.append(
            f"  {_storage(row):<9} {row['executor']:<16} {row['label']:<58} "
            f"{_cell(row, 'fastest'):<26} {_cell(row, 'median'):<26} {_limit(row):<10} "
            f"{verdict(row)}"
        )
    return "\n".join(lines)


def format_rows_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The targets table as Markdown."""
    lines = [
        "| storage | executor | target | fastest | median | limit | |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mark = verdict(row)
        lines.append(
            f"| {_storage(row)} | {row['executor']} | {row['label']} | {_cell(row, 'fastest')} | "
            f"{_cell(row, 'median')} | {_limit(row)} | "
            + (f"**{mark}**" if row["met"] is False else mark)
            + " |"
        )
    return "\n".join(lines)
