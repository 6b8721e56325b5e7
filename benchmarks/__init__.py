"""Speed benchmarks: ``python benchmarks/quantizer_speed.py`` and ``python benchmarks/train_step.py``."""
