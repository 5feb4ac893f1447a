#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
# The optimizer's multi-worker test starts its own PostgreSQL on 127.0.0.1; this makes the server available.
bash tools/postgres_for_tests.sh
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
