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

For independent steps spread over several slots (``sleepy``), ``--slots N`` also splits the run's
own time (``RUN_START`` to ``RUN_SUCCESS``) into: the run's start until its first step starts,
the steps' time in Dagster (summed, ÷ slots), the slots' idle time between the first start and
the last success (÷ slots: the hand-overs), and the last success until the run ends.
``--run-id`` picks a run instead of the newest (the run ids are in the benchmark's records).
"""

import datetime
import sqlite3
import statistics
from collections.abc import Iterable
from pathlib import Path

SENT = "STEP_WORKER_STARTING"
STARTED = "STEP_START"
SUCCEEDED = "STEP_SUCCESS"
#: The run's start and end events (stored under their older names in the event log).
RUN_STARTED = ("RUN_START", "PIPELINE_START")
RUN_ENDED = ("RUN_SUCCESS", "RUN_FAILURE", "PIPELINE_SUCCESS", "PIPELINE_FAILURE")


def newest_run_database(home: Path, run_id: str | None = None) -> Path:
    """The event database of the most recently written run under ``home`` (or of ``run_id``)."""
    if run_id is not None:
        database = home / "history" / "runs" / f"{run_id}.db"
        if not database.exists():
            raise FileNotFoundError(f"No event database for run {run_id} under {home}.")
        return database
    databases = sorted((home / "history" / "runs").glob("*.db"), key=lambda p: p.stat().st_mtime)
    if not databases:
        raise FileNotFoundError(f"No run event databases under {home}/history/runs.")
    return databases[-1]


Row = tuple[str | None, str | None, object]


def _when(timestamp: object) -> float:
    if isinstance(timestamp, str):
        return datetime.datetime.fromisoformat(timestamp).timestamp()
    return float(timestamp)  # type: ignore[arg-type]


def first_times(rows: Iterable[Row]) -> dict[str, dict[str, float]]:
    """For each step, the first time (epoch seconds) of each event type, in log order."""
    steps: dict[str, dict[str, float]] = {}
    for event_type, step_key, timestamp in rows:
        if not event_type or not step_key:
            continue
        steps.setdefault(step_key, {}).setdefault(event_type, _when(timestamp))
    return steps


def run_times(rows: Iterable[Row]) -> dict[str, float]:
    """The run's own events (no step key): the first time of each type."""
    found: dict[str, float] = {}
    for event_type, step_key, timestamp in rows:
        if event_type and not step_key:
            found.setdefault(event_type, _when(timestamp))
    return found


def slot_breakdown(
    steps: dict[str, dict[str, float]], run: dict[str, float], slots: int
) -> dict[str, float]:
    """Where a run of independent steps on ``slots`` slots spends its time, in milliseconds;
    the parts add up to the run's own time (``RUN_START`` to its end)."""
    ran = [e for e in steps.values() if STARTED in e and SUCCEEDED in e]
    begun = next((run[t] for t in RUN_STARTED if t in run), None)
    ended = next((run[t] for t in RUN_ENDED if t in run), None)
    if not ran or begun is None or ended is None:
        return {}
    first = min(e[STARTED] for e in ran)
    last = max(e[SUCCEEDED] for e in ran)
    busy = sum(e[SUCCEEDED] - e[STARTED] for e in ran)
    return {
        "run start -> first step started": (first - begun) * 1000,
        "steps in Dagster (sum ÷ slots)": busy / slots * 1000,
        "slots idle in between (÷ slots)": ((last - first) * slots - busy) / slots * 1000,
        "last step succeeded -> run ended": (ended - last) * 1000,
        "run (RUN_START -> end)": (ended - begun) * 1000,
    }


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


def breakdown_of(home: Path, run_id: str | None = None, slots: int | None = None) -> str:
    """The printed breakdown of the newest run under ``home`` (or of ``run_id``); with
    ``slots``, the slot breakdown too."""
    database = newest_run_database(home, run_id)
    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT dagster_event_type, step_key, timestamp FROM event_logs ORDER BY id"
        ).fetchall()
    steps = first_times(rows)
    out = f"{database.name}\n{format_breakdown(hop_breakdown(steps))}"
    if slots:
        parts = slot_breakdown(steps, run_times(rows), slots)
        out += f"\n  on {slots} slot(s):\n" + "\n".join(
            f"  {name:36s} {value:8.1f}ms" for name, value in parts.items()
        )
    return out
