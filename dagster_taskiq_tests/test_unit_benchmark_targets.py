"""Unit tests of the benchmark's targets table: ratios, fastest and median, verdicts."""

from typing import Any

import pytest

from benchmarks.report import format_markdown, format_text, summarize
from benchmarks.targets import TARGET_KEYS, one_child_pss, target_rows

META = {
    "type": "meta",
    "session": "s1",
    "storage": "sqlite (default DagsterInstance in a temporary DAGSTER_HOME per executor)",
    "workers_per_executor": 2,
    "slots_per_worker": 1,
    "executors": {"taskiq_redis": "", "in_process": ""},
}


def _run(scenario: str, executor: str, wall: float, steps: int, **extra: Any) -> dict[str, Any]:
    record = {
        "type": "run",
        "session": "s1",
        "scenario": scenario,
        "executor": executor,
        "steps": steps,
        "wall_s": wall,
        "success": True,
        "warmup": False,
        "cpu_s": 0.01 * steps,
        "peak_rss_mib": 100.0,
        "peak_growth_mib": 1.0,
        "worker_cpu_s": 0.0,
    }
    record.update(extra)
    return record


def _cold(ready: float, imported: float, first: float, later: float, **extra: Any) -> dict:  # type: ignore[type-arg]
    record = {
        "type": "cold_start",
        "session": "s1",
        "executor": "taskiq_redis",
        "success": True,
        "ready_s": ready,
        "import_s": imported,
        "first_step_s": first,
        "later_step_s": later,
        "idle_tree_pss_mib": 120.0,
        "idle_processes": 1,
        "busy_child_pss_mib": 150.0,
    }
    record.update(extra)
    return record


def _records() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [META]
    # chain_20: taskiq 2.0/3.0/4.0 s, in-process 1.0/3.0/2.0 s.
    for wall in (2.0, 3.0, 4.0):
        records.append(_run("chain_20", "taskiq_redis", wall, 20))
    for wall in (1.0, 3.0, 2.0):
        records.append(_run("chain_20", "in_process", wall, 20))
    records.append(_run("chain_20", "taskiq_redis", 0.5, 20, warmup=True))  # not measured
    records.append(_run("chain_20", "in_process", 0.1, 20, success=False))  # failed: ignored
    for wall, base in ((6.0, 10.0), (8.0, 8.0), (7.0, 9.0)):
        records.append(_run("fanout_100", "taskiq_redis", wall, 102))
        records.append(_run("fanout_100", "in_process", base, 102))
    records += [_run("sleepy", "taskiq_redis", w, 8) for w in (4.2, 4.4, 5.0)]
    records += [_run("runs_50", "taskiq_redis", w, 100) for w in (10.0, 12.0)]
    records += [_run("runs_50", "in_process", w, 100) for w in (20.0, 30.0)]
    records.append(_run("fanout_1000", "taskiq_redis", 90.0, 1002, cpu_s=7.014))
    records.append(_run("fanout_1000", "taskiq_redis", 95.0, 1002, cpu_s=9.018))
    records += [_cold(2.0, 1.0, 0.3, 0.1), _cold(1.2, 1.0, 0.2, 0.2), _cold(1.5, 1.1, 0.4, 0.1)]
    return records


def _by_key(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["target"]: row for row in rows if row["executor"] == "taskiq_redis"}


def test_every_target_has_a_row_per_taskiq_executor() -> None:
    rows = target_rows(_records())
    assert [row["target"] for row in rows] == list(TARGET_KEYS)
    assert all(row["executor"] == "taskiq_redis" for row in rows)
    assert all(row["fastest"] is not None and row["median"] is not None for row in rows)


def test_chain_compares_fastest_with_fastest_and_median_with_median() -> None:
    row = _by_key(target_rows(_records()))["chain_hop"]
    assert row["fastest"] == pytest.approx(2.0 / 1.0)
    assert row["median"] == pytest.approx(3.0 / 2.0)
    assert row["fastest_detail"] == "100 ÷ 50 ms"  # per hop: 2.0 s / 20 and 1.0 s / 20
    assert row["limit"] == 1.2 and row["met"] is False
    assert row["label"] == "chain_20 per hop ÷ in-process per hop"
    assert row["n"] == 3


def test_fanout_sleepy_and_runs_ratios() -> None:
    rows = _by_key(target_rows(_records()))
    assert rows["fanout"]["fastest"] == pytest.approx(6.0 / 8.0)
    assert rows["fanout"]["median"] == pytest.approx(7.0 / 9.0)
    assert rows["fanout"]["met"] is True  # both within 0.8
    # Two workers with one slot each: ideal = 8 naps / 2 slots = 4 s.
    assert rows["sleepy"]["fastest"] == pytest.approx(4.2 / 4.0)
    assert rows["sleepy"]["median"] == pytest.approx(4.4 / 4.0)
    assert rows["sleepy"]["met"] is True
    assert "ideal 4 s" in rows["sleepy"]["label"]
    assert rows["runs"]["fastest"] == pytest.approx(10.0 / 20.0)
    assert rows["runs"]["median"] == pytest.approx(11.0 / 25.0)


