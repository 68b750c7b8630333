"""Errors that name what went wrong and where, so a user can fix the input without a debugger."""
from __future__ import annotations


class DHumorError(Exception):
    """Base class of every error dhumor raises on purpose."""


class DataError(DHumorError):
    """A bad input record: names the file, the row (when there is one) and the reason."""

    def __init__(self, file: object, reason: str, row: int | None = None):
        self.file, self.row, self.reason = str(file), row, reason
        where = f"{self.file}:{row}" if row is not None else self.file
        super().__init__(f"{where}: {reason}")


class ImageError(DataError):
    """An image that cannot be used (missing, empty, truncated, not an image, too large...)."""


class WeightsNotFoundError(DHumorError):
    """Pretrained weights were asked for but cannot be found; the message says how to get them."""


class CheckpointError(DHumorError):
    """A checkpoint that cannot be loaded (missing, wrong format, pickled code)."""


# Exit codes of the `dhumor` command (documented in the README):
EXIT_OK = 0  # every input processed
EXIT_INTERNAL = 1  # an unexpected error (a bug): the traceback is shown
EXIT_USAGE = 2  # a configuration or usage error, found before any model loads; one line names the fix
EXIT_ROWS_FAILED = 3  # the batch finished, every row was written, but some rows are errors
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: rows written so far are kept; rerun to continue


class ConfigError(DHumorError):
    """A configuration problem found before work starts; the message names the fix (exit code 2)."""


class InvalidValueError(ConfigError, ValueError):
    """A setting or argument with a value dhumor cannot use (also a ValueError, for callers that catch one)."""


class UnknownNameError(ConfigError, KeyError):
    """An unknown name (encoder, task schema, label); also a KeyError, for callers that catch one."""

    __str__ = Exception.__str__  # the message as written, not KeyError's quoted repr


class MissingConfigFileError(ConfigError, FileNotFoundError):
    """A file a setting names is not there (prompt files); also a FileNotFoundError."""
