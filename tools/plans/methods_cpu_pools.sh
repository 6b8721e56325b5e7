#!/usr/bin/env bash
# The pools of tools/plans/methods_cpu.hocon, synthesised ahead of its cells: SynQ's (1,280 images, 250 steps each)
# and ZeroQ's (its recipe's 64 images, 500 steps) for each shared teacher, two at a time with one thread each. Each
# pool's summary (synthesis seconds, final BN-statistics loss, teacher accuracy on the assigned labels) is printed and
# kept in its cache folder; the cells then read them.
set -euo pipefail
cd "$(dirname "$0")/../.."
weights=../shared/data/weights
pool() {  # config, teacher weights, recipe, extra overrides
    OMP_NUM_THREADS=1 python tools/synthesize.py --conf_path "$1" --set "teacher_weights=$weights/$2" --set "recipe=$3" \
        "${@:4}"
}
for recipe in synq zeroq; do
    sizes=()
    [ "$recipe" = synq ] && sizes=(--set pool_size=1280 --set pool_iters=250)
    pool CIFAR/cifar10_resnet20a.hocon akamaster_resnet20-12fca82f.th "$recipe" "${sizes[@]}" & first=$!
    pool CIFAR/cifar10_resnet20.hocon resnet20_cifar10_pytorchcv_jpeg.pth "$recipe" "${sizes[@]}" & second=$!
    wait "$first"
    wait "$second"
done
