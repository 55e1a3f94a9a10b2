"""The one exception bad user data raises (a ValueError, so old `except ValueError` still works)."""
from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or unreadable user data; the message names the file, line (or row) and field."""
