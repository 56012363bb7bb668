"""Tokenize a corpus into ``train.bin`` / ``val.bin`` / ``meta.json`` (DESIGN section 6).

    python -m data.prepare openwebtext                       # -> prepared/openwebtext-gpt2
    python -m data.prepare stdlib --tokenizer byte           # offline corpus, no download
    python -m data.prepare input.txt --split-blank-lines --val-fraction 0.1 --out prepared/shk

Documents are tokenized in parallel (``--workers`` processes) in fixed-size chunks whose results
are consumed in submission order, so the output is byte-identical for any worker count, and only
a bounded window of chunks is ever in flight, so memory stays bounded. Each document goes to
``val`` with probability ``val_fraction`` through a hash of (seed, document index): the split is
deterministic and needs no pass over the data to decide.

Interruptions: the bins are written under temporary names and meta.json only appears once they are
complete. A state file records, after each fsync, how many documents are safely on disk, so
re-running the same command resumes from there instead of starting over. A complete prepare with
the same settings is detected and skipped (``--force`` redoes it).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from data.bins import (FORMAT_VERSION, LOCK_NAME, META_NAME, SPLITS, STATE_NAME, atomic_write_json,
                       bin_path, check_bin, fsync_dir, read_meta, tmp_bin_path)
from data.errors import DataError
from data.sources import Source, _digest, resolve_source
from data.tokenizers import TOKENIZERS, get_tokenizer

log = logging.getLogger("data.prepare")

# Chunking and checkpoint cadence. Module-level so tests can shrink them.
CHUNK_CHARS = 1 << 20  # characters per chunk of documents sent to a worker
CHUNK_DOCS = 1024  # ... or this many documents, whichever comes first
CHECKPOINT_SECONDS = 30.0  # how often the resume state is made durable
CHECKPOINT_CHUNKS = 256  # ... or every this many chunks


def default_workers() -> int:
    """Half the cores (nanoGPT's rule of thumb: the source reader needs a core too), at least 1."""
    return max(1, (os.cpu_count() or 1) // 2)


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    tokenizer: str = "gpt2",
    *,
    val_fraction: float = 0.0005,
    seed: int = 2357,
    workers: int | None = None,
    text_column: str = "text",
    revision: str | None = None,
    split: str = "train",
    max_docs: int | None = None,
    split_blank_lines: bool = False,
    hf_id: str | None = None,
    hf_name: str | None = None,
    hf_data_dir: str | None = None,
    hf_data_files: str | list[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare ``source`` into ``out_dir`` and return its meta (see the module docstring).

    ``out_dir`` defaults to ``prepared/<source name>-<tokenizer>`` under the current directory.
    Returns immediately with the existing meta when ``out_dir`` already holds a complete prepare
    of the same settings, unless ``force``.
    """
    if tokenizer not in TOKENIZERS:
        raise DataError(f"Unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}.")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1); nanoGPT uses 0.0005 for "
                        "OpenWebText, small corpora want 0.01-0.1.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed={seed!r} must be a non-negative integer.")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise DataError(f"workers={workers} must be at least 1.")
    if max_docs is not None and int(max_docs) < 1:
        raise DataError(f"max_docs={max_docs} must be a positive number of documents (or unset).")

    src = resolve_source(
        source, text_column=text_column, revision=revision, split=split,
        split_blank_lines=split_blank_lines, hf_id=hf_id, hf_name=hf_name,
        hf_data_dir=hf_data_dir, hf_data_files=hf_data_files,
    )
    tok = get_tokenizer(tokenizer)  # fail here, in the main process, if tiktoken files are missing
    out = Path(out_dir) if out_dir is not None else Path("prepared") / f"{src.name}-{tok.name}"
    settings = {
        "format_version": FORMAT_VERSION,
        "source": src.spec,
        "source_info": src.info,
        "source_fingerprint": src.fingerprint,
        "tokenizer": tok.name,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "max_docs": None if max_docs is None else int(max_docs),
    }
    settings_hash = _digest(settings)

    out.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out):
        if not force:
            meta = _current_meta(out, settings_hash)
            if meta is not None:
                log.info("%s already holds this prepare (settings %s); skipping. Use --force to "
                         "redo it.", out, settings_hash)
                return meta
        # From here on the folder is being rewritten: drop any old meta first so that a crash
        # can never leave an old meta.json next to new, partial bins.
        with contextlib.suppress(FileNotFoundError):
            os.remove(out / META_NAME)
            fsync_dir(out)
        return _run(src, out, tok, settings, settings_hash, workers=workers,
                    max_docs=max_docs, force=force, progress=progress)


def _current_meta(out: Path, settings_hash: str) -> dict[str, Any] | None:
    try:
        meta = read_meta(out)
        if meta.get("settings_hash") != settings_hash:
            return None
        for s in SPLITS:
            check_bin(out, s, meta)
        return meta
    except DataError:
        return None


@contextlib.contextmanager
def _exclusive_lock(out: Path):
    """One prepare per folder at a time (e.g. several ranks asking for the same corpus): the
    others wait, then find the finished meta and skip."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        yield
        return
    with open(out / LOCK_NAME, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _SplitWriter:
    """Appends token arrays to ``<split>.bin.tmp`` and tracks what is durably on disk."""

    def __init__(self, out: Path, split: str, state: dict[str, int] | None) -> None:
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

    def sync(self) -> dict[str, int]:
        self.f.flush()
        os.fsync(self.f.fileno())
        return {"tokens": self.tokens, "docs": self.docs, "bytes": self.bytes,
                "max_id": self.max_id}

    def finish(self) -> None:
        self.sync()
        self.f.close()
        os.replace(self.path, self.final)

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def _load_state(out: Path, settings_hash: str) -> dict[str, Any] | None:
    """The resume point of an interrupted prepare with the same settings, if it is usable."""
    try:
        state = json.loads((out / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if state.get("settings_hash") != settings_hash:
        return None
    for s in SPLITS:
        p = tmp_bin_path(out, s)
        if not p.exists() or p.stat().st_size < state[s]["bytes"]:
            return None
    return state


def _run(src: Source, out: Path, tok, settings, settings_hash, *, workers, max_docs, force,
         progress) -> dict[str, Any]:
    state = None if force else _load_state(out, settings_hash)
    if state is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(out / STATE_NAME)
    start_doc = state["docs_done"] if state else 0
    text_bytes = state["text_bytes"] if state else 0
    writers = {s: _SplitWriter(out, s, state[s] if state else None) for s in SPLITS}
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
    val_fraction, seed = settings["val_fraction"], settings["seed"]
    docs_done, last_sync, chunks_since_sync = start_doc, time.monotonic(), 0

    def checkpoint() -> None:
        new_state = {"settings_hash": settings_hash, "docs_done": docs_done,
                     "text_bytes": text_bytes, **{s: w.sync() for s, w in writers.items()}}
        atomic_write_json(out / STATE_NAME, new_state)

    try:
        for start, (tokens, lengths, nbytes) in _encode_ordered(
                _chunks(docs, start_doc), tok.name, workers):
            n = len(lengths)
            is_val = val_mask(np.arange(start, start + n, dtype=np.uint64), seed, val_fraction)
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
        if docs_done == 0:
            raise DataError(f"Source {src.spec!r} yielded no non-empty documents; nothing to "
                            "prepare. Check the path, split and --text-column.")
        checkpoint()  # the state now covers everything, should the renames below be interrupted
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
        "seed": settings["seed"],
        "max_docs": settings["max_docs"],
        "settings_hash": settings_hash,
    }
    atomic_write_json(out / META_NAME, meta)  # last: its presence marks the folder complete
    with contextlib.suppress(FileNotFoundError):
        os.remove(out / STATE_NAME)
    if val.tokens == 0 and settings["val_fraction"] > 0:
        log.warning("no document landed in val (%d documents, val_fraction=%g): raise "
                    "--val-fraction or split the text into more documents (--split-blank-lines).",
                    meta["documents"], settings["val_fraction"])
    return meta


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
    with _main_module_hidden():
        pool = ctx.Pool(workers)
    with pool:
        pending: deque = deque()
        for start, docs in chunks:
            pending.append((start, pool.apply_async(_encode_chunk, (tokenizer_name, docs))))
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Tokenize a corpus into train.bin / val.bin / meta.json.",
        epilog="SOURCE: openwebtext | stdlib | hf:<dataset id> | a .txt/.jsonl/.parquet file or "
               "a folder of them.",
    )
    p.add_argument("source")
    p.add_argument("--out", default=None,
                   help="output folder (default: prepared/<source name>-<tokenizer>)")
    p.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS)
    p.add_argument("--val-fraction", type=float, default=0.0005,
                   help="probability that a document goes to val (default 0.0005, as nanoGPT)")
    p.add_argument("--seed", type=int, default=2357, help="seed of the val split (default 2357)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"tokenizer processes (default: half the cores, here {default_workers()})")
    p.add_argument("--text-column", default="text", help="text field of jsonl/parquet/HF rows")
    p.add_argument("--revision", default=None,
                   help="Hugging Face revision (openwebtext default: refs/convert/parquet)")
    p.add_argument("--split", default="train", help="Hugging Face split to read (default train)")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--split-blank-lines", action="store_true",
                   help=".txt files: one document per blank-line-separated paragraph, not per file")
    p.add_argument("--hf-id", default=None,
                   help="openwebtext only: use this Hugging Face dataset id (a parquet mirror)")
    p.add_argument("--hf-name", default=None, help="Hugging Face config name")
    p.add_argument("--hf-data-dir", default=None, help="Hugging Face data_dir")
    p.add_argument("--data-files", nargs="+", default=None,
                   help="Hugging Face data_files (e.g. with hf:parquet for local parquet files)")
    p.add_argument("--force", action="store_true", help="redo a complete prepare")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        meta = prepare(
            args.source, args.out, args.tokenizer, val_fraction=args.val_fraction,
            seed=args.seed, workers=args.workers, text_column=args.text_column,
            revision=args.revision, split=args.split, max_docs=args.max_docs,
            split_blank_lines=args.split_blank_lines, hf_id=args.hf_id, hf_name=args.hf_name,
            hf_data_dir=args.hf_data_dir, hf_data_files=args.data_files, force=args.force,
            progress=not args.no_progress,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or str(Path("prepared") / f"{meta['source_name']}-{meta['tokenizer']}")
    print(f"{out}: {meta['train_tokens']:,} train tokens ({meta['train_documents']:,} documents), "
          f"{meta['val_tokens']:,} val tokens ({meta['val_documents']:,} documents), "
          f"{meta['tokenizer']} vocab {meta['vocab_size']}, {meta['dtype']}, "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
