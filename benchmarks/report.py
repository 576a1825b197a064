"""Medians, ratios, targets and the orchestrator's per-step scaling, from JSON line records."""

import itertools
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.lanes import LANE_TYPES, LANE_VARIANTS, format_lanes, lane_rows
from benchmarks.scenarios import (
    CHAIN_HOP_TARGET_S,
    FANOUT_VS_CELERY_TARGET,
    FANOUT_VS_IN_PROCESS_TARGET,
    SLEEPY_SLACK,
)

CELERY = "celery_redis"
IN_PROCESS = "in_process"
#: Record types that :func:`summarize` derives from the raw records.
DERIVED_TYPES = frozenset({"summary", "target", "scaling", "target_row", *LANE_TYPES})
ORDER = (
    "taskiq_redis",
    "taskiq_redis_metrics",
    "taskiq_rabbitmq",
    "taskiq_rabbitmq_metrics",
    *LANE_VARIANTS,
    "in_process",
    "multiprocess",
    "celery_redis",
)
#: Worker metrics (``--metrics`` runs) may cost at most this fraction of wall time.
METRICS_OVERHEAD_TARGET = 0.02


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _measured(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("type") == "run" and not r.get("warmup")]


def _ideal_sleepy(meta: dict[str, Any]) -> float:
    slots = int(meta.get("workers_per_executor", 2)) * int(meta.get("slots_per_worker", 1))
    return 8.0 / max(1, slots)


def storage_of(record: dict[str, Any], by_session: dict[str, str]) -> str:
    """``sqlite`` or ``postgres``: the record's own, else its session's ``meta`` (older files)."""
    found = record.get("storage") or by_session.get(record.get("session", ""), "sqlite")
    return "postgres" if str(found).startswith("postgres") else "sqlite"


