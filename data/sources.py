"""Where documents come from: Hugging Face datasets, local files and folders, and the stdlib.

A source is resolved once into a ``Source``: a name (for the default output folder), the facts
that go into meta.json, a fingerprint (to tell whether an existing prepare is still current) and
a function that streams documents in a fixed order. Every reader streams, so memory stays bounded
however large the corpus (a single .txt file read as one document is the one exception, by
definition).

Spec strings:
    openwebtext           Hugging Face ``Skylion007/openwebtext`` at ``refs/convert/parquet``
    hf:<id>               any Hugging Face dataset with a text column (streamed)
    stdlib                the .py sources of the running Python's standard library (offline)
    shakespeare           tiny Shakespeare (nanoGPT's ``input.txt``, 1,115,394 ASCII bytes), read
                          from a cache and downloaded there once when missing (``SHAKESPEARE_URL``)
    PATH                  a .txt / .jsonl / .parquet file, or a folder of them (recursive)

Each source also carries ``settings``: the facts that decide the prepared bytes (a local source's
resolved path and file fingerprint, the stdlib's Python version, a Hugging Face id/revision/...).
``data.prepare`` records them in meta.json and refuses to reuse or overwrite a folder whose
recorded settings differ, so two sources never share one prepared folder unnoticed.

OpenWebText: its Hub repository is a loading-script dataset, which ``datasets`` >= 4 refuses to
run. The Hub's automatic parquet conversion lives at the revision ``refs/convert/parquet`` of the
same repository and loads with plain ``datasets``; both the id and the revision are configurable
(``--hf-id`` / ``--revision``) in case you prefer another parquet mirror.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from data.errors import DataError
from data.files import write_bytes_atomic

OPENWEBTEXT_ID = "Skylion007/openwebtext"
OPENWEBTEXT_REVISION = "refs/convert/parquet"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__"}

# Default share of documents held out for validation, per source. These are the values of the
# training configs (configs/data/<name>.yaml), so that `python -m data.prepare stdlib --tokenizer
# byte` and a training run with data=stdlib agree on one split instead of re-splitting each other's
# data: nanoGPT's 0.0005 for OpenWebText's 8M documents, 0.02 for the stdlib's ~2,000 files
# (0.0005 would leave val one or two files), 0.01 for anything else.
DEFAULT_VAL_FRACTIONS = {"stdlib": 0.02, "openwebtext": 0.0005, "shakespeare": 0.1}
DEFAULT_VAL_FRACTION = 0.01

# tiny Shakespeare as nanoGPT's data/shakespeare_char/prepare.py downloads it. The checksum pins the
# exact bytes: the URL is a moving branch, and a truncated or altered download must never be
# prepared under the name "shakespeare" (its recorded settings could not tell the difference).
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_BYTES = 1_115_394


def default_val_fraction(spec: str | os.PathLike) -> float:
    """The val_fraction a source gets when none is given (see ``DEFAULT_VAL_FRACTIONS``)."""
    return DEFAULT_VAL_FRACTIONS.get(str(spec), DEFAULT_VAL_FRACTION)


@dataclass
class Source:
    """A resolved corpus: ``documents()`` streams its documents (str) in a fixed order."""

    name: str
    kind: str  # "hf" | "local" | "stdlib" | "download" (shakespeare)
    spec: str
    documents: Callable[[], Iterator[str]] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)  # recorded in meta.json
    fingerprint: str = ""  # changes when the underlying data changes
    # Non-empty documents (data.prepare skips empty ones), when cheap to know: the progress bar's
    # total, and what val_split="auto" decides on without reading the corpus.
    num_documents: int | None = None
    # What decides the prepared bytes besides the tokenizer and split: recorded in meta.json and
    # compared before an existing prepare is reused. Only settings that matter for this source are
    # listed (text_column only where there are .jsonl/.parquet files, ...), so an irrelevant
    # option never makes two identical prepares look different.
    settings: dict[str, Any] = field(default_factory=dict)


def resolve_source(
    spec: str,
    *,
    text_column: str = "text",
    revision: str | None = None,
    split: str = "train",
    split_blank_lines: bool = False,
    hf_id: str | None = None,
    hf_name: str | None = None,
    hf_data_dir: str | None = None,
    hf_data_files: str | list[str] | None = None,
) -> Source:
    """Turn a source spec string into a ``Source`` (see the module docstring for the forms)."""
    spec = str(spec)
    if spec == "openwebtext":
        return _hf_source(
            hf_id or OPENWEBTEXT_ID, name="openwebtext", spec=spec,
            revision=revision or OPENWEBTEXT_REVISION, split=split, text_column=text_column,
            config_name=hf_name, data_dir=hf_data_dir, data_files=hf_data_files,
        )
    if spec.startswith("hf:"):
        dataset_id = spec[3:]
        if not dataset_id:
            raise DataError("Source 'hf:' needs a dataset id, e.g. hf:roneneldan/TinyStories.")
        return _hf_source(
            dataset_id, name=dataset_id.replace("/", "_").replace(":", "_"), spec=spec,
            revision=revision, split=split, text_column=text_column,
            config_name=hf_name, data_dir=hf_data_dir, data_files=hf_data_files,
        )
    if spec == "stdlib":
        return _stdlib_source()
    if spec == "shakespeare":
        return _shakespeare_source(split_blank_lines=split_blank_lines)
    path = Path(spec).expanduser()
    if path.exists():
        return _local_source(path, text_column=text_column, split_blank_lines=split_blank_lines)
    raise DataError(
        f"Unknown data source {spec!r}: it is neither a built-in name (openwebtext, stdlib, "
        "shakespeare), "
        "nor hf:<dataset id>, nor an existing .txt/.jsonl/.parquet file or folder. Check the "
        "path, or use 'stdlib' for an offline corpus that needs no download."
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face


def _hf_source(dataset_id, *, name, spec, revision, split, text_column, config_name, data_dir,
               data_files) -> Source:
    info = {"hf_id": dataset_id, "revision": revision, "split": split, "text_column": text_column}
    if config_name:
        info["hf_name"] = config_name
    if data_dir:
        info["hf_data_dir"] = data_dir
    if data_files:
        info["hf_data_files"] = data_files
    fingerprint_parts = dict(info)
    files = None
    if data_files:  # a local builder such as "parquet": the files' contents define the data
        files = [data_files] if isinstance(data_files, str) else [str(f) for f in data_files]
        existing = [Path(f) for f in files if Path(f).exists()]
        fingerprint_parts["files"] = _files_fingerprint(existing)
    settings = {"hf_id": dataset_id, "revision": revision, "split": split,
                "text_column": text_column, "hf_name": config_name or None,
                "hf_data_dir": data_dir or None, "hf_data_files": files}
    if files:
        settings["source_fingerprint"] = fingerprint_parts["files"]

    def documents() -> Iterator[str]:
        ds = _load_hf_streaming(dataset_id, config_name, data_dir, data_files, revision, split)
        first = True
        try:
            for row in ds:
                if first:
                    if text_column not in row:
                        raise DataError(
                            f"Hugging Face dataset {dataset_id!r} has no column {text_column!r}; "
                            f"its columns are {sorted(row)}. Pass --text-column with the right "
                            "name."
                        )
                    first = False
                text = row[text_column]
                if text is not None:
                    yield str(text)
        except ConnectionError as e:  # the stream broke mid-way; a re-run resumes from the state
            raise _network_error(dataset_id, revision, split, e) from e

    return Source(name=name, kind="hf", spec=spec, documents=documents, info=info,
                  fingerprint=_digest(fingerprint_parts), settings=settings)


def _load_hf_streaming(dataset_id, config_name, data_dir, data_files, revision, split):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DataError("Hugging Face sources need the datasets package: "
                        "pip install datasets.") from e
    kwargs: dict[str, Any] = {"split": split, "streaming": True}
    if config_name:
        kwargs["name"] = config_name
    if data_dir:
        kwargs["data_dir"] = data_dir
    if data_files:
        kwargs["data_files"] = data_files
    if revision:
        kwargs["revision"] = revision
    try:
        return datasets.load_dataset(dataset_id, **kwargs)
    except (ConnectionError, OSError) as e:
        raise _network_error(dataset_id, revision, split, e) from e
    except ValueError as e:  # e.g. unknown split or config
        raise DataError(f"Could not load Hugging Face dataset {dataset_id!r}: {e}") from e


def _network_error(dataset_id, revision, split, e: Exception) -> DataError:
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
    return DataError(
        f"Could not read Hugging Face dataset {dataset_id!r} (revision {revision}, split "
        f"{split}): {type(e).__name__}: {e}. Hugging Face sources stream from the Hub and need "
        "network access"
        + (f"; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set ({offline}), unset it"
           if offline else "")
        + ". Re-running the same command resumes an interrupted prepare. Offline, prepare a local "
        ".txt/.jsonl/.parquet file or folder, or the 'stdlib' corpus, instead."
    )


# ---------------------------------------------------------------------------------------------
# Local files


def _local_source(path: Path, *, text_column: str, split_blank_lines: bool) -> Source:
    path = path.resolve()
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(
                f"Folder {path} holds no .txt, .jsonl or .parquet files to prepare. Point the "
                "source at a folder (searched recursively) or file of one of those types."
            )
    else:
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DataError(
                f"Cannot read {path}: supported local files are .txt (one document per file, or "
                "per paragraph with --split-blank-lines), .jsonl and .parquet (text column)."
            )
        files = [path]

    def documents() -> Iterator[str]:
        for f in files:
            yield from _read_file(f, text_column=text_column, split_blank_lines=split_blank_lines)

    info = {"path": str(path), "files": len(files), "text_column": text_column,
            "split_blank_lines": split_blank_lines}
    one_doc_per_file = all(f.suffix.lower() == ".txt" for f in files) and not split_blank_lines
    # An empty file is an empty document, which is skipped; a non-empty one never decodes to "".
    num = sum(1 for f in files if f.stat().st_size > 0) if one_doc_per_file else None
    fingerprint = _files_fingerprint(files, root=path)
    settings: dict[str, Any] = {"source_fingerprint": fingerprint}
    suffixes = {f.suffix.lower() for f in files}
    if suffixes & {".jsonl", ".parquet"}:
        settings["text_column"] = text_column
    if ".txt" in suffixes:
        settings["split_blank_lines"] = bool(split_blank_lines)
    return Source(name=path.stem if path.is_file() else path.name, kind="local", spec=str(path),
                  documents=documents, info=info, fingerprint=fingerprint, num_documents=num,
                  settings=settings)


def _read_file(path: Path, *, text_column: str, split_blank_lines: bool) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if split_blank_lines:
            yield from _paragraphs(path)
        else:
            yield path.read_bytes().decode("utf-8", errors="replace")
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, text_column)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, text_column)


def _paragraphs(path: Path) -> Iterator[str]:
    """Documents separated by one or more blank (whitespace-only) lines, read line by line.

    A paragraph is its lines exactly as in the file, without the final line break."""
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\r\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\r\n")


def _jsonl_documents(path: Path, text_column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e}); each line of a .jsonl "
                                "file must be one JSON object.") from e
            if not isinstance(row, dict) or text_column not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{lineno} has no {text_column!r} field (found {keys}). "
                                "Pass --text-column with the field that holds the text.")
            if row[text_column] is not None:
                yield str(row[text_column])


def _parquet_documents(path: Path, text_column: str, batch_rows: int = 1024) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_column not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_column!r} (columns: {pf.schema_arrow.names}). "
                        "Pass --text-column with the column that holds the text.")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_column]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield str(text)


# ---------------------------------------------------------------------------------------------
# The offline corpus


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's root and its .py files in sorted relative-path order."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = []
    # os.walk with pruning: site-packages sits inside the stdlib folder and can be huge.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    files = [p for p in files if p.is_file()]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return root, files


def _stdlib_source() -> Source:
    root, files = stdlib_files()
    if not files:
        raise DataError(f"No .py files found under the standard library folder {root}; this "
                        "Python install has no stdlib sources to use as the offline corpus.")

    def documents() -> Iterator[str]:
        for f in files:
            # A few stdlib test files are deliberately not UTF-8; replace rather than fail.
            yield f.read_bytes().decode("utf-8", errors="replace")

    version = ".".join(map(str, sys.version_info[:3]))
    info = {"path": str(root), "files": len(files), "python": version}
    # Names and sizes but not mtimes: a reinstall of the same Python rewrites every mtime without
    # changing the corpus, and should not make the prepared stdlib look stale.
    settings = {"python": version,
                "source_fingerprint": _files_fingerprint(files, root=root, mtimes=False)}
    return Source(name="stdlib", kind="stdlib", spec="stdlib", documents=documents, info=info,
                  fingerprint=_files_fingerprint(files, root=root),
                  num_documents=sum(1 for f in files if f.stat().st_size > 0),
                  settings=settings)


# ---------------------------------------------------------------------------------------------
# tiny Shakespeare: one download, then offline


def cache_dir() -> Path:
    """Where downloaded corpora are kept: ``$SOPHIA_BENCH_CACHE``, else
    ``$XDG_CACHE_HOME/sophia-bench``, else ``~/.cache/sophia-bench``."""
    explicit = os.environ.get("SOPHIA_BENCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sophia-bench"


def shakespeare_path() -> Path:
    """The cached tiny Shakespeare (maybe not there yet: ``fetch_shakespeare`` makes it)."""
    return cache_dir() / "tinyshakespeare" / "input.txt"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_shakespeare(timeout: float = 60.0) -> Path:
    """The cached tiny Shakespeare, downloaded from ``SHAKESPEARE_URL`` first when missing.

    The bytes are checked against ``SHAKESPEARE_SHA256`` either way; the download is written to a
    temporary file and renamed, so an interrupted one never leaves a partial cache behind."""
    path = shakespeare_path()
    if path.exists():
        data = path.read_bytes()
        if _sha256(data) != SHAKESPEARE_SHA256:
            raise DataError(
                f"The cached tiny Shakespeare {path} ({len(data):,} bytes) is not the expected "
                f"file ({SHAKESPEARE_BYTES:,} bytes, sha256 {SHAKESPEARE_SHA256}). Delete it to "
                "download it again, or pass your copy as the source (data.source=/path/to/"
                "input.txt).")
        return path
    import urllib.request

    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=timeout) as response:
            data = response.read()
    except (OSError, ValueError) as e:  # URLError, timeouts and HTTP errors are OSErrors
        raise DataError(
            f"Could not download tiny Shakespeare from {SHAKESPEARE_URL}: {type(e).__name__}: "
            f"{e}. Offline, download that file elsewhere and either put it at {path} or pass it "
            "as the source (data.source=/path/to/input.txt, or `python -m data.prepare "
            "/path/to/input.txt`).") from e
    if _sha256(data) != SHAKESPEARE_SHA256:
        raise DataError(
            f"The download of {SHAKESPEARE_URL} ({len(data):,} bytes, sha256 {_sha256(data)}) is "
            f"not tiny Shakespeare as expected ({SHAKESPEARE_BYTES:,} bytes, sha256 "
            f"{SHAKESPEARE_SHA256}); nothing was cached. If the file moved, pass a good copy as "
            "the source (data.source=/path/to/input.txt).")
    return write_bytes_atomic(path, data)


def _shakespeare_source(*, split_blank_lines: bool) -> Source:
    # Nothing is downloaded until documents() runs, so checking an existing prepare needs no
    # network. The checksum stands in for a fingerprint: it is what the prepared bytes come from.
    info = {"url": SHAKESPEARE_URL, "sha256": SHAKESPEARE_SHA256,
            "path": str(shakespeare_path()), "split_blank_lines": split_blank_lines}

    def documents() -> Iterator[str]:
        yield from _read_file(fetch_shakespeare(), text_column="text",
                              split_blank_lines=split_blank_lines)

    settings = {"source_fingerprint": SHAKESPEARE_SHA256,
                "split_blank_lines": bool(split_blank_lines)}
    return Source(name="shakespeare", kind="download", spec="shakespeare", documents=documents,
                  info=info, fingerprint=SHAKESPEARE_SHA256,
                  num_documents=None if split_blank_lines else 1, settings=settings)


# ---------------------------------------------------------------------------------------------


def _files_fingerprint(files: list[Path], root: Path | None = None, *, mtimes: bool = True) -> str:
    """Cheap identity of a set of files (names, sizes, mtimes): no need to read them."""
    parts = []
    for f in files:
        st = f.stat()
        name = f.relative_to(root).as_posix() if root is not None and root.is_dir() else f.name
        parts.append((name, st.st_size, st.st_mtime_ns) if mtimes else (name, st.st_size))
    return _digest(parts)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
