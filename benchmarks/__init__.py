"""Timings: ``python benchmarks/quantizer_speed.py``, ``python benchmarks/train_step.py`` and the others here; the
correctness probes are in ``checks/``."""
