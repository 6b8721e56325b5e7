"""Build the pool of synthetic images that a config's runs read (``image_source = pool``) ahead of them.

    python tools/synthesize.py --conf_path CIFAR/cifar10_resnet20a.hocon --set recipe=synq [--set key=value ...]

See utils/runs/synthesize_cli.py and docs/methods.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.runs.synthesize_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
