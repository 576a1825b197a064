"""A task process never reads a half-written lease deadline (no network needed).

Root cause of the "step process killed by SIGKILL 4 ms after fork" failures: the worker wrote
the shared deadlines with ``struct.pack_into``, which zeroes the target bytes before it writes
them, and the child's watchdog, reading at that instant, saw ``kill_at == 0``. The worker writes
the deadlines right after the fork (``LeaseGuard.hold``) just as the child's watchdog takes its
first look, so about one step in several thousand died. This test races a writer in the parent
against the watchdog's read in a forked child, as in a worker, and checks every read.
"""

import os
import struct
import threading
import time

from dagster_taskiq.worker.fence import LeaseClock

_RACE_SECONDS = 1.0
_TERM = 22.5
_KILL = 30.0


def _written(value: float, base: float, offset: float) -> bool:
    """Whether ``value`` is one the writer wrote: ``base + offset + k`` for a whole ``k >= 0``."""
    k = value - base - offset
    return k >= 0 and k == int(k)


def _reads_in_child(clock: LeaseClock, base: float, out_fd: int) -> None:
    """In the forked child: read as fast as possible, count reads that were never written."""
    reads = bad = 0
    last_term, last_kill = base + _TERM, base + _KILL
    end = time.monotonic() + _RACE_SECONDS
    while time.monotonic() < end:
        term_at, kill_at = clock.read()
        reads += 1
        # Each value is one the writer wrote, and each only grows. A read may take its two values
        # from neighbouring renewals: both were valid deadlines, so that is safe.
        if not (
            _written(term_at, base, _TERM)
            and _written(kill_at, base, _KILL)
            and term_at >= last_term
            and kill_at >= last_kill
        ):
            bad += 1
        last_term, last_kill = term_at, kill_at
    os.write(out_fd, struct.pack("qq", reads, bad))


def test_deadlines_written_while_the_child_reads_are_never_torn() -> None:
    base = float(int(time.monotonic()))  # whole seconds: every written value is exact
    clock = LeaseClock(base + _TERM, base + _KILL)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the task process
        code = 1
        try:
            os.close(read_fd)
            _reads_in_child(clock, base, write_fd)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    stop = threading.Event()
    writes = [0]

    def renew() -> None:  # the worker's renewals, as fast as possible
        renewed_at = base
        while not stop.is_set():
            renewed_at += 1.0
            clock.set(renewed_at + _TERM, renewed_at + _KILL)
            writes[0] += 1

    writer = threading.Thread(target=renew)
    writer.start()
    try:
        data = b""
        while len(data) < 16:
            chunk = os.read(read_fd, 16 - len(data))
            assert chunk, "the reading child exited without reporting"
            data += chunk
    finally:
        stop.set()
        writer.join()
        os.waitpid(pid, 0)
        os.close(read_fd)
        clock.close()
    reads, bad = struct.unpack("qq", data)
    assert writes[0] > 1000 and reads > 1000, (writes[0], reads)
    assert bad == 0, f"{bad} of {reads} reads saw a deadline that was never written"
