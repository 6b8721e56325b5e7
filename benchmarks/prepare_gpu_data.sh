#!/usr/bin/env bash
# Copy what the full_run step of benchmarks/gpu_check.sh needs into .gpu_data/ (ignored by git), so that it
# travels with the project to a GPU machine, where ../shared is not beside it:
#
#   bash benchmarks/prepare_gpu_data.sh                 # from ../shared/data
#   SHARED_DATA=/path/to/data bash benchmarks/prepare_gpu_data.sh
#
# .gpu_data/cifar10-test-jpeg/test   the CIFAR-10 test set as JPEGs (about 40 MB)
# .gpu_data/weights/akamaster_resnet20-12fca82f.th   the option-A ResNet-20 teacher (about 1 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${SHARED_DATA:-../shared/data}"
for need in "$src/cifar10-test-jpeg/test" "$src/weights/akamaster_resnet20-12fca82f.th"; do
    [ -e "$need" ] || { echo "error: $need is missing (set SHARED_DATA to the folder that holds it)" >&2; exit 2; }
done
mkdir -p .gpu_data/cifar10-test-jpeg .gpu_data/weights
cp -r "$src/cifar10-test-jpeg/test" .gpu_data/cifar10-test-jpeg/
cp "$src/weights/akamaster_resnet20-12fca82f.th" .gpu_data/weights/
echo "copied into .gpu_data/: $(find .gpu_data -type f | wc -l) files, $(du -sh .gpu_data | cut -f1)"
