"""Errors raised on bad input. Every message names the file, and the key, offset, line or value."""
from __future__ import annotations

import difflib
import os
from typing import Any, Sequence


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


def validation_message(exc: Any, options: Sequence[str] = (), flags: bool = False) -> str:
    """A pydantic ``ValidationError`` as one line, one clause per problem: ``option 'lr': Input
    should be greater than 0 (got -1.0); option 'netwrk': is not an option; did you mean network?``.
    ``options``: the valid names, for suggestions on unknown ones. ``flags``: name each option as its
    command-line flag (``--min-images: ...``) instead."""
    clauses = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc)
        message = str(err["msg"]).removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(where, list(options), n=3)
            message = "is not an option" + (f"; did you mean {', '.join(close)}?" if close else "")
        shown = "" if isinstance(value, dict) or hasattr(value, "model_fields") or "given" in message \
            or repr(value) in message else f" (got {value!r})"
        if not where:
            clauses.append(message)
        elif flags:
            clauses.append(f"--{loc[0].replace('_', '-')}: {message}{shown}")
        else:
            clauses.append(f"option {where!r}: {message}{shown}")
    return "; ".join(clauses)
