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


def test_independent_steps_on_two_slots_split_into_start_work_handover_and_end() -> None:
    from benchmarks.hops import run_times, slot_breakdown

    # Four 1 s steps on two slots: a and b at once, c and d 50 ms after each ends.
    rows = [("RUN_START", None, 10.0)]
    for step, start in (("a", 10.2), ("b", 10.2), ("c", 11.25), ("d", 11.25)):
        rows += [("STEP_START", step, start), ("STEP_SUCCESS", step, start + 1.0)]
    rows.append(("RUN_SUCCESS", None, 12.35))
    parts = slot_breakdown(first_times(rows), run_times(rows), slots=2)
    assert round(parts["run start -> first step started"]) == 200
    assert round(parts["steps in Dagster (sum ÷ slots)"]) == 2000
    assert round(parts["slots idle in between (÷ slots)"]) == 50
    assert round(parts["last step succeeded -> run ended"]) == 100
    assert round(parts["run (RUN_START -> end)"]) == 2350
    assert slot_breakdown(first_times(rows), {}, slots=2) == {}
