"""Errors that reach the user as one clear line: what is wrong and how to fix it.

Experiments catch `UserFacingError` at the edge and print its message without a traceback.
"""


class UserFacingError(Exception):
    """Base class: the message alone must tell the user the problem and the fix."""


class DataError(UserFacingError):
    """Missing, unreadable or malformed data."""


class ConfigError(UserFacingError, ValueError):
    """A configuration value that cannot work."""


class CheckpointError(UserFacingError):
    """A checkpoint that cannot be read or does not match the run."""
