"""Per-layer, per-channel activation ranges of a teacher and the error of layer-wise, channel-wise and GranQ
quantization (the act_modes ``layerwise``, ``channel`` and ``granq``).

    python tools/activation_ranges.py --conf_path CIFAR/cifar10_resnet20.hocon [--set key=value ...]
        [--source real|generator|noise] [--run RUN_DIR] [--bits 4] [--batch-size 64] [--output-dir DIR]

See utils/runs/activation_ranges_cli.py and docs/tools.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.runs.activation_ranges_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
