"""Atomic file writes: a reader sees the old file or the whole new one, never a partial one.

Every file the harness rewrites in place (checkpoints, summary.json, meta.json, the sweep table,
cached downloads) goes through :func:`atomic_write`. It lives in ``data/``, the lowest layer, so
that data, model, engine, evals and the scripts can all use the one implementation.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing (``mode`` "w" or "wb"); when the block
    ends without an exception, flush it to disk and rename it over ``path``.

    The temporary name is unique per call (two processes writing the same file never share one),
    and on any exception, a full disk included, the partial file is removed before the exception
    propagates, so a failed write leaves the directory as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode={mode!r}: use 'w' (text) or 'wb' (bytes)")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``path`` replaced by ``text`` (UTF-8) atomically; returns the path."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """``path`` replaced by ``data`` atomically; returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)
