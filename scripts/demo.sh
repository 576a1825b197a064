#!/usr/bin/env bash
# The demo: create a virtualenv (the one scripts/test.sh uses), install dagster-taskiq with the
# embedded Redis, and run the example job end to end on two local worker processes. Needs only
# Python 3.10+ and this checkout. Arguments go to `dagster-taskiq demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DAGSTER_TASKIQ_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "demo: creating the virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "demo: installing dagster-taskiq[embedded,rabbitmq] into $VENV (the first time takes a minute)"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e ".[embedded,rabbitmq]"
exec "$VENV/bin/dagster-taskiq" demo "$@"
