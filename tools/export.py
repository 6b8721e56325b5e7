"""Export a saved student: packed integer weights (student.safetensors) and an ONNX model (student.onnx).

    python tools/export.py RUN_DIR|STUDENT_FILE [--output DIR] [--which best|last] [--format packed onnx]

See utils/runs/export_cli.py and docs/export.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.runs.export_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
