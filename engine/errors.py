"""One exception type for problems a user can fix, printed as a paragraph instead of a traceback."""
from __future__ import annotations


class HarnessError(Exception):
    """A problem with the user's input or environment: the message names it and the fix."""
