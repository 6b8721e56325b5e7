#!/usr/bin/env bash
# The whole GPU check in one command (benchmarks/gpu_check.py says what it runs and writes):
#
#   bash benchmarks/gpu_check.sh                          # CUDA: meant to take under 8 minutes on one H100
#   bash benchmarks/gpu_check.sh --device cpu --quick     # each step small, on the CPU: checks the script
#   RESULTS_DIR=/some/folder bash benchmarks/gpu_check.sh # JSON files and log there (default benchmarks/results)
#
# Nothing is downloaded. On a machine without pytorchcv or pyhocon, put their wheels (and pyparsing's) in
# .whl/ beside this folder (docs/speed.md, GPU): they are installed into a temporary folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/granq_site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 benchmarks/gpu_check.py "$@"
