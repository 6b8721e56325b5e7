#!/usr/bin/env bash
# GranQ on CIFAR-100, ResNet-20, W3A3. Extra arguments go to main.py.
exec bash "$(dirname "${BASH_SOURCE[0]}")/CIFAR/run_3bit_cifar100.sh" "$@"
