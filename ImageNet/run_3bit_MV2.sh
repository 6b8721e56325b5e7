#!/usr/bin/env bash
# GranQ, ImageNet, MobileNetV2, W3A3. Extra arguments go to main.py, e.g. --set dataPath=/data/imagenet
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" imagenet_MV2 3 "$@"
