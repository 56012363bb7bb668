"""Data pipeline: corpora -> token bins (``data.prepare``), bins -> batches (``data.loader``).

Depends on numpy / tiktoken / datasets (and torch for the loader); never imports ``model``,
``sophia`` or ``engine``. The loader (and torch) loads lazily so that tokenizer worker processes
stay light. ``prepare`` lives in ``data.prepare``, a module of the same name, so it is not
re-exported here.
"""
from __future__ import annotations

from data.errors import DataError
from data.tokenizers import TOKENIZERS, get_tokenizer

__all__ = ["DataError", "TOKENIZERS", "get_tokenizer", "TokenLoader"]


def __getattr__(name: str):
    if name == "TokenLoader":
        from data.loader import TokenLoader

        return TokenLoader
    raise AttributeError(f"module 'data' has no attribute {name!r}")
