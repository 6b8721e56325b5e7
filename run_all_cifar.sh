#!/usr/bin/env bash
# Every CIFAR-10/100 cell of the paper's tables (plan tools/plans/cifar.hocon) with the official settings
# and 3 seeds. Rerun to continue where it stopped. Extra arguments go to tools/reproduce.py, e.g.
#   bash run_all_cifar.sh --gpus 0,1,2,3
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/tools/reproduce.py" --plan cifar --seeds 1 2 3 "$@"
