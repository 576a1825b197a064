"""Helpers for tests of the local commands (demo, dev): run them for real, find leftovers."""

import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import psutil

from dagster_taskiq.config import BACKEND_ENV, BROKER_ENV
from dagster_taskiq_tests.harness import REPO_ROOT

MARKER_ENV = "DAGSTER_TASKIQ_TEST_MARKER"


def command_env(marker: str, **extra: str) -> dict[str, str]:
    """The environment of a local command under test: no broker configured, plus a marker that
    every process it starts inherits (so leftovers can be found)."""
    env = {k: v for k, v in os.environ.items() if k not in (BROKER_ENV, BACKEND_ENV)}
    env.pop("DAGSTER_HOME", None)
    env[MARKER_ENV] = marker
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def new_marker() -> str:
    """A unique marker value for one test."""
    return uuid.uuid4().hex


def cli(*args: str) -> list[str]:
    """The argv of ``dagster-taskiq ARGS`` with this interpreter."""
    return [sys.executable, "-m", "dagster_taskiq.cli", *args]


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``marker`` (anything a command left behind)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER_ENV) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(processes: Sequence[psutil.Process]) -> str:
    """``pid: command line`` per process, for assertion messages."""
    lines = []
    for proc in processes:
        try:
            lines.append(f"{proc.pid}: {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            lines.append(f"{proc.pid}: (gone)")
    return "\n".join(lines)


def kill_marked(marker: str) -> None:
    """Last-resort cleanup after a failed test: kill anything still carrying ``marker``."""
    for proc in marked_processes(marker):
        try:
            proc.kill()
        except psutil.Error:
            pass


def run_command(
    args: Sequence[str], marker: str, cwd: Path, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a local command to completion and capture its output."""
    return subprocess.run(
        list(args),
        env=command_env(marker, **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
