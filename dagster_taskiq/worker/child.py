"""Fork one child process per task from the warm worker, and collect how it ended.

The child inherits the imported Dagster and job code, runs one body, writes its
:class:`~dagster_taskiq.payloads.TaskOutcome` (serdes JSON) to a pipe and exits with ``os._exit``.
Before that, a body may report that the step's outcome is already in the event log (one NUL byte
on the same pipe; JSON never contains a raw NUL), so the worker can wake the run's orchestrator
while the child is still tearing down (compute-log capture, resources, exit).
It asks the kernel to kill it if the worker dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the
worker never leaves a step running unsupervised.
"""

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from dagster_taskiq.compat import deserialize_value, serialize_value
from dagster_taskiq.payloads import TaskOutcome
from dagster_taskiq.worker.fence import LeaseClock

logger = logging.getLogger("dagster_taskiq.worker")
_PR_SET_PDEATHSIG = 1
_MAX_OUTCOME_BYTES = 60_000
_STEP_DONE = b"\x00"


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        pass
    if os.getppid() != parent_pid:
        os._exit(70)


def _reset_signals_in_child() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Dagster treats SIGTERM like SIGINT in its run and step processes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _forget_parent_loop() -> None:
    asyncio.events._set_running_loop(None)
    asyncio.set_event_loop(None)


class ChildProcess:
    """A forked task process: its pid, a pidfd to await its exit, and its outcome pipe."""

    def __init__(self, pid: int, outcome_fd: int) -> None:
        self.pid = pid
        self._outcome_fd = outcome_fd
        self._chunks: list[bytes] = []
        self.exit_code: int | None = None
        #: Whether the child reported its step's outcome before exiting.
        self.step_done = False

    async def wait(self, on_step_done: Callable[[], Awaitable[None]] | None = None) -> int:
        """Wait for the child to exit (without blocking the loop); return its exit code.

        ``on_step_done`` runs (once, errors logged) as soon as the child reports that its step's
        outcome is in the event log; if it is still running when the child has exited (say, the
        backend is unreachable), it is cancelled.
        """
        loop = asyncio.get_running_loop()
        early: list[asyncio.Task[None]] = []
        exited = loop.create_future()
        pidfd = os.pidfd_open(self.pid)

        def _on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, _on_exit)
        pipe_done = loop.create_future()
        os.set_blocking(self._outcome_fd, False)

        def _read_pipe() -> None:
            try:
                chunk = os.read(self._outcome_fd, 65536)
            except BlockingIOError:
                return
            if chunk:
                if _STEP_DONE in chunk:
                    chunk = chunk.replace(_STEP_DONE, b"")
                    if not self.step_done:
                        self.step_done = True
                        if on_step_done is not None:
                            early.append(loop.create_task(_run_quietly(on_step_done, self.pid)))
                if chunk:
                    self._chunks.append(chunk)
            else:
                loop.remove_reader(self._outcome_fd)
                if not pipe_done.done():
                    pipe_done.set_result(None)

        loop.add_reader(self._outcome_fd, _read_pipe)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        _, status = os.waitpid(self.pid, 0)
        self.exit_code = os.waitstatus_to_exitcode(status)
        try:
            await asyncio.wait_for(pipe_done, 1.0)
        except asyncio.TimeoutError:
            loop.remove_reader(self._outcome_fd)
            _read_pipe()
        os.close(self._outcome_fd)
        for task in early:  # best effort: the task's finish wakes the orchestrator anyway
            task.cancel()
        await asyncio.gather(*early, return_exceptions=True)
        return self.exit_code

    def outcome(self) -> TaskOutcome | None:
        """The outcome the child wrote, or None if it died before writing one."""
        data = b"".join(self._chunks)
        if not data:
            return None
        try:
            return deserialize_value(data.decode(), TaskOutcome)
        except Exception:
            logger.warning("Child %s wrote an unreadable outcome.", self.pid)
            return None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child if it is still running."""
        if self.exit_code is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


def _before_exit_quietly(before_exit: Callable[[], None]) -> None:
    try:
        before_exit()
    except BaseException:
        logging.getLogger("dagster_taskiq.worker").exception("task process clean-up failed")


async def _run_quietly(callback: Callable[[], Awaitable[None]], pid: int) -> None:
    try:
        await callback()
    except Exception as exc:
        logger.warning("Early step-done action for child %s failed: %s", pid, exc)


def fork_child(
    body: Callable[[Callable[[], None]], TaskOutcome],
    after_fork: Callable[[], None],
    before_exit: Callable[[], None] | None = None,
    lease_clock: LeaseClock | None = None,
) -> ChildProcess:
    """Fork and run ``body`` in the child. Returns the parent's handle on the child.

    ``body`` gets a ``step_done()`` function to call once the task's outcome is recorded (in the
    event log) but before the child's teardown; calling it again does nothing. In the child,
    ``after_fork`` runs before ``body`` and ``before_exit`` (errors logged) after it. With a
    ``lease_clock``, the child stops itself when the lease deadlines it holds pass.
    """
    parent_pid = os.getpid()
    read_fd, write_fd = os.pipe()
    reported: list[bool] = []

    def step_done() -> None:
        if not reported:
            reported.append(True)
            os.write(write_fd, _STEP_DONE)

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_fd)
            _die_with_parent(parent_pid)
            _reset_signals_in_child()
            _forget_parent_loop()
            if lease_clock is not None:
                lease_clock.watch()
            after_fork()
            outcome = body(step_done)
            code = outcome.exit_code if outcome.exit_code is not None else 0
            data = serialize_value(outcome).encode()
            if len(data) > _MAX_OUTCOME_BYTES:
                data = serialize_value(outcome._replace(error=None)).encode()[:_MAX_OUTCOME_BYTES]
            view = memoryview(data)
            while view:
                written = os.write(write_fd, view)
                view = view[written:]
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            logging.getLogger("dagster_taskiq.worker").exception("task process failed")
            code = 1
        finally:
            try:
                if before_exit is not None:
                    _before_exit_quietly(before_exit)
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(write_fd)
    return ChildProcess(pid, read_fd)
