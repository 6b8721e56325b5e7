"""What finished runs say: results tables from their summaries, plots of their metrics, the published numbers
they are compared with, and activation-range statistics; ``results_table_cli`` and ``plot_run_cli`` are the
command lines of ``tools/results_table.py`` and ``tools/plot_run.py``. Imports :mod:`utils.system`,
:mod:`utils.training` (to read metrics files) and ``quantization_utils``.
"""