def test_a_target_is_met_only_when_fastest_and_median_both_are() -> None:
    records = [META]
    # Fastest 1.1 (within 1.2), median 1.3 (not).
    records += [_run("chain_20", "taskiq_redis", w, 20) for w in (1.1, 1.3, 1.5)]
    records += [_run("chain_20", "in_process", w, 20) for w in (1.0, 1.0, 1.0)]
    row = _by_key(target_rows(records))["chain_hop"]
    assert row["fastest"] == pytest.approx(1.1) and row["median"] == pytest.approx(1.3)
    assert row["met"] is False


def test_cold_start_rows() -> None:
    rows = _by_key(target_rows(_records()))
    assert rows["worker_ready"]["fastest"] == pytest.approx(1.2 / 1.0)
    assert rows["worker_ready"]["median"] == pytest.approx(1.5 / 1.0)
    assert rows["first_step"]["fastest"] == pytest.approx(0.2 / 0.1)
    assert rows["first_step"]["median"] == pytest.approx(0.3 / 0.1)
    # No idle child: the worker's tree with its sleeping step child counts.
    assert rows["worker_pss"]["median"] == 150.0
    assert rows["worker_pss"]["met"] is False
    assert "no idle child" in rows["worker_pss"]["median_detail"]


def test_pss_prefers_an_idle_child() -> None:
    assert one_child_pss({"idle_processes": 2, "idle_tree_pss_mib": 125.0}) == 125.0
    assert one_child_pss({"idle_processes": 1, "busy_child_pss_mib": 151.0}) == 151.0
    assert one_child_pss({"idle_processes": 1, "busy_child_pss_mib": None}) is None


def test_orchestrator_cpu_at_the_widest_fan_out_and_its_flatness() -> None:
    rows = _by_key(target_rows(_records()))
    cpu = rows["orch_cpu"]
    assert cpu["fastest"] == pytest.approx(7.0)  # 7.014 s / 1,002 steps
    assert cpu["median"] == pytest.approx(8.0)
    assert cpu["met"] is True
    assert "1,002 steps" in cpu["label"]
    flat = rows["orch_cpu_flat"]
    # fanout_100 cost 10 ms per step (cpu_s = 0.01 * steps): 7.0 / 10 and 8.0 / 10.
    assert flat["fastest"] == pytest.approx(0.7) and flat["median"] == pytest.approx(0.8)
    assert "1,002 ÷ 102 steps" in flat["label"]


def test_smoke_sizes_stand_in_for_the_issue_sizes() -> None:
    records = [META]
    records += [_run("chain_3", "taskiq_redis", 0.9, 3), _run("chain_3", "in_process", 0.6, 3)]
    records += [_run("sleepy_2", "taskiq_redis", 1.1, 2)]
    records += [_run("fanout_5", "taskiq_redis", 1.0, 7), _run("fanout_20", "taskiq_redis", 2, 22)]
    rows = _by_key(target_rows(records))
    assert rows["chain_hop"]["label"].startswith("chain_3 ")
    assert rows["chain_hop"]["median"] == pytest.approx(1.5)
    assert rows["sleepy"]["median"] == pytest.approx(1.1 / 1.0)  # 2 naps / 2 slots
    assert "22 ÷ 7 steps" in rows["orch_cpu_flat"]["label"]
    assert rows["fanout"]["met"] is None  # fanout_5 has no in-process baseline here
    assert rows["fanout"]["fastest"] is None and rows["worker_ready"]["median"] is None


def test_storages_are_summarized_apart() -> None:
    postgres_meta = {**META, "session": "s2", "storage": "postgres (a fresh database)"}
    postgres: list[dict[str, Any]] = [postgres_meta]
    for record in _records()[1:]:
        copied = {**record, "session": "s2"}
        if record["type"] == "run":
            copied["wall_s"] = record["wall_s"] * 2
        postgres.append(copied)
    derived = summarize(_records() + postgres)
    rows = [r for r in derived if r["type"] == "target_row"]
    assert {r["storage"] for r in rows} == {"sqlite", "postgres"}
    chain = {r["storage"]: r for r in rows if r["target"] == "chain_hop"}
    assert chain["sqlite"]["median"] == pytest.approx(chain["postgres"]["median"])
    summaries = [r for r in derived if r["type"] == "summary" and r["scenario"] == "chain_20"]
    walls = {(s["storage"], s["executor"]): s["median_wall_s"] for s in summaries}
    doubled = 2 * walls[("sqlite", "taskiq_redis")]
    assert walls[("postgres", "taskiq_redis")] == pytest.approx(doubled)
    text = format_text(_records() + derived)
    assert "postgres" in text and "MISSED" in text and "worker PSS with one idle child" in text
    markdown = format_markdown(_records() + derived)
    assert "| postgres | taskiq_redis | chain_20 per hop ÷ in-process per hop |" in markdown
    assert "| `chain_20` (postgres) |" in markdown
