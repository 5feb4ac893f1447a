#!/usr/bin/env bash
# Makes PostgreSQL's server programs available to the optimizer's multi-worker test, which starts its own
# throwaway server on 127.0.0.1 (tests/pg_server.py). Idempotent: installs Debian's postgresql only when
# neither the package nor initdb/pg_ctl is there. Never fails the caller: without a server the test skips,
# or fails under CI=true.
set -uo pipefail

have_server() {
  ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { command -v initdb && command -v pg_ctl; } >/dev/null 2>&1
}

if have_server; then
  exit 0
fi
if dpkg -s postgresql >/dev/null 2>&1; then
  echo "postgres_for_tests: postgresql is installed but initdb/pg_ctl were not found" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "postgres_for_tests: PostgreSQL server missing; install it (Debian/Ubuntu: apt-get install postgresql)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends postgresql; } >/tmp/postgres_for_tests.log 2>&1; then
  echo "postgres_for_tests: apt-get install postgresql failed (see /tmp/postgres_for_tests.log)" >&2
fi
have_server || echo "postgres_for_tests: PostgreSQL server still missing after installing" >&2
exit 0
