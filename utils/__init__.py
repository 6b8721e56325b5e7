"""Shared zero-shot QAT machinery: config, models, data, generator, losses, trainer and command line."""
