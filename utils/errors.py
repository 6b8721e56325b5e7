"""Errors meant for the person running the command: printed as one line, without a traceback."""


class UserError(Exception):
    """Bad input a user can fix: the message names the key, value or path, and the fix."""


class ConfigError(UserError):
    """A configuration key is unknown, of the wrong type or out of range."""
