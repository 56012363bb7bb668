"""Tokenize a corpus into ``train.bin`` / ``val.bin`` / ``meta.json``.

    python -m data.prepare openwebtext                       # -> prepared/openwebtext-gpt2
    python -m data.prepare stdlib --tokenizer byte           # offline corpus, no download
    python -m data.prepare input.txt --split-blank-lines --val-fraction 0.1 --out prepared/shk
    python -m data.prepare shakespeare --tokenizer byte      # nanoGPT's shakespeare_char split

Documents are tokenized in parallel (``--workers`` processes) in fixed-size chunks whose results
are consumed in submission order, so the output is byte-identical for any worker count, and only
a bounded window of chunks is ever in flight, so memory stays bounded.

The split (``--val-split``, ``val_split``):

* ``documents``: each document goes to ``val`` with probability ``val_fraction`` through a hash of
  (seed, document index): deterministic, and it needs no pass over the data to decide.
* ``tail``: the token stream (every document and its EOT, in source order) is cut in two, as
  nanoGPT cuts ``input.txt``: ``val`` is its last ``round(val_fraction * n)`` tokens, ``train``
  the first ``n - round(val_fraction * n)``, both in order (``tail_sizes``). Everything is written
  to ``train.bin.tmp`` first; at the end the last tokens are copied to ``val.bin.tmp`` in bounded
  pieces and train is cut to its share, so memory stays bounded here too. A document counts for
  the split holding its EOT.
* ``auto`` (the default): ``documents``, unless the source has fewer non-empty documents (after
  ``max_docs``) than ``auto_min_documents(val_fraction, seed)``, that is
  ``max(ceil(2 / val_fraction), i + 1)`` with ``i`` the index of the first document the hash
  sends to val; then ``tail``, with a warning.
  So val expects at least two documents and gets at least one, or the split is by tokens: a
  single text file read whole gets nanoGPT's split. Deciding reads at most that many documents
  ahead (none when the source knows its count).

meta.json records the split used as ``val_split`` (and the one asked for as
``val_split_requested``); ``settings`` records the split used, never ``auto``, so a folder split
one way is refused when another way is asked for, and ``auto`` is compared as what it means for
that folder's document count.

Defaults follow the training configs (configs/data/*.yaml), so a prepare by hand and a training
run that prepares on its own agree on one split: ``--val-fraction`` is the source's registered
one (``data.sources.default_val_fraction``; 0.01 for a source without one), the seed is 2357 and
the output folder ``prepared/<source name>-<tokenizer>``.

Settings: meta.json records under ``settings`` everything that decides the prepared bytes: the
source's own settings (``data.sources.Source.settings``: a local source's file fingerprint and
the options its readers honour, the stdlib's Python version, a Hugging Face id, revision, split,
...), the tokenizer, val_fraction, val_split, seed and max_docs. Preparing into a folder that
already holds a complete prepare:

* same settings: skipped; checking costs a ``stat`` of the source files, nothing is read;
* different settings, a different source, or source files edited since: refused with a
  ``DataError`` listing each difference as ``name: existing -> requested``, because overwriting
  would silently re-split data that runs and checkpoints may already depend on. ``--force``
  (``force=True``) replaces it; ``--out`` picks another folder.

``ensure_prepared`` makes the same check for the training engine, in its terms: it returns the
meta of a matching prepare, refuses a different one naming the ``data.<key>`` settings that
differ, and prepares a missing folder when allowed, or else names the exact ``python -m
data.prepare`` command to run.

Interruptions: the bins are written under temporary names and meta.json only appears once they are
complete. A state file records, after each fsync, how many documents are safely on disk, so
re-running the same command resumes from there instead of starting over. An unfinished prepare
whose settings differ from the requested ones is not resumed but restarted from scratch, with a
warning that lists the differences: its partial bins never had a meta.json, so nothing could have
trained on them. ``prepare(on_progress=...)`` reports each chunk written (``PrepareProgress``).
A fault of the source itself (``data.errors.SourceError``: text that is not UTF-8, no documents,
a row without its text field) is no interruption, since resuming would meet it again: the prepare
removes what it wrote, so the folder is as it was and a corrected re-run starts clean.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import shlex
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from data.bins import (FORMAT_VERSION, LOCK_NAME, META_NAME, SPLITS, STATE_NAME,
                       atomic_write_json, bin_path, check_bin, read_meta, tmp_bin_path)
from data.files import fsync_dir, write_bytes_atomic
from data.errors import DataError, SourceError
from data.sources import (DEFAULT_VAL_FRACTION, IMPLIED_SETTINGS, SOURCE_OPTIONS, SOURCES,
                          TEXT_ERRORS, Source, _digest, default_val_fraction, resolve_source,
                          source_choices, source_defaults, source_options)
from data.tokenizers import TOKENIZERS, get_tokenizer

log = logging.getLogger("data.prepare")

# Chunking and checkpoint cadence. Module-level so tests can shrink them.
CHUNK_CHARS = 1 << 20  # characters per chunk of documents sent to a worker
CHUNK_DOCS = 1024  # ... or this many documents, whichever comes first
CHECKPOINT_SECONDS = 30.0  # how often the resume state is made durable
CHECKPOINT_CHUNKS = 256  # ... or every this many chunks

# How val is cut out of the token stream (see ``_choose_val_split`` for "auto").
VAL_SPLITS = ("auto", "documents", "tail")
# "auto" keeps the per-document split only when val can expect this many documents.
AUTO_MIN_EXPECTED_VAL_DOCS = 2
TAIL_COPY_TOKENS = 1 << 22  # tokens per read when the tail split copies val out of the stream

# What ``ensure_prepared`` passes on to ``prepare``. ``force`` is deliberately absent: training
# must never overwrite prepared data; that takes an explicit `python -m data.prepare ... --force`.
_ENSURE_OPTIONS = frozenset(SOURCE_OPTIONS + ("max_docs", "val_split", "workers", "progress",
                                              "on_progress"))
# Recorded settings that are prepare() parameters, hence also keys of the training config's data
# group; the others (source_fingerprint, python) are facts about the source.
_PARAMETER_KEYS = frozenset(("source", "tokenizer", "val_fraction", "val_split", "seed",
                             "max_docs") + SOURCE_OPTIONS)
# The CLI's flag for a source option where it is not "--" + the name with dashes.
_CLI_FLAGS = {"hf_data_files": "--data-files"}
# Order of the lines that list differences: the source first, as it explains most of the rest.
_KEY_ORDER = ("source", "source_fingerprint", "follow_symlinks", "python", "hf_id", "revision",
              "hf_name", "hf_data_dir", "hf_data_files", "split", "text_column",
              "split_blank_lines", "errors", "tokenizer", "val_fraction", "val_split", "seed",
              "max_docs")
_NOTES = {
    "source_fingerprint": "the source files' names, sizes or modification times changed since "
                          "they were prepared",
    "python": "the stdlib corpus is the running Python's standard library",
}


@dataclass(frozen=True)
class PrepareProgress:
    """How far a prepare is, passed to ``prepare(on_progress=...)``.

    ``stage`` is ``"documents"`` after each chunk of documents is written (``done`` documents so
    far, those of an interrupted run it resumes included, of ``total``, None when the source does
    not know its count), or ``"tail"`` while the tail split copies val out of the token stream
    (``done`` of ``total`` val tokens). An exception raised by the callback stops the prepare like
    any interruption: re-running the same prepare resumes it."""

    stage: str
    done: int
    total: int | None


ProgressCallback = Callable[[PrepareProgress], None]


def default_workers() -> int:
    """Half the cores (nanoGPT's rule of thumb: the source reader needs a core too), at least 1."""
    return max(1, (os.cpu_count() or 1) // 2)


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    tokenizer: str = "gpt2",
    *,
    val_fraction: float | None = None,
    seed: int = 2357,
    workers: int | None = None,
    text_column: str | None = None,
    revision: str | None = None,
    split: str | None = None,
    max_docs: int | None = None,
    split_blank_lines: bool | None = None,
    val_split: str = "auto",
    hf_id: str | None = None,
    hf_name: str | None = None,
    hf_data_dir: str | None = None,
    hf_data_files: str | list[str] | None = None,
    errors: str | None = None,
    follow_symlinks: bool | None = None,
    force: bool = False,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Prepare ``source`` into ``out_dir`` and return its meta (see the module docstring).

    ``out_dir`` defaults to ``prepared/<source name>-<tokenizer>`` under the current directory and
    ``val_fraction`` to the source's default (``data.sources.default_val_fraction``).
    ``val_split`` is ``documents`` (each document to val with probability ``val_fraction``),
    ``tail`` (the last ``round(val_fraction * tokens)`` tokens, as nanoGPT splits a text file) or
    ``auto`` (``documents`` unless the source has too few documents; ``auto_min_documents``).
    The source options (text_column ... follow_symlinks, ``data.sources.SourceOptions``) left
    None take the source's defaults: text_column "text", split "train", one document per .txt
    file, local text that is not UTF-8 refused (``errors="replace"`` accepts it), symbolic links
    out of a source folder refused (``follow_symlinks=True`` reads them).
    ``progress`` shows a progress bar; ``on_progress`` is called with a ``PrepareProgress`` as
    the work advances. When ``out_dir`` already holds a complete prepare, returns its meta if the
    settings match and raises ``DataError`` listing the differences if they do not; ``force``
    redoes it either way.

    A fault of the source's content (``SourceError``: not UTF-8, no documents, a row without its
    text, ...) leaves ``out_dir`` as it was: what this call wrote is removed, a replaced
    meta.json restored, a folder it created deleted.
    """
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise DataError(f"workers={workers} must be at least 1.")
    src, settings = _resolve(
        source, tokenizer, val_fraction, seed, max_docs, val_split, text_column=text_column,
        revision=revision, split=split, split_blank_lines=split_blank_lines, hf_id=hf_id,
        hf_name=hf_name, hf_data_dir=hf_data_dir, hf_data_files=hf_data_files, errors=errors,
        follow_symlinks=follow_symlinks,
    )
    tok = get_tokenizer(tokenizer)  # fail here, in the main process, if tiktoken files are missing
    out = Path(out_dir) if out_dir is not None else Path("prepared") / f"{src.name}-{tok.name}"
    if src.num_documents == 0:  # known without reading: refused before anything is written
        raise _no_documents(src)

    created = not out.is_dir()
    try:
        with _exclusive_lock(out):
            return _prepare_locked(src, out, tok, settings, force=force, workers=workers,
                                   max_docs=max_docs, progress=progress,
                                   on_progress=on_progress)
    except SourceError:
        if created:  # emptied by _prepare_locked; another prepare may have put files there
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _prepare_locked(src: Source, out: Path, tok, settings: dict[str, Any], *, force: bool,
                    **run_options: Any) -> dict[str, Any]:
    """``prepare``'s work once it holds ``out``'s lock."""
    if not force:
        found = _inspect(out, settings)
        meta = _reuse_or_refuse(found, refusal=lambda diff: (
            f"{out} already holds a complete prepare with different settings "
            f"(name: existing -> requested):\n{diff}\n"
            "Refusing to overwrite it: that would silently re-split data that runs may "
            "already use. Re-run with --force (prepare(..., force=True)) to replace it, "
            "or write to another folder with --out."), prefix="")
        if meta is not None:
            log.info("%s already holds this prepare (settings %s); skipping. Use --force to "
                     "redo it.", out, meta.get("settings_hash"))
            return meta
        if found.status == "broken":
            log.warning("%s: %s Preparing it again with the same settings.", out,
                        found.problem)
    # From here on the folder is being rewritten: drop any old meta first so that a crash can
    # never leave an old meta.json next to new, partial bins. Its bytes are kept to put back
    # should the source turn out unpreparable: the old bins are only replaced at the very end.
    old_meta = None
    with contextlib.suppress(FileNotFoundError):
        old_meta = (out / META_NAME).read_bytes()
        os.remove(out / META_NAME)
        fsync_dir(out)
    try:
        # "auto" becomes the split it stands for before anything is written: the recorded
        # settings, and the resume state's hash, always name the split the bins really hold.
        requested_split = settings["val_split"]
        if requested_split == "auto":
            settings = {**settings, "val_split": _choose_val_split(src, settings)}
        return _run(src, out, tok, settings, _settings_hash(settings), force=force,
                    requested_split=requested_split, **run_options)
    except SourceError:
        _discard(out, old_meta)
        raise


def _discard(out: Path, old_meta: bytes | None) -> None:
    """Undo an unfinished prepare that can never finish: its temporary bins, its resume state
    and the lock go, and the meta.json it had removed comes back (the old bins are untouched).
    Called with the lock held; ``_exclusive_lock`` lets a waiting prepare notice the removal."""
    for name in [*(tmp_bin_path(out, s).name for s in SPLITS), STATE_NAME]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(out / name)
    if old_meta is not None:
        write_bytes_atomic(out / META_NAME, old_meta)
    with contextlib.suppress(FileNotFoundError):
        os.remove(out / LOCK_NAME)
    fsync_dir(out)


def _reuse_or_refuse(found, *, refusal, prefix: str) -> dict[str, Any] | None:
    """The meta of a folder that can be used as it is (same settings);
    ``DataError(refusal(differences))`` for one holding other data; else None."""
    if found.status == "same":
        return found.meta
    if found.status == "different":
        raise DataError(refusal(_difference_lines(found.differences, prefix=prefix)))
    return None


def ensure_prepared(
    source: str,
    out_dir: str | os.PathLike,
    *,
    prepare_if_missing: bool,
    tokenizer: str,
    val_fraction: float | None,
    seed: int,
    **options: Any,
) -> dict[str, Any]:
    """The meta of ``out_dir`` once it holds ``source`` prepared with these settings.

    For the training engine, whose ``data`` config keys name the settings in its errors:

    * ``out_dir`` holds a complete prepare of the same source and settings: its meta is returned
      after a ``stat`` of the source files (nothing is tokenized or read);
    * it holds one of a different source or settings: ``DataError`` listing each difference as
      ``data.<key>: existing -> requested``, with the fixes (another ``data.dir``, or deleting the
      folder / re-preparing it with ``python -m data.prepare ... --force``);
    * it holds none (missing, unfinished or unusable): prepared here with a progress bar when
      ``prepare_if_missing``, else ``DataError`` naming the exact ``python -m data.prepare``
      command.

    ``options`` are ``prepare``'s keyword arguments text_column, revision, split, max_docs,
    split_blank_lines, val_split, hf_id, hf_name, hf_data_dir, hf_data_files, workers, progress
    and on_progress; a ``None`` value means "not set". ``val_fraction=None`` takes the source's
    default.
    """
    unknown = sorted(set(options) - _ENSURE_OPTIONS)
    if unknown:
        raise DataError(f"ensure_prepared() got unknown option(s) {', '.join(unknown)}; it accepts "
                        f"{', '.join(sorted(_ENSURE_OPTIONS))}. (It never overwrites data, so "
                        "there is no force: use `python -m data.prepare ... --force`.)")
    options = {k: v for k, v in options.items() if v is not None}
    src, settings = _resolve(source, tokenizer, val_fraction, seed, options.get("max_docs"),
                             options.get("val_split", "auto"),
                             **{k: options[k] for k in SOURCE_OPTIONS if k in options})
    out = Path(out_dir)
    found = _inspect(out, settings)
    meta = _reuse_or_refuse(found, refusal=lambda diff: (
        f"data.dir={out} holds data prepared from a different source or with different "
        f"settings than this run asks for (existing -> requested):\n{diff}\n"
        "Training on it would silently use the wrong data. Point data.dir at another folder, "
        f"or replace this one: delete {out} (data.prepare_if_missing=true then prepares it "
        f"again) or run `{_prepare_command(src, out, settings, force=True)}`."), prefix="data.")
    if meta is not None:
        return meta
    if not prepare_if_missing:
        # Missing, unfinished (the command resumes it) or unusable: read_meta or check_bin said
        # why. Preparing it needs no --force, since no usable data is overwritten.
        reason = "does not exist." if not out.is_dir() else f"holds no usable data: {found.problem}"
        raise DataError(f"data.dir={out} {reason}\nPrepare it first with:\n  "
                        f"{_prepare_command(src, out, settings)}\n"
                        "(or set data.prepare_if_missing=true to let training prepare it).")
    if options.get("progress", True):
        print(f"preparing {src.spec} into {out} (once)", file=sys.stderr, flush=True)
    return prepare(source, out, tokenizer, val_fraction=val_fraction, seed=seed, **options)


# ---------------------------------------------------------------------------------------------
# Settings: what decides the prepared bytes, and how an existing folder compares


def _resolve(source, tokenizer, val_fraction, seed, max_docs, val_split, **source_options):
    """Validate the arguments and resolve the source: (Source, the settings meta.json records,
    except that ``val_split`` may still be "auto")."""
    if tokenizer not in TOKENIZERS:
        raise DataError(f"Unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}.")
    if val_fraction is None:
        val_fraction = default_val_fraction(source)
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise DataError(f"val_fraction={val_fraction!r} is not a number; give a fraction in "
                        "[0, 1) such as 0.01.") from None
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1); nanoGPT uses 0.0005 for "
                        "OpenWebText, small corpora want 0.01-0.1.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed={seed!r} must be a non-negative integer.")
    if val_split not in VAL_SPLITS:
        raise DataError(f"val_split={val_split!r} is not a split mode; choose documents (each "
                        "document to val by a hash), tail (the last val_fraction of the tokens, "
                        "as nanoGPT) or auto (documents unless there are too few).")
    if max_docs is not None and int(max_docs) < 1:
        raise DataError(f"max_docs={max_docs} must be a positive number of documents (or unset).")
    src = resolve_source(source, **source_options)
    settings = {
        "source": src.spec,
        **src.settings,
        "tokenizer": tokenizer,
        "val_fraction": val_fraction,
        "val_split": val_split,
        "seed": int(seed),
        "max_docs": None if max_docs is None else int(max_docs),
    }
    return src, _as_json(settings)


def auto_min_documents(val_fraction: float, seed: int) -> int:
    """The fewest documents for which ``val_split="auto"`` keeps the per-document split.

    That is ``max(ceil(2 / val_fraction), i + 1)``, ``i`` being the index of the first document
    the hash (``val_mask``) sends to val: val must expect at least
    ``AUTO_MIN_EXPECTED_VAL_DOCS`` documents and actually get one. Below it, a per-document split
    holds out no document, or one or two whose share of the tokens is luck. It depends only on
    (val_fraction, seed), so whether a source of N documents gets the tail split is known from N
    alone, also for a folder prepared earlier (its meta.json records N)."""
    if val_fraction <= 0:
        return 0  # nothing goes to val either way
    expected = math.ceil(AUTO_MIN_EXPECTED_VAL_DOCS / val_fraction - 1e-9)
    # The first val document is typically near 1 / val_fraction; past 64x that (probability
    # e^-128) searching on would only cost time, and "that many documents" is as good a bound.
    limit, batch, start = 64 * expected, 1 << 16, 0
    while start < limit:
        hits = np.flatnonzero(val_mask(np.arange(start, start + batch, dtype=np.uint64), seed,
                                       val_fraction))
        if hits.size:
            return max(expected, start + int(hits[0]) + 1)
        start += batch
    return max(expected, limit)


def _auto_split_for(documents: int, val_fraction: float, seed: int) -> str:
    return "documents" if documents >= auto_min_documents(val_fraction, seed) else "tail"


def _choose_val_split(src: Source, settings: dict[str, Any]) -> str:
    """What ``val_split="auto"`` means for this source: ``tail`` when it has fewer non-empty
    documents (after max_docs) than ``auto_min_documents``, with a warning; else ``documents``.

    Counting stops at that many documents, so a large corpus is read only that far ahead (about
    4,000 documents for OpenWebText at 0.0005), and not at all when the source knows its count."""
    f, seed, max_docs = settings["val_fraction"], settings["seed"], settings["max_docs"]
    need = auto_min_documents(f, seed)
    if need == 0:
        return "documents"
    cap = need if max_docs is None else min(need, max_docs)
    if src.num_documents is not None:
        count = min(src.num_documents, cap)
    else:
        count = sum(1 for _ in itertools.islice((d for d in src.documents() if d), cap))
    if count == 0:
        raise _no_documents(src)
    if count >= need:
        return "documents"
    log.warning("%s has %d document%s, fewer than the %d that a per-document split needs at "
                "val_fraction=%g (val should expect at least %d documents and get one): splitting "
                "by tokens instead, the last %g of them go to val (val_split=tail, as nanoGPT "
                "splits a text file). Choose explicitly with --val-split tail|documents "
                "(data.val_split).", src.spec, count, "" if count == 1 else "s", need, f,
                AUTO_MIN_EXPECTED_VAL_DOCS, f)
    return "tail"


def _no_documents(src: Source) -> SourceError:
    return SourceError(f"Source {src.spec!r} yielded no non-empty documents; nothing to "
                       "prepare. Check the path, split and --text-column.")


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from meta.json (tuples become lists, ...), so that requested and
    recorded settings compare equal exactly when they are."""
    return json.loads(json.dumps(obj, default=str))


def _settings_hash(settings: dict[str, Any]) -> str:
    return _digest({"format_version": FORMAT_VERSION, "settings": settings})


_ABSENT = object()  # a setting that one side does not have (it does not apply to its source)


def _differences(recorded: dict[str, Any], requested: dict[str, Any]
                 ) -> list[tuple[str, Any, Any]]:
    keys = set(recorded) | set(requested)
    order = {k: i for i, k in enumerate(_KEY_ORDER)}
    diffs = []
    one_sided = set(recorded) ^ set(requested)
    for k in sorted(keys, key=lambda k: (order.get(k, len(order)), k)):
        implied = IMPLIED_SETTINGS.get(k, _ABSENT)  # what a setting left out stands for
        old, new = recorded.get(k, implied), requested.get(k, implied)
        if old != new:
            diffs.append((k, old, new))
    if any(k == "source" for k, _, _ in diffs):
        # Facts about another source, and options that apply to only one of the two, are implied
        # by the source line and would only bury the settings that really differ.
        diffs = [d for d in diffs if d[0] in _PARAMETER_KEYS and d[0] not in one_sided]
    return diffs


def _format_value(value: Any) -> str:
    if value is _ABSENT:
        return "(does not apply)"
    if value is None:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value)


