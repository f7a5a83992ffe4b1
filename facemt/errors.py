"""The one exception type that user-caused problems raise."""

from __future__ import annotations


class FacemtError(Exception):
    """A problem the user can fix: bad path, unreadable image, bad option, offline hub.

    The message says what was wrong and what to do; the CLI prints it as one
    line and exits with status 2.
    """
