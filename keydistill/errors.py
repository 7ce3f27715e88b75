"""The library's errors: one base, so a caller can catch every error keydistill raises on purpose.

A command line (keydistill.cli.run_command) prints each of them as one `error:` line without a traceback.
The old import paths stay: keydistill.data.DataError, keydistill.ops.BackendUnavailable,
keydistill.train.RunError and keydistill.train.ConfigError are these classes.
"""

from __future__ import annotations


class KeydistillError(Exception):
    """Base of every error keydistill raises on purpose."""


class UsageError(KeydistillError):
    """A command line that cannot be read: an unknown flag, a missing or malformed value."""


class InputError(KeydistillError):
    """A file, folder or device named on the command line that cannot be used (predict's, export's)."""


class DataError(KeydistillError):
    """Unusable input data; the message says where (file:line:column) and what is wrong."""


class RunError(KeydistillError):
    """A run that cannot go on as asked; the command line prints it on one line, without a traceback."""


class ConfigError(RunError):
    """An impossible or contradictory setting."""


class BackendUnavailable(KeydistillError, RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to get it."""
