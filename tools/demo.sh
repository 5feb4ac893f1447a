#!/usr/bin/env bash
# The main job on the embedded default model: install, convert with no options (the default the frontier
# run chose, BENCHMARKS.md "This session"), compare theta off/on against the Q4_1 input.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
.venv/bin/nkat-gguf convert --input default --output models/smollm2.nkat.gguf
.venv/bin/nkat-gguf compare --model models/smollm2.nkat.gguf "$@"
