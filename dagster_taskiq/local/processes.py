"""Child processes that never outlive the local command that started them.

Every process that ``dagster-taskiq demo`` or ``dagster-taskiq dev`` starts (redis-server, workers,
``dagster dev``) is:

* in its own session, so a Ctrl-C in the terminal reaches only the command, which then stops its
  children in a sensible order (UI first, then workers, then the broker);
* bound to the command with ``PR_SET_PDEATHSIG``: if the command dies, even by ``kill -9``, the
  kernel sends SIGTERM to its children. A tiny exec shim sets it, because ``preexec_fn`` is unsafe
  once threads exist;
* stopped with a signal and a deadline, then SIGKILL, together with any descendants it left.

A command may also make itself a *child subreaper* (:func:`become_subreaper`): descendants whose
parent exits are then re-parented to the command, and :func:`stop_leftovers` finds and stops them.
"""

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import psutil

logger = logging.getLogger("dagster_taskiq.local")

_PR_SET_CHILD_SUBREAPER = 36

#: Runs in the new process before the real program: ask for SIGTERM when the parent dies, give up
#: if the parent is already gone, then exec the program (the setting survives exec).
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(70)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def become_subreaper() -> bool:
    """Make orphaned descendants of this process re-parent to it (Linux). Returns success."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        return False


class ManagedProcess:
    """One child process started in its own session and stopped with its descendants.

    :param name: short name used in messages (``worker demo-compute``, ``dagster dev``).
    :param argv: the program and its arguments.
    :param env: the complete environment of the process.
    :param cwd: working directory (default: the current one).
    :param log_path: file that receives stdout and stderr; None shares this process's streams.
    :param keep_line: with shared streams, drop each output line for which this returns False
        (the output then goes through a pipe and a copying thread).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | os.PathLike[str] | None = None,
        log_path: Path | None = None,
        keep_line: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.name = name
        self.keep_line = keep_line
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._stop_sent = False
        self._below: list[psutil.Process] = []

    def start(self) -> "ManagedProcess":
        """Start the process (from the calling thread, which should be the main thread)."""
        log: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")  # handed to the child; closed below
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *self.argv],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log if log is not None or self.keep_line is None else subprocess.PIPE,
                stderr=subprocess.STDOUT if log is not None or self.keep_line else None,
                start_new_session=True,
            )
        finally:
            if log is not None:
                log.close()
        if log is None and self.keep_line is not None and self.process.stdout is not None:
            threading.Thread(
                target=_copy_lines,
                args=(self.process.stdout, self.keep_line),
                name=f"output of {self.name}",
                daemon=True,
            ).start()
        return self

    @property
    def pid(self) -> int:
        """The process id (the shim execs the program, so it keeps this pid)."""
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while it runs (or before it started)."""
        return None if self.process is None else self.process.poll()

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log file (empty when output is shared)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def descendants(self) -> list[psutil.Process]:
        """Live processes below this one (its workers' task processes, dagster dev's servers)."""
        if not self.running:
            return []
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def send(self, signum: int) -> None:
        """Send ``signum`` to the process if it still runs."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def begin_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the process to stop (once; a second signal would mean "hurry" to a worker)."""
        if self.process is None or self._stop_sent:
            return
        self._below = self.descendants()
        self._stop_sent = True
        self.send(signum)

    def finish_stop(self, timeout: float = 20.0) -> int | None:
        """Wait up to ``timeout`` s for the stop to finish, then kill it and any descendants."""
        if self.process is None:
            return None
        self.begin_stop()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it.", self.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()
        terminate_all(self._below, grace=5.0)
        return self.process.returncode

    def stop(self, timeout: float = 20.0, signum: int = signal.SIGTERM) -> int | None:
        """Stop gracefully with ``signum``; after ``timeout`` s kill it. Descendants go too.

        Returns the exit code (None if it was never started).
        """
        self.begin_stop(signum)
        return self.finish_stop(timeout)

    def kill(self) -> None:
        """SIGKILL the process and its descendants now."""
        if self.process is None:
            return
        below = self.descendants()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()
        terminate_all(below, grace=0.0)


def _copy_lines(source: IO[bytes], keep_line: Callable[[bytes], bool]) -> None:
    """Copy ``source`` to this process's stdout line by line, dropping unwanted lines."""
    with source:
        for line in iter(source.readline, b""):
            if keep_line(line):
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()


def terminate_all(processes: Sequence[psutil.Process], grace: float) -> None:
    """SIGTERM each process still alive, wait up to ``grace`` s, then SIGKILL the rest."""
    alive = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                if grace > 0:
                    proc.terminate()
                alive.append(proc)
    if not alive:
        return
    _, remaining = psutil.wait_procs(alive, timeout=grace) if grace > 0 else ([], alive)
    for proc in remaining:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(remaining, timeout=5.0)


def stop_leftovers(grace: float = 5.0) -> int:
    """Stop every remaining descendant of this process; returns how many there were.

    After a command has stopped what it started, anything still below it is a leftover (for
    example a task process whose worker was killed, re-parented here by :func:`become_subreaper`).
    """
    try:
        leftovers = psutil.Process().children(recursive=True)
    except psutil.Error:  # pragma: no cover - our own process always exists
        return 0
    leftovers = [p for p in leftovers if _alive(p)]
    if leftovers:
        logger.warning(
            "Stopping %d leftover process(es): %s",
            len(leftovers),
            ", ".join(str(p.pid) for p in leftovers),
        )
        terminate_all(leftovers, grace)
    return len(leftovers)


def _alive(proc: psutil.Process) -> bool:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)
            return False
        return proc.is_running()
    except psutil.Error:
        return False


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it is truthy (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
