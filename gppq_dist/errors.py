"""Errors that are the user's to fix.

Every ``UserError`` reaches the terminal as one line (``error: ...``) with exit code 2 and
no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input (config, file, argument) that the user can correct."""


class ConfigError(UserError):
    """A config file that is missing, malformed, or asks for something impossible."""


class ArtifactError(UserError):
    """A ``.gppq`` artifact that cannot be read: truncated, corrupt, or of another format."""


class DataError(UserError):
    """A data folder that is missing or not in the expected layout."""


class ExportError(UserError):
    """An export that cannot be made as asked: a missing optional package, an unsupported
    opset, a codec without a decoder in the target format."""