def by_storage(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Raw records split by Dagster storage, in the order the storages first appear."""
    sessions = {
        r.get("session", ""): str(r.get("storage", "sqlite"))
        for r in records
        if r.get("type") == "meta"
    }
    parts: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        parts.setdefault(storage_of(record, sessions), []).append(record)
    return parts


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per storage: summaries per (scenario, executor), targets, scaling, the targets table."""
    from benchmarks.targets import target_rows

    out: list[dict[str, Any]] = []
    for storage, part in by_storage(records).items():
        derived = _summarize_one(part)
        meta = next((r for r in part if r.get("type") == "meta"), {})
        if meta.get("mode") != "lanes":  # its own table instead: benchmarks.lanes
            derived += target_rows(part)
        derived += lane_rows(part)
        out += [{**record, "storage": storage} for record in derived]
    return out


def _summarize_one(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    meta = next((r for r in records if r.get("type") == "meta"), {})
    runs = _measured(records)
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        by_key.setdefault((run["scenario"], run["executor"]), []).append(run)
    medians: dict[tuple[str, str], float] = {}
    summaries: list[dict[str, Any]] = []
    for (scenario, executor), group in by_key.items():
        ok = [r for r in group if r.get("success")]
        walls = [r["wall_s"] for r in ok]
        median = _median(walls)
        if median is not None:
            medians[(scenario, executor)] = median
        steps = group[0]["steps"]
        summaries.append(
            {
                "type": "summary",
                "scenario": scenario,
                "executor": executor,
                "n": len(group),
                "failures": len(group) - len(ok),
                "steps": steps,
                "median_wall_s": median,
                "min_wall_s": min(walls) if walls else None,
                "max_wall_s": max(walls) if walls else None,
                "median_per_step_s": median / steps if median is not None else None,
                "median_cpu_s": _median([r["cpu_s"] for r in ok]),
                "median_peak_rss_mib": _median([r["peak_rss_mib"] for r in ok]),
                "median_peak_growth_mib": _median([r["peak_growth_mib"] for r in ok]),
                "median_worker_cpu_s": _median([r.get("worker_cpu_s", 0.0) for r in ok]),
            }
        )
    for summary in summaries:
        scenario = summary["scenario"]
        median = summary["median_wall_s"]
        for ref, key in ((IN_PROCESS, "ratio_vs_in_process"), (CELERY, "ratio_vs_celery")):
            base = medians.get((scenario, ref))
            summary[key] = median / base if (median is not None and base) else None
    summaries.sort(
        key=lambda s: (
            s["scenario"],
            ORDER.index(s["executor"]) if s["executor"] in ORDER else 99,
        )
    )
    out = summaries + _targets(summaries, meta)
    scaling = scaling_verdict(runs)
    if scaling:
        out.append(scaling)
    return out


def _targets(summaries: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    index = {(s["scenario"], s["executor"]): s for s in summaries}
    targets: list[dict[str, Any]] = []
    for executor in ("taskiq_redis", "taskiq_rabbitmq"):
        chain = index.get(("chain_20", executor))
        if chain and chain["median_wall_s"] is not None:
            hop = chain["median_wall_s"] / chain["steps"]
            targets.append(
                {
                    "type": "target",
                    "executor": executor,
                    "target": "chain_20 per hop <= 250 ms",
                    "value": hop,
                    "limit": CHAIN_HOP_TARGET_S,
                    "met": hop <= CHAIN_HOP_TARGET_S,
                }
            )
        fan = index.get(("fanout_100", executor))
        if fan and fan["median_wall_s"] is not None:
            for key, limit, label in (
                ("ratio_vs_celery", FANOUT_VS_CELERY_TARGET, "fanout_100 <= 0.5 x dagster-celery"),
                (
                    "ratio_vs_in_process",
                    FANOUT_VS_IN_PROCESS_TARGET,
                    "fanout_100 <= 1.5 x in-process",
                ),
            ):
                if fan.get(key) is not None:
                    targets.append(
                        {
                            "type": "target",
                            "executor": executor,
                            "target": label,
                            "value": fan[key],
                            "limit": limit,
                            "met": fan[key] <= limit,
                        }
                    )
        sleepy = index.get(("sleepy", executor))
        if sleepy and sleepy["median_wall_s"] is not None:
            ideal = _ideal_sleepy(meta)
            ratio = sleepy["median_wall_s"] / ideal
            targets.append(
                {
                    "type": "target",
                    "executor": executor,
                    "target": f"sleepy <= 1.15 x ideal {ideal:g} s",
                    "value": ratio,
                    "limit": SLEEPY_SLACK,
                    "met": ratio <= SLEEPY_SLACK,
                }
            )
        for scenario in ("chain_20", "fanout_100"):
            plain, measured = (
                index.get((scenario, executor)),
                index.get((scenario, f"{executor}_metrics")),
            )
            if plain and measured and plain["median_wall_s"] and measured["median_wall_s"]:
                overhead = measured["median_wall_s"] / plain["median_wall_s"] - 1.0
                targets.append(
                    {
                        "type": "target",
                        "executor": f"{executor}_metrics",
                        "target": f"{scenario} worker metrics overhead <= 2%",
                        "value": overhead,
                        "limit": METRICS_OVERHEAD_TARGET,
                        "met": overhead <= METRICS_OVERHEAD_TARGET,
                    }
                )
        runs = index.get(("runs_50", executor))
        if runs:
            targets.append(
                {
                    "type": "target",
                    "executor": executor,
                    "target": "runs_50: all runs succeed",
                    "value": runs["failures"],
                    "limit": 0,
                    "met": runs["failures"] == 0 and runs["median_wall_s"] is not None,
                }
            )
    return targets


def scaling_verdict(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How the orchestrator's CPU and peak memory grow with fan-out width (taskiq, Redis).

    Uses the medians of every fan-out size measured. The question is whether a wide run costs
    more per step than a narrow one, so growth counts as linear (or better) when no marginal CPU
    cost per step (between consecutive sizes from 100 steps up) exceeds the first one by more than
    1.5x, and the largest size's CPU cost per step is at most 1.5x the smallest one's. A marginal
    cost that falls as the run widens passes: that is the fixed cost of a run being spread out.
    """
    points: dict[int, dict[str, float]] = {}
    for run in runs:
        if (
            run["executor"] == "taskiq_redis"
            and run["scenario"].startswith("fanout_")
            and run.get("success")
        ):
            points.setdefault(run["steps"], {"cpu": [], "mem": []})  # type: ignore[dict-item]
            points[run["steps"]]["cpu"].append(run["cpu_s"])  # type: ignore[attr-defined]
            points[run["steps"]]["mem"].append(run["peak_growth_mib"])  # type: ignore[attr-defined]
    sizes = sorted(s for s in points if s >= 100)
    if len(sizes) < 2 or sizes[-1] < 500:
        return None
    cpu = {s: statistics.median(points[s]["cpu"]) for s in sizes}  # type: ignore[arg-type]
    mem = {s: statistics.median(points[s]["mem"]) for s in sizes}  # type: ignore[arg-type]
    marginal_cpu = [(cpu[b] - cpu[a]) / (b - a) for a, b in itertools.pairwise(sizes)]
    marginal_mem = [(mem[b] - mem[a]) / (b - a) for a, b in itertools.pairwise(sizes)]
    per_step_cpu = {s: cpu[s] / s for s in sizes}
    first = marginal_cpu[0]
    marginal_growth = max(marginal_cpu) / first if first > 0 else float("inf")
    growth = per_step_cpu[sizes[-1]] / per_step_cpu[sizes[0]]
    linear = marginal_growth <= 1.5 and growth <= 1.5
    largest = sizes[-1]
    return {
        "type": "scaling",
        "executor": "taskiq_redis",
        "sizes": sizes,
        "orchestrator_cpu_s": cpu,
        "orchestrator_peak_growth_mib": mem,
        "cpu_ms_per_step": {s: 1000 * per_step_cpu[s] for s in sizes},
        "marginal_cpu_ms_per_step": [1000 * m for m in marginal_cpu],
        "marginal_mib_per_step": marginal_mem,
        "largest_steps": largest,
        "largest_cpu_ms_per_step": 1000 * per_step_cpu[largest],
        "largest_mib_per_step": mem[largest] / largest,
        "linear": linear,
    }


# -- printing ----------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_text(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text report of summaries, targets, scaling and memory."""
    lines: list[str] = []
    summaries = [r for r in records if r.get("type") == "summary"]
    several = len({s.get("storage", "sqlite") for s in summaries}) > 1
    current = None
    for s in summaries:
        if (s["scenario"], s.get("storage")) != current:
            current = (s["scenario"], s.get("storage"))
            lines.append("")
            where = f", {s.get('storage', 'sqlite')} storage" if several else ""
            lines.append(f"== {s['scenario']} ({s['steps']} steps{where})")
            lines.append(
                f"  {'executor':<16} {'median':>9} {'per step':>9} {'vs in-proc':>10} "
                f"{'vs celery':>9} {'orch CPU':>9} {'orch peak':>10} {'wkr CPU':>8} {'n':>3}"
            )
        lines.append(
            f"  {s['executor']:<16} {_fmt(s['median_wall_s'], '.2f', ' s'):>9} "
            f"{_fmt(_ms(s['median_per_step_s']), '.0f', ' ms'):>9} "
            f"{_fmt(s['ratio_vs_in_process'], '.2f', 'x'):>10} "
            f"{_fmt(s['ratio_vs_celery'], '.2f', 'x'):>9} "
            f"{_fmt(s['median_cpu_s'], '.2f', ' s'):>9} "
            f"{_fmt(s['median_peak_rss_mib'], '.0f', ' MiB'):>10} "
            f"{_fmt(s['median_worker_cpu_s'], '.1f', ' s'):>8} {s['n']:>3}"
            + (f"  ({s['failures']} failed)" if s["failures"] else "")
        )
    targets = [r for r in records if r.get("type") == "target"]
    if targets:
        lines += ["", "== targets"]
        for t in targets:
            where = f" [{t.get('storage', 'sqlite')}]" if several else ""
            lines.append(
                f"  {'MET ' if t['met'] else 'MISS'} {t['executor']:<16}{where} {t['target']:<40} "
                f"value {t['value']:.3f} (limit {t['limit']})"
            )
    for scaling in (r for r in records if r.get("type") == "scaling"):
        where = f", {scaling.get('storage', 'sqlite')} storage" if several else ""
        lines += ["", f"== orchestrator scaling (taskiq_redis fan-outs{where})"]
        for size in scaling["sizes"]:
            key = size if size in scaling["cpu_ms_per_step"] else str(size)
            lines.append(
                f"  {size:>5} steps: CPU {scaling['orchestrator_cpu_s'][key]:.2f} s "
                f"({scaling['cpu_ms_per_step'][key]:.1f} ms/step), peak growth "
                f"{scaling['orchestrator_peak_growth_mib'][key]:.1f} MiB"
            )
        cpu_marginal = ", ".join(f"{m:.1f}" for m in scaling["marginal_cpu_ms_per_step"])
        mem_marginal = ", ".join(f"{m:.3f}" for m in scaling["marginal_mib_per_step"])
        lines.append(
            f"  marginal CPU ms/step {cpu_marginal}; marginal MiB/step {mem_marginal}"
            f" -> {'linear or better' if scaling['linear'] else 'GROWS faster than linear'}"
        )
    memory = [r for r in records if r.get("type") == "worker_memory"]
    if memory:
        lines += [
            "",
            "== worker memory (MiB; tree = worker + its children; PSS shares forked pages)",
            f"  {'worker':<34} {'ready':>6} {'idle':>6} {'idle tree RSS/PSS':>18} "
            f"{'busy':>6} {'busy tree RSS/PSS':>18} {'procs':>5} {'start':>6}",
        ]
        for m in memory:
            lines.append(
                f"  {m['worker']:<34} {m['ready_rss_mib']:6.0f} {m['idle_rss_mib']:6.0f} "
                f"{m['idle_tree_rss_mib']:8.0f}/{m['idle_tree_pss_mib']:<9.0f} "
                f"{m['busy_rss_mib']:6.0f} {m['busy_tree_rss_mib']:8.0f}/"
                f"{m['busy_tree_pss_mib']:<9.0f} {m['max_processes']:5d} "
                f"{_fmt(m.get('ready_after_s'), '.1f', ' s'):>6}"
            )
    rows = [r for r in records if r.get("type") == "target_row"]
    if rows:
        from benchmarks.targets import format_rows_text

        lines += ["", format_rows_text(rows)]
    lanes = format_lanes(records)
    if lanes:
        lines += ["", "== RabbitMQ priority lanes (÷ classic queues)", lanes]
    return "\n".join(lines)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def format_markdown(records: Sequence[dict[str, Any]]) -> str:
    """The summary as Markdown tables (for RESULTS.md and the README)."""
    summaries = [r for r in records if r.get("type") == "summary"]
    executors = [e for e in ORDER if any(s["executor"] == e for s in summaries)]
    scenarios: list[str] = []
    for s in summaries:
        if s["scenario"] not in scenarios:
            scenarios.append(s["scenario"])
    storages: list[str] = []
    for s in summaries:
        if s.get("storage", "sqlite") not in storages:
            storages.append(s.get("storage", "sqlite"))
    index = {(s.get("storage", "sqlite"), s["scenario"], s["executor"]): s for s in summaries}
    header = "| scenario | " + " | ".join(executors) + " |"
    lines = [header, "|---|" + "---|" * len(executors)]
    for storage, scenario in itertools.product(storages, scenarios):
        if not any((storage, scenario, e) in index for e in executors):
            continue
        cells = []
        for executor in executors:
            found = index.get((storage, scenario, executor))
            if found is None or found["median_wall_s"] is None:
                cells.append("–")
                continue
            cell = f"{found['median_wall_s']:.2f} s"
            ratios = []
            if executor != IN_PROCESS and found["ratio_vs_in_process"] is not None:
                ratios.append(f"{found['ratio_vs_in_process']:.2f}× in-proc")
            if executor != CELERY and found["ratio_vs_celery"] is not None:
                ratios.append(f"{found['ratio_vs_celery']:.2f}× celery")
            if ratios:
                cell += " (" + ", ".join(ratios) + ")"
            cells.append(cell)
        where = f" ({storage})" if len(storages) > 1 else ""
        lines.append(f"| `{scenario}`{where} | " + " | ".join(cells) + " |")
    rows = [r for r in records if r.get("type") == "target_row"]
    if rows:
        from benchmarks.targets import format_rows_markdown

        lines += ["", format_rows_markdown(rows)]
    lanes = format_lanes(records, markdown=True)
    if lanes:
        lines += ["", lanes]
    return "\n".join(lines)
