"""A copy of everything the run prints, kept in the run dir (``train.log``).

Hydra's own ``<job>.log`` holds only what goes through :mod:`logging`; progress lines, warnings
and the final error paragraph are printed, so without this copy they live only in a terminal
(or a SLURM output file) that is easily lost.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from pathlib import Path
from typing import IO, Any, Iterator


class _Tee:
    """A text stream that writes to ``stream`` and to ``copy``; everything else is ``stream``'s."""

    def __init__(self, stream: IO[str], copy: IO[str]):
        self._stream = stream
        self._copy: IO[str] | None = copy

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        if self._copy is not None:
            try:
                self._copy.write(text)
            except (OSError, ValueError):
                # A full disk or a closed file must not take the training run down with it.
                self._copy = None
        return written

    def flush(self) -> None:
        self._stream.flush()
        if self._copy is not None:
            with contextlib.suppress(OSError, ValueError):
                self._copy.flush()

    def detach_copy(self) -> None:
        """Stop copying: a reference kept past the ``with`` block then only reaches ``stream``."""
        self._copy = None

    def __getattr__(self, name: str) -> Any:
        # encoding, isatty(), fileno() ...: callers asking about the terminal get the terminal.
        return getattr(self._stream, name)


def _logging_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def tee_console(path: Path) -> Iterator[Path]:
    """While active, copy all that is written to ``sys.stdout`` and ``sys.stderr`` into ``path``.

    The terminal still gets everything. The file is appended to (a resumed run continues its log)
    and line-buffered, so a crash loses at most a partial line. Logging handlers that already hold
    one of the two streams (Hydra sets its console handler up before the task runs, and a handler
    keeps the stream object it was given) are pointed at the copying stream too. An exception
    leaving the block (other than ``SystemExit``) is written to the file with its traceback, since
    the interpreter or Hydra reports it only after the streams are restored. Nesting is safe: an
    inner block copies into its file and then into the outer one's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    saved_out, saved_err = sys.stdout, sys.stderr
    tee_out, tee_err = _Tee(saved_out, file), _Tee(saved_err, file)
    swapped = [(h, h.stream) for h in _logging_handlers()
               if h.stream is saved_out or h.stream is saved_err]
    sys.stdout, sys.stderr = tee_out, tee_err  # type: ignore[assignment]
    for handler, stream in swapped:
        handler.setStream(tee_out if stream is saved_out else tee_err)  # type: ignore[arg-type]
    try:
        yield path
    except SystemExit as stop:
        # sys.exit is a decision, not a failure: its traceback would be noise. Python prints a
        # text exit code to stderr after the streams are restored, so that text is copied here.
        if isinstance(stop.code, str):
            with contextlib.suppress(OSError, ValueError):
                file.write(stop.code + "\n")
        raise
    except BaseException as err:
        with contextlib.suppress(OSError, ValueError):
            file.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        raise
    finally:
        # Restore only what is still ours: whoever replaced a stream after us owns it now.
        if sys.stdout is tee_out:
            sys.stdout = saved_out
        if sys.stderr is tee_err:
            sys.stderr = saved_err
        for handler, stream in swapped:
            if handler.stream is tee_out or handler.stream is tee_err:
                handler.setStream(stream)
        tee_out.detach_copy()
        tee_err.detach_copy()
        with contextlib.suppress(OSError, ValueError):
            file.close()
