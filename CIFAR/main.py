"""Zero-shot QAT on CIFAR-10/100. See utils/runs/run.py for the options."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.runs.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
