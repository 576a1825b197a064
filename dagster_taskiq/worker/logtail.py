"""Compute-log mirroring in task processes by a thread, instead of two helper processes per stream.

Dagster's default ``LocalComputeLogManager`` points a process's stdout and stderr at files and
mirrors each file back to the original stream with ``tail -F``. Because that ``tail`` would
outlive a process that dies abruptly, Dagster starts, next to each ``tail``, a second Python
interpreter that polls whether the process is still alive. With one process per step that is
four helper processes per step; tearing them down also waits on each one.

A task process is a short-lived fork of the worker, so the mirroring can live inside it:
:func:`use_thread_mirroring` makes Dagster's capture start one daemon thread per stream that
copies new bytes from the capture file to the original stream (a duplicate of its file
descriptor taken before the redirect). The thread dies with the process, however it ends, so
nothing can be orphaned; at the end of a capture it copies what is left before it stops, so the
mirror does not lose a step's last lines the way a killed ``tail`` can. The files, the
redirection and ``is_capture_complete`` are Dagster's own, unchanged.
"""

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import IO, Any

from dagster_taskiq.compat import compute_logs

#: How often a mirroring thread looks for new bytes in its capture file.
MIRROR_INTERVAL_SECONDS = 0.1
_CHUNK = 65536


class _FileMirror(threading.Thread):
    """Copy whatever is appended to ``path`` onto file descriptor ``out_fd`` until stopped."""

    def __init__(self, path: str, out_fd: int) -> None:
        super().__init__(name=f"dagster-taskiq-log-mirror:{os.path.basename(path)}", daemon=True)
        self._path = path
        self._out_fd = out_fd
        self._stop_requested = threading.Event()

    def run(self) -> None:
        with open(self._path, "rb") as source:
            while not self._stop_requested.wait(MIRROR_INTERVAL_SECONDS):
                self._copy_available(source)
            self._copy_available(source)  # what was written just before the capture ended

    def _copy_available(self, source: IO[bytes]) -> None:
        while chunk := source.read(_CHUNK):
            view = memoryview(chunk)
            while view:
                try:
                    written = os.write(self._out_fd, view)
                except OSError:  # the worker's stream is gone: keep capturing, stop mirroring
                    return
                view = view[written:]

    def stop(self) -> None:
        """Copy what is left, then end the thread."""
        self._stop_requested.set()
        self.join()


@contextlib.contextmanager
def _mirror_with_thread(path: str, stream: IO[Any]) -> Iterator[tuple[None, None]]:
    """Stand-in for ``dagster._core.execution.compute_logs.execute_posix_tail``."""
    fileno = compute_logs._fileno(stream)
    if fileno is None:  # nothing to mirror to (a test runner's stream, say)
        yield (None, None)
        return
    out_fd = os.dup(fileno)  # taken before Dagster points ``fileno`` at the capture file
    mirror = _FileMirror(path, out_fd)
    mirror.start()
    try:
        yield (None, None)
    finally:
        try:
            mirror.stop()
        finally:
            os.close(out_fd)


def use_thread_mirroring() -> bool:
    """In a task process: let Dagster's log capture mirror with a thread; True if it now does."""
    if not callable(getattr(compute_logs, "execute_posix_tail", None)):
        return False
    compute_logs.execute_posix_tail = _mirror_with_thread  # type: ignore[assignment]
    return True
