#!/usr/bin/env bash
# GranQ on CIFAR-10, ResNet-20, W3A3 (the paper's headline setting). Extra arguments go to main.py.
exec bash "$(dirname "${BASH_SOURCE[0]}")/CIFAR/run_3bit.sh" "$@"
