"""``python benchmarks/graph_probe.py ...`` runs the graph probe, ``checks/graph_probe.py`` (its home: checks/ holds
the correctness probes, benchmarks/ the timings), with the same arguments."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checks.graph_probe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
