"""Side-by-side benchmarks of taskiq_executor against Dagster's own executors and dagster-celery.

Run ``python -m benchmarks run quick`` (or ``full``); see ``benchmarks/README.md``.
"""
