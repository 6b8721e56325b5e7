#!/usr/bin/env bash
# Usage: ImageNet/run.sh CONFIG BITS [main.py arguments...]
# Runs ImageNet/main.py with ImageNet/CONFIG.hocon at W{BITS}A{BITS}; ID (default 1) picks the seed (ID + 1).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="$1" bits="$2"
shift 2
exec "${PYTHON:-python3}" "$here/main.py" --conf_path "$here/$config.hocon" --id "${ID:-1}" --qw "$bits" --qa "$bits" "$@"
