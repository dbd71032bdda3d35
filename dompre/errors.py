"""The one exception type for mistakes a user can fix: a bad path, recipe value, flag or input file.

``dompre`` commands report a :class:`UserError` (and missing or unreadable files: ``FileNotFoundError``,
``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``) as one line naming the file and the fix, with
exit status 2. Anything else is a bug in dompre or a library and keeps its traceback. ``UserError`` subclasses
``ValueError`` so that library callers catching ``ValueError`` keep working; :class:`UnknownName` also
subclasses ``KeyError`` for lookups of names the user gave (labels, layers, metrics).
"""
from __future__ import annotations

__all__ = ["REPORTED", "UnknownName", "UserError"]


class UserError(ValueError):
    """Input the user can fix; the message names what was wrong, where, and the fix."""


class UnknownName(UserError, KeyError):
    """A name the user gave (label, layer, term, metric) that is not among the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# what a command reports as one line (exit 2): the user's mistakes and the user's files missing or unreadable
REPORTED = (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
