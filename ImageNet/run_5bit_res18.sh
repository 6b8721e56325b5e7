#!/usr/bin/env bash
# GranQ, ImageNet, ResNet-18, W5A5. Extra arguments go to main.py, e.g. --set dataPath=/data/imagenet
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" imagenet_res18 5 "$@"
