"""Many runs: plans (``tools/plans/*.hocon``) expanded into cells, each cell's state, lock, log and process
(``cells``), and two launchers built on cells that never import each other: ``local`` (``--jobs`` at a time on this
machine) and ``slurm`` (through submitit). ``reproduce_cli`` is ``tools/reproduce.py``'s command line. The top
floor: it may import every other package, and none imports it.
"""
