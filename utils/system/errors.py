"""Errors meant for the person running the command: printed as one line, without a traceback."""

import sys


class UserError(Exception):
    """Bad input a user can fix: the message names the key, value or path, and the fix."""


class ConfigError(UserError):
    """A configuration key is unknown, of the wrong type or out of range."""


def report_errors(command) -> int:
    """Run ``command()`` for a tool's ``main``: 0, or 2 after one ``error:`` line for bad input or a file error."""
    try:
        command()
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
