"""One run from the command line: the typed options (``options``) and reading them from hocon, ``--set`` and
recipes (``config``), ``main.py``'s arguments, setting up and resuming a run, a saved run's options with ``--set``
overrides and evaluating a saved student (``--eval``), and the command lines of the tools that read a config or a
saved run (``export_cli``, ``activation_ranges_cli``, ``published_table_cli``, ``synthesize_cli``). Imports every
package below it: system, models, data, training, reports and export.
"""
