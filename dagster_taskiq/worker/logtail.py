"""Cheaper compute-log mirroring in task processes, when GNU ``tail`` is available.

Dagster's default ``LocalComputeLogManager`` captures a process's stdout and stderr into files
and mirrors each file back to the stream with ``tail -F``. Because that ``tail`` would outlive a
process that dies abruptly, Dagster starts, next to each ``tail``, a second Python interpreter
whose only job is to poll, once a second, whether the process is still alive and then kill the
``tail``. With one process per step, that is two extra interpreter start-ups per step: a third of
a worker's CPU time per trivial step on a 2-core machine.

GNU ``tail`` does the same watching itself: ``--pid=PID`` makes it exit (after a last read) once
PID is gone, also checked once a second. :func:`use_pid_watching_tail` makes Dagster's capture
start ``tail -F --pid=<this process>`` and no watcher interpreter. Everything else is unchanged:
the files, the mirroring, the clean-up at the end of the capture and
``DAGSTER_COMPUTE_LOG_TAIL_WAIT_AFTER_FINISH``. It is used only inside task processes, and only
where ``tail`` is GNU coreutils.
"""

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import IO, Any

from dagster._core.execution import compute_logs


def gnu_tail_available() -> bool:
    """Whether ``tail`` on the PATH is GNU coreutils (which has ``--pid``)."""
    tail = shutil.which("tail")
    if tail is None:
        return False
    try:
        out = subprocess.run(
            [tail, "--version"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GNU coreutils" in out.stdout


@contextlib.contextmanager
def _tail_watching_this_process(path: str, stream: IO[Any]) -> Iterator[tuple[int, None]]:
    """Stand-in for ``dagster._core.execution.compute_logs.execute_posix_tail``."""
    target = stream if compute_logs._fileno(stream) else None
    tail_process: subprocess.Popen[bytes] | None = None
    try:
        tail_process = subprocess.Popen(
            ["tail", "-F", "-c", "+0", f"--pid={os.getpid()}", path], stdout=target
        )
        yield (tail_process.pid, None)
    finally:
        time.sleep(float(os.getenv("DAGSTER_COMPUTE_LOG_TAIL_WAIT_AFTER_FINISH", "0")))
        if tail_process is not None:
            compute_logs._clean_up_subprocess(tail_process)


def use_pid_watching_tail() -> bool:
    """In a task process: let Dagster's log capture use ``tail --pid``; True if it now does."""
    if not callable(getattr(compute_logs, "execute_posix_tail", None)):
        return False
    compute_logs.execute_posix_tail = _tail_watching_this_process  # type: ignore[assignment]
    return True
