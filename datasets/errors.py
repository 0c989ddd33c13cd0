"""Errors raised on bad input. Every message names the file, and the key, offset, line or value."""
from __future__ import annotations

import os


class FormatError(ValueError):
    """A file does not have the layout its format requires.

    ``FormatError(path, what, expected=...)`` renders as
    ``"<path>: <what> (expected <expected>)"`` so the user sees which file and which record.
    """

    def __init__(self, path: str | os.PathLike | None, what: str, expected: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.what = what
        self.expected = expected
        msg = what if self.path is None else f"{self.path}: {what}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)


class UnsafePickleError(FormatError):
    """A pickle asked for a global that the restricted unpickler does not allow."""
