"""Typed errors the engine raises; the server maps each to a status once (one exception-to-status mapper)."""

from __future__ import annotations


class VaceError(Exception):
    """Base class for errors whose message is safe and useful to show to the user."""


class InputError(VaceError):
    """A user input (named by `field`) cannot be used: unreadable, wrong kind, too large, refused URL."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ModelNotFoundError(VaceError):
    """Weights for a model are not available locally (and could not be fetched)."""


class JobCancelled(VaceError):
    """The job was cancelled by request; nothing was written."""


class OutOfMemory(VaceError):
    """The GPU ran out of memory for this job."""
