"""Chaos tier: break brokers and workers mid-run, then check the task lifecycle guarantees from a
ledger of what actually ran.

* :mod:`.ledger` — ops append one JSON line when their body starts and one when it ends; a
  reader pairs them into executions and a watcher records when a process that never wrote its end
  was seen dead.
* :mod:`.jobs` — the job the chaos tests run (a fan-out of four and a join, with a retry policy),
  the code a forged message would name, and the orchestrator entry point
  (``python -m dagster_taskiq_tests.chaos.jobs orchestrate SPEC``).
* :mod:`.proxy` — a loopback TCP proxy that can cut one worker off from Redis and heal it.
* :mod:`.invariants` — the checks, each returning a list of violation strings.

This package is imported by worker processes (through the job's code origin), so it must stay
free of side effects and of test-only imports at package level.
"""
