"""The scale benchmark's arithmetic: percentiles, per-step figures and the flatness check.

No Dagster and no network here, so the figures can be unit-tested and recomputed from a file.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: Redis commands per step may grow at most this much from the fewest workers to any other count.
FLAT_LIMIT = 1.25


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly between ranks.

    ``None`` for no values. Matches numpy's default ("linear") method.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"Percentile {q} is outside 0-100.")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def per_step(total: float | None, steps: int, scale: float = 1.0) -> float | None:
    """``total × scale / steps``, or ``None`` without a total or steps."""
    if total is None or steps <= 0:
        return None
    return total * scale / steps


def flatness(per_workers: Mapping[int, float | None], limit: float = FLAT_LIMIT) -> dict[str, Any]:
    """Whether a per-step figure stays flat as the number of workers grows.

    ``per_workers`` maps a worker count to its figure. Each count's figure is divided by the
    figure at the fewest workers (the baseline); the check passes when no ratio exceeds ``limit``.
    ``flat`` is ``None`` when there is no baseline or fewer than two counts to compare.
    """
    counts = sorted(per_workers)
    base_count = counts[0] if counts else None
    base = per_workers[base_count] if base_count is not None else None
    ratios: dict[int, float | None] = {}
    for count in counts:
        value = per_workers[count]
        ratios[count] = value / base if (value is not None and base) else None
    known = [r for r in ratios.values() if r is not None]
    if base is None or not base or len(counts) < 2 or len(known) < len(counts):
        flat = None
    else:
        flat = max(known) <= limit
    worst = max(known) if known else None
    return {
        "baseline_workers": base_count,
        "ratios": {str(count): ratio for count, ratio in ratios.items()},
        "max_ratio": worst,
        "limit": limit,
        "flat": flat,
    }


def scale_check(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``scale_check`` record: Redis commands per step across the ``scale`` records."""
    figures = {int(r["workers"]): r.get("redis_commands_per_step") for r in records}
    return {"type": "scale_check", "figure": "redis_commands_per_step", **flatness(figures)}


def check_line(check: dict[str, Any]) -> str:
    """One line saying whether Redis commands per step stayed flat."""
    if check["flat"] is None:
        return "Redis commands per step: not enough worker counts measured to compare."
    ratios = ", ".join(
        f"{count} workers {ratio:.2f}×" for count, ratio in check["ratios"].items() if ratio
    )
    verdict = "flat" if check["flat"] else "NOT flat"
    return (
        f"Redis commands per step {verdict} as workers grow (vs {check['baseline_workers']} "
        f"workers: {ratios}; limit {check['limit']:.2f}×)."
    )


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


SCALE_COLUMNS = (
    ("workers × slots", None, ""),
    ("steps", "steps", "d"),
    ("wall s", "wall_s", ".1f"),
    ("steps/s", "throughput_steps_per_s", ".2f"),
    ("queue wait p50 s", "queue_wait_p50_s", ".3f"),
    ("queue wait p99 s", "queue_wait_p99_s", ".3f"),
    ("Redis cmds/step", "redis_commands_per_step", ".1f"),
    ("run-process CPU/step ms", "orchestrator_cpu_per_step_ms", ".1f"),
    ("worker CPU/step ms", "worker_cpu_per_step_ms", ".1f"),
    ("runs ok", None, ""),
)


def _cells(record: dict[str, Any]) -> list[str]:
    cells = []
    for title, key, spec in SCALE_COLUMNS:
        if title == "workers × slots":
            cells.append(f"{record['workers']} × {record['slots']}")
        elif title == "runs ok":
            cells.append(f"{record.get('succeeded', 0)}/{record['runs']}")
        else:
            assert key is not None
            cells.append(_fmt(record.get(key), spec))
    return cells


def format_scale(records: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The scale table (text or Markdown) and the flatness line."""
    rows = sorted((r for r in records if r.get("type") == "scale"), key=lambda r: r["workers"])
    if not rows:
        return ""
    titles = [title for title, _, _ in SCALE_COLUMNS]
    body = [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
    else:
        widths = [max(len(t), *(len(c[i]) for c in body)) for i, t in enumerate(titles)]
        lines = ["  ".join(t.rjust(w) for t, w in zip(titles, widths, strict=True))]
        lines += [
            "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) for cells in body
        ]
    checks = [r for r in records if r.get("type") == "scale_check"]
    check = checks[-1] if checks else scale_check(rows)
    return "\n".join([*lines, "", check_line(check)])
