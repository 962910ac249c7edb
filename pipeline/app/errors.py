"""Errors in what the user gave: reported by ``ats-wsi`` in one line, exit status 2.

Library code raises these (or ``FileNotFoundError`` / ``readers.SlideError``) for bad
input, so that the command line can tell a user's mistake from a bug: any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a path, a CSV, an option); the message says which.

    A ``ValueError``, as Python callers expect of a bad argument."""


class ConfigError(UserError):
    """A configuration value that is out of range or inconsistent."""
