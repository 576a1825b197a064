"""The task process's watchdog never enforces a deadline earlier than the one it started with.

A benchmark run (``fanout_1000`` on Postgres, a few runs in a dozen) once showed a freshly forked
step process reading its shared deadlines as zero and killing itself 4 ms after the fork (a torn
write; see ``test_unit_fence_torn``). The worker only moves deadlines later, so such a read is not
a deadline: as a second line of defence, the watchdog keeps the deadlines it was created with and
says so once (no network needed).
"""

import math
import time

from dagster_taskiq.worker.fence import LeaseClock


def test_shared_deadlines_are_enforced_while_they_are_plausible() -> None:
    now = time.monotonic()
    clock = LeaseClock(now + 15, now + 22)
    try:
        assert clock.deadlines() == (now + 15, now + 22, False)
        clock.set(now + 30, now + 37)  # a renewal moved them later
        assert clock.deadlines() == (now + 30, now + 37, False)
    finally:
        clock.close()


def test_a_read_below_the_start_deadlines_is_ignored() -> None:
    now = time.monotonic()
    clock = LeaseClock(now + 15, now + 22)
    try:
        for bad in ((0.0, 0.0), (0.0, now + 40), (math.nan, now + 40)):
            clock.set(*bad)
            assert clock.deadlines() == (now + 15, now + 22, True)
    finally:
        clock.close()
