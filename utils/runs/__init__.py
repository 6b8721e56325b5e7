"""One run from the command line: the typed config (hocon plus ``--set``), ``main.py``'s arguments, setting up and
resuming a run, and evaluating a saved student (``--eval``). Imports every package below it: system, models,
data, training and reports.
"""
