"""``worker list --json`` and ``status --watch`` against a real worker, on both brokers."""

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dagster_taskiq.config import TaskiqSettings
from dagster_taskiq_tests.harness import REPO_ROOT, WorkerPool, executor_config
from dagster_taskiq_tests.test_ops_dead_letters import cli

HEADER = "dagster-taskiq status"


def test_worker_list_json_matches_status(
    settings: TaskiqSettings, workers: WorkerPool, tmp_path: Path
) -> None:
    worker = workers.start(concurrency=2)
    listed = cli(settings, tmp_path, "worker", "list", "--json")
    assert listed.exit_code == 0, listed.output
    documents = json.loads(listed.stdout)
    status = cli(settings, tmp_path, "status", "--json")
    assert status.exit_code == 0, status.output
    in_status = json.loads(status.stdout)["workers"]
    assert [d["name"] for d in documents] == [worker.name]
    assert set(documents[0]) == set(in_status[0])
    assert documents[0]["pid"] == worker.pid and documents[0]["concurrency"] == 2
    assert documents[0]["queues"] == [settings.default_queue] and documents[0]["running"] == 0
    stable = ("name", "host", "pid", "queues", "concurrency", "running", "running_tasks")
    assert {k: documents[0][k] for k in stable} == {k: in_status[0][k] for k in stable}


class Lines:
    """The stdout lines of a process, read in a thread so the test can wait with a timeout."""

    def __init__(self, process: "subprocess.Popen[str]") -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        stream = process.stdout
        threading.Thread(target=lambda: [self.lines.put(x) for x in stream], daemon=True).start()

    def until(self, count: int, matching: str, timeout: float) -> list[str]:
        """All lines read until ``count`` of them contain ``matching``."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while sum(matching in line for line in seen) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only got {seen!r}"
            try:
                seen.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                break
        assert sum(matching in line for line in seen) >= count, seen
        return seen


def _watch(settings: TaskiqSettings, tmp_path: Path, *args: str) -> "subprocess.Popen[str]":
    config = tmp_path / "watch.yaml"
    config.write_text(json.dumps(executor_config(settings)))
    return subprocess.Popen(
        [sys.executable, "-m", "dagster_taskiq.cli", "status", "-y", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO_ROOT),
    )


def test_status_watch_redraws_until_interrupted(
    settings: TaskiqSettings, workers: WorkerPool, tmp_path: Path
) -> None:
    worker = workers.start()
    process = _watch(settings, tmp_path, "--watch", "0.5")
    try:
        seen = Lines(process).until(2, HEADER, timeout=30)
        assert "Every 0.5 s: dagster-taskiq status" in seen[0]
        text = "".join(seen)
        assert "QUEUES" in text and "WORKERS" in text and worker.name in text
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    # --json with the default interval: one status document per line.
    process = _watch(settings, tmp_path, "--json", "--watch")
    try:
        started = time.monotonic()
        documents = [json.loads(x) for x in Lines(process).until(2, '"workers"', timeout=30)]
        assert time.monotonic() - started >= 2.0
        assert all([w["name"] for w in d["workers"]] == [worker.name] for d in documents)
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