def _difference_lines(diffs: list[tuple[str, Any, Any]], *, prefix: str) -> str:
    lines = []
    for key, old, new in diffs:
        name = prefix + key if key in _PARAMETER_KEYS else key
        note = f" ({_NOTES[key]})" if key in _NOTES else ""
        lines.append(f"  {name}: {_format_value(old)} -> {_format_value(new)}{note}")
    return "\n".join(lines)


@dataclass
class _Existing:
    """What ``out`` holds, compared with the requested settings."""

    status: str  # "none" | "same" | "different" | "broken"
    meta: dict[str, Any] | None = None
    differences: list[tuple[str, Any, Any]] = field(default_factory=list)
    problem: DataError | None = None


def _inspect(out: Path, settings: dict[str, Any]) -> _Existing:
    try:
        meta = read_meta(out)
    except DataError as e:
        return _Existing("none", problem=e)
    diffs = _differences(meta["settings"], _settle_auto(meta, settings))
    if diffs:
        return _Existing("different", meta, diffs)
    try:
        for s in SPLITS:
            check_bin(out, s, meta)
    except DataError as e:
        return _Existing("broken", meta, problem=e)
    return _Existing("same", meta)


def _settle_auto(meta: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """``requested`` with ``val_split="auto"`` replaced by the split it means for the recorded
    prepare, decided from its document count without reading the source.

    That count only describes this source when every other setting matches; otherwise the
    differences listed already explain the refusal, and a guessed split would only add noise."""
    if requested.get("val_split") != "auto":
        return requested
    recorded = meta["settings"]
    others = _differences({**recorded, "val_split": "auto"}, requested)
    documents = meta.get("documents")
    if others or not isinstance(documents, int):
        return {**requested, "val_split": recorded.get("val_split")}
    return {**requested, "val_split": _auto_split_for(documents, requested["val_fraction"],
                                                      requested["seed"])}


def _cli_option_defaults(spec: str) -> dict[str, Any]:
    """The source options the CLI uses for ``spec`` when not given: the source's defaults, except
    that a .txt file is read by paragraph unless the source defaults otherwise (as data=local)."""
    return dataclasses.asdict(source_options(spec, **{"split_blank_lines": True,
                                                      **source_defaults(spec)}))


def _prepare_command(src: Source, out: Path, settings: dict[str, Any], *,
                     force: bool = False) -> str:
    """The ``python -m data.prepare`` command line that prepares exactly these settings."""
    args = ["python", "-m", "data.prepare", src.spec, "--out", str(out),
            "--tokenizer", settings["tokenizer"], "--val-fraction", repr(settings["val_fraction"]),
            "--seed", str(settings["seed"])]
    if settings.get("max_docs") is not None:
        args += ["--max-docs", str(settings["max_docs"])]
    if settings.get("val_split", "auto") != "auto":
        args += ["--val-split", settings["val_split"]]
    defaults = _cli_option_defaults(src.spec)
    for key in SOURCE_OPTIONS:  # the options this source records, where not the CLI's default
        value = settings.get(key)
        if value is None or value == defaults[key]:
            continue
        flag = _CLI_FLAGS.get(key, "--" + key.replace("_", "-"))
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    if force:
        args.append("--force")
    return shlex.join(args)


@contextlib.contextmanager
def _exclusive_lock(out: Path):
    """One prepare per folder at a time (e.g. several ranks asking for the same corpus): the
    others wait, then find the finished meta and skip. Creates ``out`` when missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        out.mkdir(parents=True, exist_ok=True)
        yield
        return
    while True:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK_NAME, "a")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:  # the holder may have removed the file (_discard) while this one waited on it
            current = os.stat(out / LOCK_NAME)
            held = os.fstat(f.fileno())
            if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


class _SplitWriter:
    """Appends token arrays to ``<split>.bin.tmp`` and tracks what is durably on disk."""

    def __init__(self, out: Path, split: str, state: dict[str, int] | None,
                 eot: int = -1) -> None:
        self.eot = eot
        self.path = tmp_bin_path(out, split)
        self.final = bin_path(out, split)
        self.tokens = self.docs = self.bytes = 0
        self.max_id = -1
        if state is not None:
            self.tokens, self.docs = state["tokens"], state["docs"]
            self.bytes, self.max_id = state["bytes"], state["max_id"]
            self.f = open(self.path, "r+b")
            self.f.truncate(self.bytes)  # drop whatever was written after the last checkpoint
            self.f.seek(self.bytes)
        else:
            self.f = open(self.path, "wb")

    def write(self, tokens: np.ndarray, docs: int) -> None:
        if len(tokens):
            self.f.write(tokens.tobytes())
            self.tokens += len(tokens)
            self.bytes += tokens.nbytes
            self.max_id = max(self.max_id, int(tokens.max()))
        self.docs += docs

    def reset(self) -> None:
        """Back to empty (what a half-done earlier attempt wrote is dropped)."""
        self.tokens = self.docs = self.bytes = 0
        self.max_id = -1
        self.f.seek(0)
        self.f.truncate(0)

    def sync(self) -> dict[str, int]:
        self.f.flush()
        os.fsync(self.f.fileno())
        return {"tokens": self.tokens, "docs": self.docs, "bytes": self.bytes,
                "max_id": self.max_id}

    def finish(self) -> None:
        self.f.truncate(self.bytes)  # the tail split has counted train down to its share
        self.sync()
        self.f.close()
        os.replace(self.path, self.final)

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def _load_state(out: Path, settings: dict[str, Any], settings_hash: str) -> dict[str, Any] | None:
    """The resume point of an interrupted prepare with the same settings, if it is usable."""
    try:
        state = json.loads((out / STATE_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: the resume state is unreadable (%s); starting over.", out, e)
        return None
    if not isinstance(state, dict):
        return None
    if state.get("settings_hash") != settings_hash:
        # Restarting is safe (unfinished bins were never readable as data) but must not be
        # silent: the user may have meant to resume and mistyped an option.
        old = state.get("settings")
        diffs = _differences(old, settings) if isinstance(old, dict) else []
        log.warning("%s holds an unfinished prepare with other settings%s; starting this one from "
                    "scratch instead of resuming it.", out,
                    " (existing -> requested):\n" + _difference_lines(diffs, prefix="")
                    if diffs else "")
        return None
    for s in SPLITS:  # a bin shorter than recorded lost data the state counts as durable
        p = tmp_bin_path(out, s)
        if not p.exists() or p.stat().st_size < state[s]["bytes"]:
            return None
    return state


def _run(src: Source, out: Path, tok, settings, settings_hash, *, workers, max_docs, force,
         progress, on_progress, requested_split) -> dict[str, Any]:
    state = None if force else _load_state(out, settings, settings_hash)
    if state is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(out / STATE_NAME)
    start_doc = state["docs_done"] if state else 0
    text_bytes = state["text_bytes"] if state else 0
    # The tail split streams every document into train.bin.tmp, then moves the last tokens to val
    # once their number is known; ``tail_done`` records (durably) that this move has happened.
    tail = settings["val_split"] == "tail"
    tail_done = state["tail_done"] if state else False
    writers = {s: _SplitWriter(out, s, state[s] if state else None, tok.eot) for s in SPLITS}
    if state:
        log.info("resuming the interrupted prepare in %s at document %d", out, start_doc)

    docs: Iterable[str] = (d for d in src.documents() if d)  # empty documents carry no text
    if max_docs is not None:
        docs = itertools.islice(docs, int(max_docs))
    # Resuming: documents already on disk are read past but not tokenized again.
    docs = itertools.islice(docs, start_doc, None)

    total = src.num_documents
    if max_docs is not None:
        total = int(max_docs) if total is None else min(total, int(max_docs))
    bar = _progress_bar(total, start_doc, enabled=progress, desc=f"prepare {src.name}")
    report = on_progress or (lambda p: None)
    val_fraction, seed = settings["val_fraction"], settings["seed"]
    docs_done, last_sync, chunks_since_sync = start_doc, time.monotonic(), 0

    def checkpoint() -> None:
        new_state = {"settings_hash": settings_hash, "settings": settings, "docs_done": docs_done,
                     "text_bytes": text_bytes, "tail_done": tail_done,
                     **{s: w.sync() for s, w in writers.items()}}
        atomic_write_json(out / STATE_NAME, new_state)

    try:
        for start, (tokens, lengths, nbytes) in _encode_ordered(
                _chunks(docs, start_doc), tok.name, workers):
            n = len(lengths)
            if tail:  # the whole stream goes to train.bin.tmp first
                is_val = np.zeros(n, dtype=bool)
            else:
                is_val = val_mask(np.arange(start, start + n, dtype=np.uint64), seed,
                                  val_fraction)
            if not is_val.any():
                writers["train"].write(tokens, n)
            else:
                ends = np.cumsum(lengths)
                for i in range(n):
                    w = writers["val" if is_val[i] else "train"]
                    w.write(tokens[ends[i] - lengths[i]:ends[i]], 1)
            docs_done = start + n
            text_bytes += nbytes
            chunks_since_sync += 1
            if bar is not None:
                bar.update(n)
                bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}",
                                refresh=False)
            if (chunks_since_sync >= CHECKPOINT_CHUNKS
                    or time.monotonic() - last_sync >= CHECKPOINT_SECONDS):
                checkpoint()
                last_sync, chunks_since_sync = time.monotonic(), 0
            report(PrepareProgress("documents", docs_done, total))
        if docs_done == 0:
            raise _no_documents(src)
        checkpoint()  # the state now covers everything, should the renames below be interrupted
        if tail and not tail_done:
            _move_tail_to_val(writers["train"], writers["val"], val_fraction, tok.dtype, report)
            tail_done = True
            checkpoint()  # train's recorded size is now its share: a resume truncates, not redoes
        for w in writers.values():
            w.finish()
        fsync_dir(out)
    finally:
        for w in writers.values():
            w.close()
        if bar is not None:
            bar.close()

    train, val = writers["train"], writers["val"]
    meta = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eot": tok.eot,
        "dtype": tok.dtype.name,
        "train_tokens": train.tokens,
        "val_tokens": val.tokens,
        "train_documents": train.docs,
        "val_documents": val.docs,
        "documents": train.docs + val.docs,
        "max_token_id": max(train.max_id, val.max_id),
        "text_bytes": text_bytes,
        "source": src.spec,
        "source_name": src.name,
        "source_kind": src.kind,
        "source_info": src.info,
        "revision": src.info.get("revision"),
        "val_fraction": settings["val_fraction"],
        "val_split": settings["val_split"],
        "val_split_requested": requested_split,
        "seed": settings["seed"],
        "max_docs": settings["max_docs"],
        "settings": settings,
        "settings_hash": settings_hash,
    }
    atomic_write_json(out / META_NAME, meta)  # last: its presence marks the folder complete
    with contextlib.suppress(FileNotFoundError):
        os.remove(out / STATE_NAME)
    if val.tokens == 0 and settings["val_fraction"] > 0:
        if tail:
            log.warning("val is empty: round(%g x %d tokens) is 0. Raise --val-fraction or "
                        "prepare more text.", settings["val_fraction"], meta["train_tokens"])
        else:
            log.warning("no document landed in val (%d documents, val_fraction=%g): raise "
                        "--val-fraction, split the text into more documents "
                        "(--split-blank-lines), or split by tokens (--val-split tail).",
                        meta["documents"], settings["val_fraction"])
    return meta


def tail_sizes(tokens: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) token counts of the tail split of a ``tokens``-long stream: val is the last
    ``round(val_fraction * tokens)`` tokens (Python's round, half to even), train the rest."""
    n_val = round(val_fraction * tokens)
    return tokens - n_val, n_val


def _move_tail_to_val(train: _SplitWriter, val: _SplitWriter, val_fraction: float,
                      dtype: np.dtype, report: ProgressCallback) -> None:
    """Copy the last ``tail_sizes`` val tokens of the train stream to val, then count train as
    its first part only. Train's file is cut to that size by ``finish`` (its recorded ``bytes``),
    so until the caller's checkpoint the whole stream stays on disk and a crash redoes the copy.
    Reads in bounded pieces: memory does not grow with the corpus. ``report`` hears of each."""
    n_train, n_val = tail_sizes(train.tokens, val_fraction)
    eot_moved = 0
    val.reset()
    train.f.flush()
    if n_val:
        with open(train.path, "rb") as f:
            f.seek(n_train * dtype.itemsize)
            left = n_val
            while left:
                piece = np.fromfile(f, dtype=dtype, count=min(left, TAIL_COPY_TOKENS))
                if len(piece) == 0:  # pragma: no cover - the file was shortened under us
                    raise DataError(f"{train.path} ended before its recorded {train.tokens} "
                                    "tokens; run the prepare again with --force.")
                eot_moved += int(np.count_nonzero(piece == train.eot))
                val.write(piece, 0)
                left -= len(piece)
                report(PrepareProgress("tail", n_val - left, n_val))
    # A document counts for the split that holds its end-of-text token.
    val.docs = eot_moved
    train.docs -= eot_moved
    train.tokens, train.bytes = n_train, n_train * dtype.itemsize


def _progress_bar(total, initial, *, enabled, desc):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="doc", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# Splitting and tokenizing


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def val_mask(doc_indices: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """Whether each document index goes to val: a hash of (seed, index) below ``val_fraction``.

    Depends only on the index, so the split does not change with chunking, worker count or
    resumption, and the same documents land in val on every machine."""
    if val_fraction <= 0:
        return np.zeros(len(doc_indices), dtype=bool)
    key = _splitmix64(np.array([seed % (1 << 64)], dtype=np.uint64))
    h = _splitmix64(np.asarray(doc_indices, dtype=np.uint64) ^ key)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # uniform in [0, 1)
    return u < val_fraction


def _chunks(docs: Iterable[str], start: int) -> Iterator[tuple[int, list[str]]]:
    """Group documents into (index of first document, documents) chunks."""
    chunk: list[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield start, chunk
            start += len(chunk)
            chunk, chars = [], 0
    if chunk:
        yield start, chunk


def _encode_chunk(tokenizer_name: str, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Worker task: (flat tokens, EOT after each document; tokens per document; UTF-8 bytes)."""
    tok = get_tokenizer(tokenizer_name)
    tokens, lengths = tok.encode_documents(docs)
    nbytes = sum(len(d.encode("utf-8", errors="replace")) for d in docs)
    return tokens, lengths, nbytes


def _encode_ordered(chunks: Iterable[tuple[int, list[str]]], tokenizer_name: str, workers: int):
    """Yield (start, encoded chunk) in input order, tokenizing on ``workers`` processes.

    ``Pool.imap`` would read the whole input ahead into its task queue; a bounded window of
    ``apply_async`` results keeps at most ~2 chunks per worker in memory instead."""
    if workers == 1:
        for start, docs in chunks:
            yield start, _encode_chunk(tokenizer_name, docs)
        return
    # spawn: safe with threads in the parent (tqdm, datasets' streaming, torch) on every platform.
    ctx = mp.get_context("spawn")
    # Under `python -m data.prepare` this module is __main__, which the workers are not shown
    # (see _main_module_hidden): hand them the function of the importable module instead.
    encode = importlib.import_module("data.prepare")._encode_chunk
    with _main_module_hidden():
        pool = ctx.Pool(workers)
    with pool:
        pending: deque = deque()
        for start, docs in chunks:
            pending.append((start, pool.apply_async(encode, (tokenizer_name, docs))))
            if len(pending) >= 2 * workers:
                s, r = pending.popleft()
                yield s, r.get()
        while pending:
            s, r = pending.popleft()
            yield s, r.get()


@contextlib.contextmanager
def _main_module_hidden():
    """Spawned workers re-import the parent's ``__main__`` before running anything; when that is
    train.py (torch, Hydra, ...) each worker pays seconds of imports just to run
    ``_encode_chunk``. Workers are started only while this is active, and the tasks reference
    nothing in ``__main__``, so hiding it from multiprocessing's preparation data is safe."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


# ---------------------------------------------------------------------------------------------
# Command line


def _one_document_sources() -> str:
    return ", ".join(name for name, entry in SOURCES.items()
                     if entry.defaults.get("split_blank_lines") is False)


def _defaults_by_source(key: str) -> str:
    """The named sources that default option ``key`` to a value of their own, for the help."""
    return ", ".join(f"{name} {entry.defaults[key]}" for name, entry in SOURCES.items()
                     if key in entry.defaults) or "none"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Tokenize a corpus into train.bin / val.bin / meta.json. A folder that "
                    "already holds a complete prepare is skipped when its recorded settings "
                    "match and refused (listing the differences) when they do not; --force "
                    "replaces it.",
        epilog=f"SOURCE: {source_choices()}. nanoGPT's split of input.txt (the last 10% of the "
               "characters as val): python -m data.prepare input.txt --tokenizer byte "
               "--val-fraction 0.1 --val-split tail --no-split-blank-lines",
    )
    p.add_argument("source")
    p.add_argument("--out", default=None,
                   help="output folder (default: prepared/<source name>-<tokenizer>)")
    p.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS)
    by_source = ", ".join(f"{name} {entry.val_fraction:g}" for name, entry in SOURCES.items()
                          if entry.val_fraction is not None)
    p.add_argument("--val-fraction", type=float, default=None,
                   help="probability that a document goes to val (default by source, as in the "
                        f"training configs: {by_source}, any other source "
                        f"{DEFAULT_VAL_FRACTION:g})")
    p.add_argument("--val-split", choices=VAL_SPLITS, default="auto",
                   help="how val is cut out: documents (each document to val with probability "
                        "--val-fraction, by a hash of its index), tail (the last --val-fraction "
                        "of the tokens, as nanoGPT splits input.txt), or auto (default): "
                        "documents, unless the source has fewer than max(ceil(2 / val_fraction), "
                        "1 + the index of the first document hashed to val) documents, then tail "
                        "with a warning")
    p.add_argument("--seed", type=int, default=2357, help="seed of the val split (default 2357)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"tokenizer processes (default: half the cores, here {default_workers()})")
    p.add_argument("--text-column", default=None,
                   help="text field of jsonl/parquet/HF rows (default text)")
    p.add_argument("--revision", default=None,
                   help=f"Hugging Face revision (defaults: {_defaults_by_source('revision')})")
    p.add_argument("--split", default=None, help="Hugging Face split to read (default train)")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--split-blank-lines", action=argparse.BooleanOptionalAction, default=None,
                   help=".txt files: one document per blank-line-separated paragraph (default, as "
                        "data=local does), or with --no-split-blank-lines one per file (the "
                        f"default of: {_one_document_sources() or 'none'})")
    p.add_argument("--hf-id", default=None,
                   help="named Hugging Face sources: use this dataset id, e.g. a parquet mirror "
                        f"(defaults: {_defaults_by_source('hf_id')})")
    p.add_argument("--hf-name", default=None, help="Hugging Face config name")
    p.add_argument("--hf-data-dir", default=None, help="Hugging Face data_dir")
    p.add_argument("--data-files", nargs="+", default=None, dest="hf_data_files", metavar="FILE",
                   help="Hugging Face data_files (e.g. with hf:parquet for local parquet files)")
    p.add_argument("--errors", choices=TEXT_ERRORS, default=None,
                   help="local text that is not valid UTF-8: strict (default) refuses it, naming "
                        "the file and the byte offset; replace prepares it with each invalid "
                        "sequence replaced by U+FFFD (recorded in the folder's settings)")
    p.add_argument("--follow-symlinks", action=argparse.BooleanOptionalAction, default=None,
                   help="a source folder: read symbolic links whose targets lie outside it "
                        "(default: refuse them); links inside it are read, each file once")
    p.add_argument("--force", action="store_true",
                   help="redo a complete prepare, also one with different settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m data.prepare``: prepare the source named on the command line; 2 on bad input."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.split_blank_lines is None:
        args.split_blank_lines = _cli_option_defaults(args.source)["split_blank_lines"]
    t0 = time.perf_counter()
    try:
        meta = prepare(
            args.source, args.out, args.tokenizer, val_fraction=args.val_fraction,
            seed=args.seed, workers=args.workers, max_docs=args.max_docs,
            val_split=args.val_split, force=args.force, progress=not args.no_progress,
            **{k: getattr(args, k) for k in SOURCE_OPTIONS},
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or str(Path("prepared") / f"{meta['source_name']}-{meta['tokenizer']}")
    print(f"{out}: {meta['train_tokens']:,} train tokens ({meta['train_documents']:,} documents), "
          f"{meta['val_tokens']:,} val tokens ({meta['val_documents']:,} documents, split "
          f"{meta['val_split']}), {meta['tokenizer']} vocab {meta['vocab_size']}, {meta['dtype']}, "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
