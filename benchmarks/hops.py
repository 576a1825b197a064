"""Where the time of a chain's hop goes, read from a kept run's SQLite event log.

``python -m benchmarks hops HOME`` reads the newest run's event database under ``HOME`` (a
``DAGSTER_HOME`` kept with ``run --keep``) and prints, per step, the medians of:

* ``sent -> started``: from the orchestrator's "sent to queue" event to the step's ``STEP_START``
  (delivery, claim, fork, the step process's set-up, ``verify_step``);
* ``started -> succeeded``: the step's own execution in Dagster (``STEP_START`` to
  ``STEP_SUCCESS``);
* ``succeeded -> next sent``: from a step's success to the orchestrator sending the next one
  (wake-up, event-log read, launch).

For an executor without a send event (in-process), ``succeeded -> next started`` is shown.
"""

import datetime
import sqlite3
import statistics
from collections.abc import Iterable
from pathlib import Path

SENT = "STEP_WORKER_STARTING"
STARTED = "STEP_START"
SUCCEEDED = "STEP_SUCCESS"


def newest_run_database(home: Path) -> Path:
    """The event database of the most recently written run under ``home``."""
    databases = sorted((home / "history" / "runs").glob("*.db"), key=lambda p: p.stat().st_mtime)
    if not databases:
        raise FileNotFoundError(f"No run event databases under {home}/history/runs.")
    return databases[-1]


Row = tuple[str | None, str | None, object]


def first_times(rows: Iterable[Row]) -> dict[str, dict[str, float]]:
    """For each step, the first time (epoch seconds) of each event type, in log order."""
    steps: dict[str, dict[str, float]] = {}
    for event_type, step_key, timestamp in rows:
        if not event_type or not step_key:
            continue
        if isinstance(timestamp, str):
            when = datetime.datetime.fromisoformat(timestamp).timestamp()
        else:
            when = float(timestamp)  # type: ignore[arg-type]
        steps.setdefault(step_key, {}).setdefault(event_type, when)
    return steps


def hop_breakdown(steps: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """Durations (ms) of each part of a hop, over consecutive steps in the order they started."""
    ordered = sorted(
        (events for events in steps.values() if STARTED in events), key=lambda e: e[STARTED]
    )
    parts: dict[str, list[float]] = {}

    def add(name: str, start: float | None, end: float | None) -> None:
        if start is not None and end is not None:
            parts.setdefault(name, []).append((end - start) * 1000)

    previous: dict[str, float] | None = None
    for events in ordered:
        add("sent -> started", events.get(SENT), events.get(STARTED))
        add("started -> succeeded", events.get(STARTED), events.get(SUCCEEDED))
        if previous is not None:
            if SENT in events:
                add("succeeded -> next sent", previous.get(SUCCEEDED), events.get(SENT))
            else:
                add("succeeded -> next started", previous.get(SUCCEEDED), events.get(STARTED))
        previous = events
    return parts


def format_breakdown(parts: dict[str, list[float]]) -> str:
    """One line per part: median and fastest in milliseconds, and how many hops."""
    lines = [f"  {'part':28s} {'median':>9s} {'fastest':>9s}   n"]
    for name, values in parts.items():
        lines.append(
            f"  {name:28s} {statistics.median(values):7.1f}ms {min(values):7.1f}ms {len(values):3d}"
        )
    return "\n".join(lines)


def breakdown_of(home: Path) -> str:
    """The printed breakdown of the newest run under ``home``."""
    database = newest_run_database(home)
    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT dagster_event_type, step_key, timestamp FROM event_logs ORDER BY id"
        ).fetchall()
    return f"{database.name}\n{format_breakdown(hop_breakdown(first_times(rows)))}"
