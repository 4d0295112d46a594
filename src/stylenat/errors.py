"""Errors a user can cause and fix, as opposed to bugs.

Everything the library raises because of its input (a bad path, an impossible configuration, a
corrupt file, unreadable data) is a :class:`UserError`: the command line prints it as one line that
says what to do, and exits with status 2. Any other exception is a bug and keeps its traceback.
``STYLENAT_DEBUG=1`` shows the traceback of user errors too.

The subclasses also derive from the built-in exception a caller would expect (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "ModelFileError", "MissingFileError", "DownloadError", "first_line"]


class UserError(Exception):
    """An error in the input that the user can fix; its message says how."""


class ConfigError(UserError, ValueError):
    """An impossible or ill-typed configuration value (names the field)."""


class DataError(UserError, ValueError):
    """Images or datasets that cannot be used (names the file)."""


class ModelFileError(UserError, ValueError):
    """A model, checkpoint or latent file that is corrupt, truncated or of the wrong kind."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class DownloadError(UserError, OSError):
    """A download that failed (an HTTP error, a dropped connection, a wrong checksum) or is not allowed (offline)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), to quote inside a one-line error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
