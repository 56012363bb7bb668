"""The one exception type the data pipeline raises for bad input."""
from __future__ import annotations


class DataError(ValueError):
    """Missing, half-written or inconsistent data, with a message that names the fix.

    Subclasses ValueError so callers that already catch ValueError for bad configuration keep
    working; the training engine catches it to print the message without a traceback.
    """
