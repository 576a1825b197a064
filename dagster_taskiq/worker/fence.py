"""Self-fencing: a lease deadline a worker shares with the task process it forked.

The worker writes two ``time.monotonic()`` deadlines (SIGTERM at, SIGKILL at) into an anonymous
shared mapping each time it renews the task's lease; the forked process runs a watchdog thread
that signals itself when a deadline passes. ``CLOCK_MONOTONIC`` is system-wide, so both processes
read the same clock. A worker whose event loop stalls (a long GC pause, a blocked call) therefore
cannot keep its step running past its lease: the step stops itself. See
:mod:`dagster_taskiq.lifecycle.lease` for the timings.

Each deadline is one aligned 8-byte double, stored and loaded as a whole through a ``"d"``
memoryview (a single machine store or load), so the watchdog never sees a half-written value.
``struct.pack_into`` must not be used here: it zeroes the target bytes before writing them, and
a watchdog reading at that instant saw a deadline of 0 and killed a healthy step. The two
deadlines are written separately; since the worker only moves them later, a reader that sees one
new and one old value enforces deadlines that were both valid, which is safe.
"""

import mmap
import os
import signal
import threading
import time


def _say(message: str) -> None:
    """One line on the task process's stderr (the worker's log): why it stops itself."""
    try:
        os.write(2, f"dagster-taskiq fence: {message}\n".encode())
    except OSError:
        pass


#: How often the watchdog in the task process looks at its deadlines.
WATCH_INTERVAL = 0.1


class LeaseClock:
    """Two shared deadlines (monotonic seconds): when the task process must stop, and die."""

    def __init__(self, term_at: float = float("inf"), kill_at: float = float("inf")) -> None:
        self._map = mmap.mmap(-1, 16)  # page-aligned: both doubles are naturally aligned
        self._slots = memoryview(self._map).cast("d")
        #: The deadlines at creation, kept by value (so a forked process has them too). The
        #: worker only ever moves deadlines later, so a shared value below these is not a
        #: deadline but a bad read, and is ignored: a second line of defence behind the whole-
        #: value stores, so that no fault in the shared page can stop a step before its time.
        self._floor = (term_at, kill_at)
        self.set(term_at, kill_at)

    def set(self, term_at: float, kill_at: float) -> None:
        """Move both deadlines (the worker calls this after each good renewal)."""
        self._slots[0] = term_at
        self._slots[1] = kill_at

    def read(self) -> tuple[float, float]:
        """The current (term_at, kill_at)."""
        return self._slots[0], self._slots[1]

    def deadlines(self) -> tuple[float, float, bool]:
        """The deadlines to enforce: the shared ones, never earlier than those at creation.
        The third value says whether the shared ones read below that floor (a bad read)."""
        return self._floored(*self.read())

    def _floored(self, term_at: float, kill_at: float) -> tuple[float, float, bool]:
        floor_term, floor_kill = self._floor
        if term_at >= floor_term and kill_at >= floor_kill:
            return term_at, kill_at, False
        return floor_term, floor_kill, True  # below the floor, or NaN

    def watch(self) -> None:
        """In the task process: start a daemon thread that enforces the deadlines on itself."""
        thread = threading.Thread(target=self._watch, name="dagster-taskiq-fence", daemon=True)
        thread.start()

    def _watch(self) -> None:
        termed = False
        reported_bad_read = False
        pid = os.getpid()
        while True:
            raw_term, raw_kill = self.read()
            term_at, kill_at, bad = self._floored(raw_term, raw_kill)
            if bad and not reported_bad_read:
                reported_bad_read = True
                _say(f"task process {pid}: read deadlines ({raw_term:.3f}, {raw_kill:.3f}) "
                     f"earlier than those it started with; keeping ({term_at:.3f}, "
                     f"{kill_at:.3f})")
            now = time.monotonic()
            if now >= kill_at:
                _say(f"task process {pid}: its lease deadline passed {now - kill_at:.3f} s ago "
                     f"(kill at {kill_at:.3f}); killing itself so that it cannot run twice")
                os.kill(pid, signal.SIGKILL)
            if now >= term_at and not termed:
                termed = True
                _say(f"task process {pid}: its lease was not renewed in time; interrupting itself")
                os.kill(pid, signal.SIGTERM)
            time.sleep(WATCH_INTERVAL)

    def close(self) -> None:
        """Release the mapping (in the worker, once the task process has exited)."""
        self._slots.release()
        self._map.close()
