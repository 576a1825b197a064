"""Unit tests of the scale benchmark's arithmetic: percentiles, the flatness check (no network)."""

from typing import Any

import pytest

from benchmarks.scalestats import (
    FLAT_LIMIT,
    check_line,
    flatness,
    format_scale,
    per_step,
    percentile,
    scale_check,
)


def test_percentile_interpolates_like_numpy_linear() -> None:
    values = [0.4, 0.1, 0.3, 0.2, 0.5]
    assert percentile(values, 50) == pytest.approx(0.3)
    assert percentile(values, 0) == pytest.approx(0.1)
    assert percentile(values, 100) == pytest.approx(0.5)
    # rank (5 - 1) × 0.99 = 3.96: 0.4 + 0.96 × (0.5 - 0.4)
    assert percentile(values, 99) == pytest.approx(0.496)
    assert percentile([1.0, 2.0], 50) == pytest.approx(1.5)


def test_percentile_of_one_value_and_of_none() -> None:
    assert percentile([0.7], 99) == pytest.approx(0.7)
    assert percentile([], 50) is None


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="outside 0-100"):
        percentile([1.0], 101)


def test_per_step() -> None:
    assert per_step(3.0, 2000, 1000) == pytest.approx(1.5)
    assert per_step(None, 10) is None
    assert per_step(5.0, 0) is None


def test_flat_within_limit() -> None:
    verdict = flatness({2: 40.0, 4: 42.0, 8: 49.0})
    assert verdict["flat"] is True
    assert verdict["baseline_workers"] == 2
    assert verdict["ratios"] == {"2": 1.0, "4": pytest.approx(1.05), "8": pytest.approx(1.225)}
    assert verdict["max_ratio"] == pytest.approx(1.225)
    assert verdict["limit"] == FLAT_LIMIT


def test_growth_past_limit_is_not_flat() -> None:
    verdict = flatness({2: 40.0, 4: 45.0, 8: 60.0})
    assert verdict["flat"] is False
    assert verdict["max_ratio"] == pytest.approx(1.5)


def test_baseline_is_fewest_workers_whatever_the_order() -> None:
    verdict = flatness({8: 50.0, 2: 50.0, 4: 50.0})
    assert verdict["baseline_workers"] == 2
    assert list(verdict["ratios"]) == ["2", "4", "8"]


def test_missing_figures_give_no_verdict() -> None:
    assert flatness({2: 40.0})["flat"] is None
    assert flatness({2: 40.0, 4: None})["flat"] is None
    assert flatness({2: 0.0, 4: 3.0})["flat"] is None
    assert flatness({})["flat"] is None


def _scale(workers: int, per_step_commands: float) -> dict[str, Any]:
    return {
        "type": "scale",
        "workers": workers,
        "slots": 2,
        "runs": 10,
        "steps": 200,
        "succeeded": 10,
        "wall_s": 20.0,
        "throughput_steps_per_s": 10.0,
        "queue_wait_p50_s": 0.1,
        "queue_wait_p99_s": 0.9,
        "redis_commands_per_step": per_step_commands,
        "orchestrator_cpu_per_step_ms": 30.0,
        "worker_cpu_per_step_ms": 120.0,
    }


def test_scale_check_record_and_line() -> None:
    records = [_scale(2, 40.0), _scale(4, 44.0), _scale(8, 56.0)]
    check = scale_check(records)
    assert check["type"] == "scale_check"
    assert check["figure"] == "redis_commands_per_step"
    assert check["flat"] is False
    line = check_line(check)
    assert "NOT flat" in line and "8 workers 1.40×" in line


def test_table_has_a_row_per_worker_count_and_the_verdict() -> None:
    records = [_scale(4, 41.0), _scale(2, 40.0)]
    text = format_scale(records)
    rows = text.splitlines()
    assert rows[1].strip().startswith("2 × 2") and rows[2].strip().startswith("4 × 2")
    assert "flat as workers grow" in rows[-1]
    markdown = format_scale(records, markdown=True)
    assert markdown.startswith("| workers × slots |")
    assert (
        "| 4 × 2 | 200 | 20.0 | 10.00 | 0.100 | 0.900 | 41.0 | 30.0 | 120.0 | 10/10 |" in markdown
    )
