"""Errors the person running seqrec can fix, as opposed to bugs.

``seqrec`` (the command line) prints a :class:`UserError` as one line ``seqrec: error: ...`` and
exits with status 2 (``-v`` adds the traceback); any other exception is a bug and keeps its
traceback. Each class also derives from the built-in exception it refines, so code that catches
``ValueError`` or ``FileNotFoundError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Something about the command, its configuration or its data that the user must change."""


class ConfigError(UserError, ValueError):
    """A configuration file, ``--set`` override or argument that cannot be used."""


class InputError(UserError, ValueError):
    """Input that no row-level quarantine can fix: missing columns, wrong types, no data."""


class NotFoundError(UserError, FileNotFoundError):
    """Something the job needs is not under the storage root (or on disk): run the step that makes it."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency (a ``pip install 'seqrec[...]'`` extra) that this setting needs."""
