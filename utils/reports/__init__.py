"""What finished runs say: results tables from their summaries, plots of their metrics, the published numbers
they are compared with, and activation-range statistics. Imports :mod:`utils.system`, :mod:`utils.training`
(to read metrics files) and ``quantization_utils``.
"""
