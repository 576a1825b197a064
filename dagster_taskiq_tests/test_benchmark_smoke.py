"""Smoke tests of the benchmark harness: a quick-mode scenario and the targets smoke mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dagster_taskiq_tests.harness import REPO_ROOT


def test_quick_fanout_10_writes_json_lines(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "run",
        "quick",
        "--scenarios",
        "fanout_10",
        "--executors",
        "taskiq_redis,in_process",
        "--rounds",
        "1",
        "--no-warmup",
        "--workers",
        "1",
        "--redis-url",
        redis_url,
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_type: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for record in records:
        by_type.setdefault(record["type"], []).append(record)

    (meta,) = by_type["meta"]
    assert meta["mode"] == "quick"
    assert set(meta["executors"]) == {"taskiq_redis", "in_process"}
    assert meta["versions"]["dagster"] and meta["machine"]["cores"] >= 1

    runs = {r["executor"]: r for r in by_type["run"]}
    assert set(runs) == {"taskiq_redis", "in_process"}
    for run in runs.values():
        assert run["success"] is True, run
        assert run["scenario"] == "fanout_10" and run["steps"] == 12
        assert run["wall_s"] > 0 and run["cpu_s"] > 0 and run["peak_rss_mib"] > 0
    assert runs["taskiq_redis"]["worker_cpu_s"] > 0  # the steps ran on the workers

    summaries = {s["executor"]: s for s in by_type["summary"]}
    assert summaries["in_process"]["ratio_vs_in_process"] == 1.0
    assert summaries["taskiq_redis"]["median_wall_s"] == runs["taskiq_redis"]["wall_s"]
    assert summaries["taskiq_redis"]["ratio_vs_in_process"] > 0

    memory = by_type["worker_memory"]
    assert len(memory) == 1 and memory[0]["executor"] == "taskiq_redis"
    assert all(m["busy_tree_rss_mib"] > 0 and m["ready_rss_mib"] > 0 for m in memory)
    assert "fanout_10" in done.stdout and "taskiq_redis" in done.stdout

    report = subprocess.run(
        [sys.executable, "-m", "benchmarks", "report", str(out), "--markdown"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "| `fanout_10` |" in report.stdout


# About 50 s alone; three times that beside a `-n 3` suite on two cores.
@pytest.mark.timeout(480)
def test_smoke_mode_reports_every_target_row(redis_url: str, tmp_path: Path) -> None:
    """The targets harness at tiny sizes: every row of the table has a number (not a speed)."""
    from benchmarks.targets import TARGET_KEYS

    out = tmp_path / "smoke.jsonl"
    command = [sys.executable, "-m", "benchmarks", "run", "smoke", "--redis-url", redis_url]
    done = subprocess.run(
        [*command, "--out", str(out), "--markdown"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]

    (meta,) = [r for r in records if r["type"] == "meta"]
    assert meta["mode"] == "smoke" and meta["probe_rounds"] == 1
    runs = {(r["scenario"], r["executor"]): r for r in records if r["type"] == "run"}
    assert all(run["success"] for run in runs.values()), runs
    # The runs_3 baseline: the same three runs one after another on the in-process executor.
    assert runs[("runs_3", "in_process")]["succeeded"] == 3
    assert runs[("runs_3", "taskiq_redis")]["succeeded"] == 3
    (cold,) = [r for r in records if r["type"] == "cold_start"]
    assert cold["success"] is True, cold
    assert len(cold["step_latencies_s"]) == 5 and cold["import_s"] > 0 and cold["ready_s"] > 0

    rows = [r for r in records if r["type"] == "target_row"]
    assert [r["target"] for r in rows] == list(TARGET_KEYS)
    for row in rows:
        assert row["executor"] == "taskiq_redis" and row["storage"] == "sqlite"
        assert isinstance(row["fastest"], float) and row["fastest"] > 0, row
        assert isinstance(row["median"], float) and row["median"] > 0, row
        assert row["met"] in (True, False)
    assert "| sqlite | taskiq_redis | chain_3 per hop ÷ in-process per hop |" in done.stdout

    report = subprocess.run(
        [sys.executable, "-m", "benchmarks", "report", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for row in rows:
        assert row["label"] in report.stdout


#: Every figure a ``scale`` record must hold, measured.
SCALE_FIGURES = (
    "wall_s",
    "throughput_steps_per_s",
    "queue_wait_p50_s",
    "queue_wait_p99_s",
    "redis_commands",
    "redis_commands_per_step",
    "orchestrator_cpu_s",
    "orchestrator_cpu_per_step_ms",
    "worker_cpu_per_step_ms",
    "launcher_cpu_s",
)


def test_scale_mode_at_tiny_size(tmp_path: Path) -> None:
    """``run scale`` with 2 runs × 3 steps on 1 and 2 workers: every figure, and the check."""
    from benchmarks.env import DEFAULT_POSTGRES_URL, redis_server_binary
    from dagster_taskiq_tests.private_brokers import require_binary
    from dagster_taskiq_tests.services import require

    require(DEFAULT_POSTGRES_URL, "PostgreSQL")
    require_binary(redis_server_binary() or "redis-server", "redis-server")
    out = tmp_path / "scale.jsonl"
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "run",
        "scale",
        "--scale-workers",
        "1,2",
        "--scale-runs",
        "2",
        "--scale-steps",
        "3",
        "--no-warmup",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    scale = sorted((r for r in records if r["type"] == "scale"), key=lambda r: r["workers"])
    assert [r["workers"] for r in scale] == [1, 2]
    for record in scale:
        assert record["success"] is True and record["succeeded"] == 2, record
        assert record["steps"] == 6 and record["slots"] == 2 and record["storage"] == "postgres"
        missing = [key for key in SCALE_FIGURES if record.get(key) is None]
        assert not missing, (missing, record)
        assert record["throughput_steps_per_s"] > 0 and record["redis_commands_per_step"] > 0
        assert record["queue_waits_n"] == 6  # one step-started event per step
        assert 0 <= record["queue_wait_p50_s"] <= record["queue_wait_p99_s"]
        assert record["run_processes"] == 2 and record["run_processes_sampled"] == 2
        assert record["orchestrator_cpu_per_step_ms"] > 0
    (check,) = [r for r in records if r["type"] == "scale_check"]
    assert check["baseline_workers"] == 1 and set(check["ratios"]) == {"1", "2"}
    assert check["flat"] in (True, False)
    assert "Redis commands per step" in done.stdout
