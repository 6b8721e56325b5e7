#!/usr/bin/env bash
# Every ImageNet cell of the paper's tables (plan tools/plans/imagenet.hocon) with the official settings
# and 3 seeds. Rerun to continue where it stopped. Extra arguments go to tools/reproduce.py, e.g.
#   bash run_all_imagenet.sh --gpus 0,1,2,3 --set dataPath=/data/imagenet
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/tools/reproduce.py" --plan imagenet --seeds 1 2 3 "$@"
