#!/usr/bin/env bash
# Whether CUDA graphs can be the default, in one window of GPU time (benchmarks/gpu_verify.py says what it runs):
#
#   bash benchmarks/gpu_verify.sh                          # CUDA: meant to take under 8 minutes on one H100 or H200
#   bash benchmarks/gpu_verify.sh --device cpu --quick     # each step small, on the CPU: checks the script
#   RESULTS_DIR=/some/folder bash benchmarks/gpu_verify.sh # JSON and log there (default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/wheels.sh
exec python3 benchmarks/gpu_verify.py "$@"
