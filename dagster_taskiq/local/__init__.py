"""Local mode: the demo, ``dagster-taskiq dev`` and the processes they start and stop."""
