#!/usr/bin/env bash
# The whole GPU check in one command (benchmarks/gpu_check.py says what it runs and writes):
#
#   bash benchmarks/gpu_check.sh                          # CUDA: meant to take under 8 minutes on one H100
#   bash benchmarks/gpu_check.sh --device cpu --quick     # each step small, on the CPU: checks the script
#   RESULTS_DIR=/some/folder bash benchmarks/gpu_check.sh # JSON files and log there (default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/wheels.sh
exec python3 benchmarks/gpu_check.py "$@"
