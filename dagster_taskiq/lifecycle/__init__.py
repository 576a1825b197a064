"""The task lifecycle: one owner for states, key names, transitions and health.

Everything that decides what a task or worker *is* lives here:

* :mod:`.states`: the task and worker states, and the outcomes a task can end with (enums);
* :mod:`.keys`: :class:`KeySpace`, every Redis key name dagster-taskiq writes;
* :mod:`.scripts`: the Lua scripts that implement the transitions atomically;
* :mod:`.store`: :class:`TaskStore`, the async API over those transitions (register, claim,
  start, renew, finish, revoke, release, mark-lost) and the worker registry;
* :mod:`.health`: :func:`assess`, the one verdict on a task's health used by the step handler,
  the run launcher and the workers' sweeper;
* :mod:`.lease`: the fencing schedule a worker follows when it cannot renew a lease;
* :mod:`.retry`: the one retry and backoff policy.

The step handler, the run launcher, the worker and the CLI are adapters over this package.
"""
