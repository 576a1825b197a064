#!/usr/bin/env bash
# Smoke tests on the older supported Dagster line (1.12): a virtualenv of its own with Dagster
# pinned to that line, then the tests that touch Dagster's internals (compat.py) the most:
# the lifecycle protocol, steps and runs through the launcher with resume and run monitoring.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DAGSTER_TASKIQ_OLDER_VENV:-.venv-dagster-1.12}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e ".[test,rabbitmq,embedded]" -c scripts/dagster-1.12.txt
"$VENV/bin/python" -c 'import dagster; assert dagster.__version__.startswith("1.12."), dagster.__version__'
echo "== pytest (smoke, Dagster $("$VENV/bin/python" -c 'import dagster; print(dagster.__version__)'))"
"$VENV/bin/python" -m pytest -n "${DAGSTER_TASKIQ_TEST_PROCESSES:-3}" \
  dagster_taskiq_tests/test_lifecycle_transitions.py \
  dagster_taskiq_tests/test_run_monitoring.py \
  dagster_taskiq_tests/test_unit_config_tags.py \
  dagster_taskiq_tests/test_unit_payloads.py
