#!/usr/bin/env bash
# GranQ, CIFAR-100, ResNet-20, W3A3. Extra arguments go to main.py, e.g. --set nEpochs=1
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" cifar100_resnet20 3 "$@"
