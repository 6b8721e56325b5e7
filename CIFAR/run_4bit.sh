#!/usr/bin/env bash
# GranQ, CIFAR-10, ResNet-20, W4A4. Extra arguments go to main.py, e.g. --set nEpochs=1
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" cifar10_resnet20 4 "$@"
