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
