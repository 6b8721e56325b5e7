"""Zero-shot QAT on ImageNet (ResNet-18, ResNet-50, MobileNetV2). See utils/runs/run.py for the options."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.runs.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
