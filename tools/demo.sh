#!/usr/bin/env bash
# The main job on the embedded default model: install, convert Q4_1 -> Q4_0 with theta, compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
.venv/bin/nkat-gguf convert --input default --outtype Q4_0 --theta-rank 8 --output models/smollm2-q4_0.nkat.gguf
.venv/bin/nkat-gguf compare --model models/smollm2-q4_0.nkat.gguf "$@"
