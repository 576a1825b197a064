#!/usr/bin/env bash
# The test command: build a virtualenv, install the package with its test extras, then run
# ruff, mypy and the pytest suite on the newest supported Dagster line; then a smoke subset on
# the older supported line (scripts/dagster-older.sh). Broker tests skip locally when
# Redis/RabbitMQ are down (under CI=true they must run).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DAGSTER_TASKIQ_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e ".[test,rabbitmq,embedded,lint]"
echo "== ruff"
"$VENV/bin/ruff" check dagster_taskiq dagster_taskiq_tests example benchmarks
echo "== mypy"
"$VENV/bin/mypy" dagster_taskiq
echo "== pytest"
# Tests are mostly waiting on real brokers and worker processes: three pytest workers keep the
# suite well inside CI's budget on two cores. Pass -n 0 to run them one by one.
"$VENV/bin/python" -m pytest dagster_taskiq_tests -n "${DAGSTER_TASKIQ_TEST_PROCESSES:-3}" "$@"
if [ "${DAGSTER_TASKIQ_SKIP_OLDER_DAGSTER:-}" != "1" ]; then
  bash scripts/dagster-older.sh
fi
