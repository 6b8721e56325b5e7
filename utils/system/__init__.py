"""The ground floor: errors meant for users, devices and backends, torchrun, file locks, atomic writes, signals.

Nothing here knows of models, data or training; this package imports only the standard library, torch and
``filelock``, so every other package may import it.
"""
