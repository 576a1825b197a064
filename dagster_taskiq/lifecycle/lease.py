"""Lease timings: when the key store looks at a task again, and when a worker fences itself.

A running task holds a *lease*: a key whose TTL is the task's ``heartbeat_timeout`` (``T``),
renewed by its worker every ``T/10`` (every 3 s with the default ``T`` = 30 s). The worker's
heartbeat comes at least that often while it holds the lease, whatever its
``--heartbeat-interval``: a beat slower than ``T/2`` would otherwise let every step be stopped
while healthy. A revocation does not wait for the next renewal: the worker reads its revoked
tasks on every heartbeat. Redis starts each TTL when the renewal *arrives*, so a lease renewed by
a request sent at ``s`` lasts at least until ``s + T``. The worker therefore measures from the
send time of its last successful renewal and stops the task's process:

* SIGTERM at ``s + TERM_FRACTION·T`` (Dagster's interrupt: the step records it),
* SIGKILL at ``s + KILL_FRACTION·T``,

so the process is gone at least ``(1 − KILL_FRACTION)·T`` before the lease can lapse and the task
be declared lost and run elsewhere. The forked process also watches the same deadline itself, so
a worker whose event loop stalls cannot keep it alive. With the default ``T`` = 30 s a worker cut
off from Redis stops its step after 15 s, kills it after 22.5 s, and nobody else may start the
step before 30 s.
"""

import dataclasses

#: Fraction of ``heartbeat_timeout`` after the last good renewal at which the process gets SIGTERM.
TERM_FRACTION = 0.5
#: Fraction of ``heartbeat_timeout`` after the last good renewal at which the process gets SIGKILL.
KILL_FRACTION = 0.75
#: Fraction of ``heartbeat_timeout`` between two renewals of one lease: five renewals may fail
#: in a row before the process is stopped.
RENEW_FRACTION = 0.1
#: The shortest time between two renewals of one lease (for a very short ``heartbeat_timeout``).
MIN_RENEW_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class LeasePolicy:
    """The timings that follow from one task's ``heartbeat_timeout``."""

    heartbeat_timeout: float

    @property
    def lease_ms(self) -> int:
        """The lease key's TTL in milliseconds."""
        return max(1, int(self.heartbeat_timeout * 1000))

    def renew_every(self) -> float:
        """Seconds between two renewals of the lease (the worker beats at least this often
        while it holds the lease)."""
        return max(MIN_RENEW_SECONDS, RENEW_FRACTION * self.heartbeat_timeout)

    @property
    def term_after(self) -> float:
        """Seconds after the last good renewal's send time at which to SIGTERM the process."""
        return TERM_FRACTION * self.heartbeat_timeout

    @property
    def kill_after(self) -> float:
        """Seconds after the last good renewal's send time at which to SIGKILL the process."""
        return KILL_FRACTION * self.heartbeat_timeout

    @property
    def unsent_grace(self) -> float:
        """How long a registered task may stay unsent before a sweeper sends it."""
        return max(1.0, self.heartbeat_timeout / 3)

    @property
    def recheck_after(self) -> float:
        """How often a sent, still-queued task's message is looked for on its queue."""
        return max(2.0, self.heartbeat_timeout / 2)

    @property
    def claim_check_after(self) -> float:
        """How long after a claim (or its last renewal) its holder's liveness is checked."""
        return max(1.0, self.heartbeat_timeout / 3)

    @property
    def lease_check_after(self) -> float:
        """How long after a start (or a renewal) the lease is checked for expiry."""
        return self.heartbeat_timeout + 0.5
