"""The exception the data pipeline raises for bad input, and its kind for a faulty source."""
from __future__ import annotations


class DataError(ValueError):
    """Missing, half-written or inconsistent data, with a message that names the fix.

    Subclasses ValueError so callers that already catch ValueError for bad configuration keep
    working; the training engine catches it to print the message without a traceback.
    """


class SourceError(DataError):
    """The source's own content cannot be prepared as asked (text that is not UTF-8, a row
    without its text field, no documents at all, ...).

    Re-running the same prepare would meet the same fault, so it is no interruption to resume
    from: ``data.prepare`` removes what it wrote before re-raising it, and a corrected re-run
    starts clean.
    """
