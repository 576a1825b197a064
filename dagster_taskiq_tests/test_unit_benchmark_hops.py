"""The hop breakdown of ``python -m benchmarks hops`` (no network needed)."""

import sqlite3
from pathlib import Path

from benchmarks.hops import breakdown_of, first_times, hop_breakdown


def _rows(with_sends: bool) -> list[tuple[str, str, float]]:
    rows = []
    for n, base in enumerate((100.0, 100.1, 100.2)):
        step = f"s{n}"
        if with_sends:
            rows.append(("STEP_WORKER_STARTING", step, base))
        rows.append(("STEP_START", step, base + 0.04))
        rows.append(("STEP_SUCCESS", step, base + 0.06))
    return rows


def test_a_delegated_chain_splits_into_send_start_and_return() -> None:
    parts = hop_breakdown(first_times(_rows(with_sends=True)))
    assert [round(v) for v in parts["sent -> started"]] == [40, 40, 40]
    assert [round(v) for v in parts["started -> succeeded"]] == [20, 20, 20]
    assert [round(v) for v in parts["succeeded -> next sent"]] == [40, 40]


def test_an_in_process_chain_has_no_send() -> None:
    parts = hop_breakdown(first_times(_rows(with_sends=False)))
    assert "sent -> started" not in parts
    assert [round(v) for v in parts["succeeded -> next started"]] == [80, 80]


def test_reads_the_newest_run_database_of_a_kept_home(tmp_path: Path) -> None:
    runs = tmp_path / "history" / "runs"
    runs.mkdir(parents=True)
    with sqlite3.connect(runs / "run.db") as conn:
        conn.execute(
            "CREATE TABLE event_logs (id INTEGER PRIMARY KEY, dagster_event_type TEXT, "
            "step_key TEXT, timestamp TEXT)"
        )
        conn.executemany(
            "INSERT INTO event_logs (dagster_event_type, step_key, timestamp) VALUES (?, ?, ?)",
            [
                ("STEP_WORKER_STARTING", "a", "2026-12-05 10:00:00.000"),
                ("STEP_START", "a", "2026-12-05 10:00:00.030"),
                ("STEP_SUCCESS", "a", "2026-12-05 10:00:00.045"),
            ],
        )
    printed = breakdown_of(tmp_path)
    assert "run.db" in printed
    assert "sent -> started" in printed and "30.0ms" in printed
