"""Unit tests of the benchmark report's orchestrator-scaling verdict (no network)."""

from typing import Any

from benchmarks.report import scaling_verdict


def _runs(cpu_by_steps: dict[int, float]) -> list[dict[str, Any]]:
    return [
        {
            "type": "run",
            "executor": "taskiq_redis",
            "scenario": f"fanout_{steps - 2}",
            "steps": steps,
            "success": True,
            "cpu_s": cpu,
            "peak_growth_mib": steps * 0.04,
        }
        for steps, cpu in cpu_by_steps.items()
    ]


def test_proportional_cost_is_linear() -> None:
    verdict = scaling_verdict(_runs({102: 1.7, 502: 8.5, 1002: 17.0}))
    assert verdict is not None
    assert verdict["linear"] is True
    assert verdict["sizes"] == [102, 502, 1002]


def test_falling_marginal_cost_is_not_flagged() -> None:
    # 18.4 then 11.8 ms per added step, as measured on 2026-11-30: cheaper per step as runs widen.
    verdict = scaling_verdict(_runs({102: 1.61, 502: 8.99, 1002: 14.88}))
    assert verdict is not None
    assert verdict["linear"] is True


def test_quadratic_cost_is_flagged() -> None:
    verdict = scaling_verdict(_runs({n: 1e-5 * n * n for n in (102, 502, 1002)}))
    assert verdict is not None
    assert verdict["linear"] is False


def test_needs_a_wide_fan_out() -> None:
    assert scaling_verdict(_runs({12: 0.2, 102: 1.7})) is None
