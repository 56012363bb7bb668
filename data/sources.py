"""Where documents come from: two registries, named sources and local file readers by suffix.

A source spec resolves once into a ``Source``: a name (for the default output folder), the facts
that go into meta.json, a fingerprint (to tell whether an existing prepare is still current) and
a function that streams documents in a fixed order. Every reader streams, so memory stays bounded
however large the corpus (a single .txt file read as one document is the one exception, by
definition).

Spec strings:
    a registered name     ``SOURCES``: openwebtext, stdlib, shakespeare, ... (``register_source``)
    hf:<id>               any Hugging Face dataset with a text column (streamed)
    PATH                  a file of a registered suffix (``READERS``: .txt, .jsonl, .parquet, ...),
                          or a folder searched recursively for such files

Adding a named source is one function registered with ``@register_source("name")``; adding a file
format is one function registered with ``@register_reader(".suffix")``. Everything that lists the
choices (error messages, the CLI's help, the default val_fraction per source) reads the registries.

Each source also carries ``settings``: the facts that decide the prepared bytes (a local source's
file fingerprint and the options its readers honour, the stdlib's Python version, a Hugging Face
id/revision/...). ``data.prepare`` records them in meta.json and refuses to reuse or overwrite a
folder whose recorded settings differ, so two sources never share one prepared folder unnoticed.

Local files are read as UTF-8: a file that is not (a binary file given as text) is refused, naming
the byte offset of its first invalid sequence, unless ``errors="replace"`` asks for each invalid
sequence to become U+FFFD. A folder is searched without leaving it: a symbolic link whose target
lies outside it is refused unless ``follow_symlinks``, and a file reachable under several names is
read once.

OpenWebText: its Hub repository is a loading-script dataset, which ``datasets`` >= 4 refuses to
run. The Hub's automatic parquet conversion lives at the revision ``refs/convert/parquet`` of the
same repository and loads with plain ``datasets``; both the id and the revision are configurable
(``--hf-id`` / ``--revision``) in case you prefer another parquet mirror.
"""
from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from data.errors import DataError, SourceError
from data.files import write_bytes_atomic

OPENWEBTEXT_ID = "Skylion007/openwebtext"
OPENWEBTEXT_REVISION = "refs/convert/parquet"
HF_PREFIX = "hf:"
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__"}

# The val share of a source that registers none (a named source's own default is the value of its
# training config, configs/data/<name>.yaml, so that a prepare by hand and a training run agree).
DEFAULT_VAL_FRACTION = 0.01

# tiny Shakespeare as nanoGPT's data/shakespeare_char/prepare.py downloads it. The checksum pins the
# exact bytes: the URL is a moving branch, and a truncated or altered download must never be
# prepared under the name "shakespeare" (its recorded settings could not tell the difference).
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_BYTES = 1_115_394


@dataclass(frozen=True)
class SourceOptions:
    """The options a source or reader may honour (``resolve_source``'s keyword arguments).

    A source records in ``Source.settings`` only those that change what it yields, so an option
    that does not apply to it never makes two identical prepares look different."""

    text_column: str = "text"  # the text field of .jsonl / .parquet / Hugging Face rows
    revision: str | None = None  # Hugging Face revision
    split: str = "train"  # Hugging Face split
    split_blank_lines: bool = False  # .txt: one document per blank-line-separated paragraph
    hf_id: str | None = None  # Hugging Face dataset id
    hf_name: str | None = None  # Hugging Face config name
    hf_data_dir: str | None = None
    hf_data_files: str | list[str] | None = None
    errors: str = "strict"  # local text that is not UTF-8: "strict" refuses it, "replace" U+FFFDs
    follow_symlinks: bool = False  # read symlinks in a source folder whose targets lie outside it


SOURCE_OPTIONS = tuple(f.name for f in dataclasses.fields(SourceOptions))
TEXT_ERRORS = ("strict", "replace")  # the values of SourceOptions.errors
# Option values that a source's settings leave out: they yield exactly what the code did before
# the option existed, so folders prepared then still match. A setting missing on one side of a
# comparison stands for this value.
IMPLIED_SETTINGS: Mapping[str, Any] = {"errors": "strict", "follow_symlinks": False}


@dataclass
class Source:
    """A resolved corpus: ``documents()`` streams its documents (str) in a fixed order."""

    name: str
    kind: str  # "hf" | "local" | "stdlib" | "download" (shakespeare), or a new source's own
    spec: str
    documents: Callable[[], Iterator[str]] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)  # recorded in meta.json
    fingerprint: str = ""  # changes when the underlying data changes
    # Non-empty documents (data.prepare skips empty ones), when cheap to know: the progress bar's
    # total, and what val_split="auto" decides on without reading the corpus.
    num_documents: int | None = None
    # What decides the prepared bytes besides the tokenizer and split: recorded in meta.json and
    # compared before an existing prepare is reused.
    settings: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The registries


@dataclass(frozen=True)
class NamedSource:
    """A registered named source: ``make(options)`` builds its ``Source``."""

    name: str
    make: Callable[[SourceOptions], Source]
    val_fraction: float | None = None  # its default val share; None: DEFAULT_VAL_FRACTION
    defaults: Mapping[str, Any] = field(default_factory=dict)  # option values it defaults to


@dataclass(frozen=True)
class Reader:
    """A registered reader of local files with one suffix: ``read(path, options)`` streams the
    file's documents."""

    suffix: str
    read: Callable[[Path, SourceOptions], Iterator[str]]
    options: tuple[str, ...] = ()  # the SourceOptions it honours: recorded in settings
    # Non-empty documents in the file when known without reading it, else None.
    count: Callable[[Path, SourceOptions], int | None] | None = None


SOURCES: dict[str, NamedSource] = {}
READERS: dict[str, Reader] = {}

MakeSource = Callable[[SourceOptions], Source]
ReadFile = Callable[[Path, SourceOptions], Iterator[str]]


def _check_options(names, what: str) -> None:
    unknown = sorted(set(names) - set(SOURCE_OPTIONS))
    if unknown:
        raise DataError(f"{what}: unknown option(s) {', '.join(unknown)}; the options are the "
                         f"fields of SourceOptions: {', '.join(SOURCE_OPTIONS)}.")


def register_source(name: str, *, val_fraction: float | None = None,
                    defaults: Mapping[str, Any] | None = None) -> Callable[[MakeSource],
                                                                           MakeSource]:
    """Decorator: register ``make(options: SourceOptions) -> Source`` as the source ``name``.

    ``val_fraction`` is its default val share (use the value of its ``configs/data`` preset, if
    it has one); ``defaults`` maps ``SourceOptions`` fields to the values this source uses when
    the caller leaves them unset, and the CLI and the ``python -m data.prepare`` command printed
    in errors follow them too. Returns ``make`` unchanged."""
    if not name or name.startswith(HF_PREFIX):
        raise ValueError(f"register_source({name!r}): a source name must be non-empty and must "
                         f"not start with {HF_PREFIX!r}, which names Hugging Face datasets.")
    if name in SOURCES:
        raise ValueError(f"register_source({name!r}): {name!r} is registered already; choose "
                         f"another name (registered: {', '.join(SOURCES)}).")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"register_source({name!r}): val_fraction={val_fraction} must be in "
                         "[0, 1).")
    _check_options(defaults or {}, f"register_source({name!r}) defaults")

    def register(make: MakeSource) -> MakeSource:
        SOURCES[name] = NamedSource(name, make, val_fraction, dict(defaults or {}))
        return make

    return register


def register_reader(suffix: str, *, options: tuple[str, ...] = (),
                    count: Callable[[Path, SourceOptions], int | None] | None = None
                    ) -> Callable[[ReadFile], ReadFile]:
    """Decorator: register ``read(path, options: SourceOptions) -> Iterator[str]`` as the reader
    of local files ending in ``suffix`` (matched case-insensitively, e.g. ``".txt"``).

    ``options`` names the ``SourceOptions`` fields the reader honours: a local source records
    them in its settings when it holds a file of this type. ``count(path, options)``, if given,
    returns the number of non-empty documents in a file without reading it (None when it cannot
    tell). Returns ``read`` unchanged."""
    key = suffix.lower()
    if not key.startswith(".") or len(key) < 2:
        raise ValueError(f"register_reader({suffix!r}): a suffix looks like '.ext'.")
    if key in READERS:
        raise ValueError(f"register_reader({suffix!r}): {key!r} is registered already "
                         f"(registered: {', '.join(READERS)}).")
    _check_options(options, f"register_reader({suffix!r}) options")

    def register(read: ReadFile) -> ReadFile:
        READERS[key] = Reader(key, read, tuple(options), count)
        return read

    return register


def _suffixes(last: str) -> str:
    """The registered suffixes as prose: ".txt, .jsonl or .parquet"."""
    names = list(READERS)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def source_choices() -> str:
    """The source specs this code accepts, in words, for messages and the CLI's help."""
    return (f"{', '.join(SOURCES)}, {HF_PREFIX}<dataset id>, or a {'/'.join(READERS)} file or a "
            "folder of them")


def default_val_fraction(spec: str | os.PathLike) -> float:
    """The val_fraction a source gets when none is given: its registered one, else
    ``DEFAULT_VAL_FRACTION``."""
    entry = SOURCES.get(str(spec))
    if entry is None or entry.val_fraction is None:
        return DEFAULT_VAL_FRACTION
    return entry.val_fraction


def source_defaults(spec: str | os.PathLike) -> dict[str, Any]:
    """The option values source ``spec`` uses when the caller leaves them unset (beyond
    ``SourceOptions``'s own defaults): a named source's registered ``defaults``, and for
    ``hf:<id>`` that id as ``hf_id``."""
    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        return {"hf_id": spec[len(HF_PREFIX):]}
    entry = SOURCES.get(spec)
    return dict(entry.defaults) if entry is not None else {}


def source_options(spec: str | os.PathLike, **given: Any) -> SourceOptions:
    """The options source ``spec`` reads with: ``given`` where not None, else the source's
    defaults (``source_defaults``), else ``SourceOptions``'s."""
    _check_options(given, "source options")
    values = {**source_defaults(spec), **{k: v for k, v in given.items() if v is not None}}
    for key in ("split_blank_lines", "follow_symlinks"):
        if key in values:
            values[key] = bool(values[key])
    if values.get("errors", "strict") not in TEXT_ERRORS:
        raise DataError(f"errors={values['errors']!r} is not a way to read text; choose strict "
                        "(refuse a file that is not valid UTF-8) or replace (prepare it with each "
                        "invalid sequence replaced by U+FFFD).")
    return SourceOptions(**values)


def resolve_source(spec: str | os.PathLike, **options: Any) -> Source:
    """Turn a source spec into a ``Source`` (see the module docstring for the forms).

    ``options`` are ``SourceOptions`` fields (text_column, revision, split, split_blank_lines,
    hf_id, hf_name, hf_data_dir, hf_data_files, errors, follow_symlinks); an unset or None one
    takes the source's default."""
    spec = str(spec)
    opts = source_options(spec, **options)
    if spec.startswith(HF_PREFIX):
        dataset_id = spec[len(HF_PREFIX):]
        if not dataset_id:
            raise DataError(f"Source {HF_PREFIX!r} needs a dataset id, e.g. "
                            f"{HF_PREFIX}roneneldan/TinyStories.")
        return hf_source(dataclasses.replace(opts, hf_id=dataset_id), spec=spec,
                         name=dataset_id.replace("/", "_").replace(":", "_"))
    if spec in SOURCES:
        return SOURCES[spec].make(opts)
    path = Path(spec).expanduser()
    if path.exists():
        return _local_source(path, opts)
    raise DataError(
        f"Unknown data source {spec!r}: it is no registered name, not {HF_PREFIX}<dataset id> and "
        f"no existing file or folder. A source is {source_choices()}. Check the path, or use "
        "'stdlib' for an offline corpus that needs no download."
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face


def hf_source(options: SourceOptions, *, spec: str, name: str) -> Source:
    """A Hugging Face dataset streamed with ``datasets`` (``options.hf_id``, ``revision``,
    ``split``, ``hf_name``, ``hf_data_dir``, ``hf_data_files``), one row per document
    (``text_column``); ``spec`` and ``name`` are the Source's. Nothing is loaded before
    ``documents()`` runs."""
    dataset_id, text_column = options.hf_id, options.text_column
    revision, split = options.revision, options.split
    config_name, data_dir, data_files = options.hf_name, options.hf_data_dir, options.hf_data_files
    if not dataset_id:
        raise DataError(f"Source {spec!r} needs a Hugging Face dataset id (hf_id / --hf-id).")
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
                        raise SourceError(
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
        + f". Re-running the same command resumes an interrupted prepare. Offline, prepare a "
        f"local {'/'.join(READERS)} file or folder, or the 'stdlib' corpus, instead."
    )


@register_source("openwebtext", val_fraction=0.0005,
                 defaults={"hf_id": OPENWEBTEXT_ID, "revision": OPENWEBTEXT_REVISION})
def openwebtext(options: SourceOptions) -> Source:
    """OpenWebText from its parquet conversion on the Hugging Face hub (nanoGPT's 0.0005 val
    share of its 8M documents)."""
    return hf_source(options, spec="openwebtext", name="openwebtext")


# ---------------------------------------------------------------------------------------------
# Local files


def _local_source(path: Path, options: SourceOptions) -> Source:
    path = path.resolve()
    followed = False
    if path.is_dir():
        files, followed = _folder_files(path, options.follow_symlinks)
        if not files:
            raise DataError(
                f"Folder {path} holds no {_suffixes('or')} files to prepare. Point the source at "
                "a folder (searched recursively) or file of one of those types."
            )
    elif path.suffix.lower() not in READERS:
        raise DataError(f"Cannot read {path}: supported local files are {_suffixes('and')}; "
                        "convert it to one of those, or register a reader for its suffix.")
    else:
        files = [path]
    readers = [READERS[f.suffix.lower()] for f in files]

    def documents() -> Iterator[str]:
        for f, reader in zip(files, readers):
            yield from reader.read(f, options)

    counts = [r.count(f, options) if r.count is not None else None
              for f, r in zip(files, readers)]
    honoured = dict.fromkeys(o for r in dict.fromkeys(readers) for o in r.options)
    if followed:  # it decided which files are read
        honoured["follow_symlinks"] = None
    recorded = {o: getattr(options, o) for o in honoured
                if o not in IMPLIED_SETTINGS or getattr(options, o) != IMPLIED_SETTINGS[o]}
    fingerprint = _files_fingerprint(files, root=path)
    settings: dict[str, Any] = {"source_fingerprint": fingerprint, **recorded}
    info = {"path": str(path), "files": len(files), **recorded}
    return Source(name=path.stem if path.is_file() else path.name, kind="local", spec=str(path),
                  documents=documents, info=info, fingerprint=fingerprint,
                  num_documents=None if None in counts else sum(counts), settings=settings)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _folder_files(root: Path, follow_symlinks: bool) -> tuple[list[Path], bool]:
    """The readable files of folder ``root`` (resolved), in sorted relative-path order, and
    whether a symbolic link out of it was followed.

    Every file is read once, however many names reach it: by a path without links when it has
    one, else by the first (in sorted order) of the names that reach it. A link whose target lies
    outside ``root`` is refused unless ``follow_symlinks``; a link to nothing is refused either
    way."""
    base = str(root)
    chosen: dict[str, tuple[int, str, Path]] = {}  # real path -> (via a link, name, path)
    outside: list[tuple[str, Path, str]] = []  # (name, link, target)

    def offer(path: Path, target: str, via_link: bool) -> None:
        key = (int(via_link), path.relative_to(root).as_posix(), path)
        if target not in chosen or key[:2] < chosen[target][:2]:
            chosen[target] = key

    def leaves(link: Path, target: str) -> bool:
        if _inside(target, base):
            return False
        outside.append((link.relative_to(root).as_posix(), link, target))
        return True

    pending, seen_dirs = [(root, False)], {base}
    while pending:
        top, via_link = pending.pop()
        for dirpath, dirnames, filenames in os.walk(top):  # never into linked folders itself
            here = Path(dirpath)
            for name in dirnames:
                link = here / name
                if link.is_symlink():
                    target = os.path.realpath(link)
                    # One inside the folder is walked anyway, without the link.
                    if leaves(link, target) and follow_symlinks and target not in seen_dirs:
                        seen_dirs.add(target)
                        pending.append((link, True))
            for name in filenames:
                path = here / name
                if path.suffix.lower() not in READERS:
                    continue
                if not path.is_symlink():
                    if path.is_file():
                        offer(path, os.path.realpath(path), via_link)
                    continue
                target = os.path.realpath(path)
                if not os.path.exists(target):
                    raise DataError(f"{path} is a symbolic link to {target}, which does not "
                                    "exist: remove the link or restore its target.")
                if (not leaves(path, target) or follow_symlinks) and os.path.isfile(target):
                    offer(path, target, True)
    if outside and not follow_symlinks:
        _, link, target = min(outside)
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise DataError(
            f"{link} is a symbolic link to {target}, outside the source folder {root}{more}: "
            "refusing to read files from elsewhere. Copy them into the folder, or pass "
            "--follow-symlinks (data.follow_symlinks=true) to read them.")
    files = sorted((path for _, _, path in chosen.values()),
                   key=lambda p: p.relative_to(root).as_posix())
    return files, bool(outside)


def read_file(path: str | os.PathLike, options: SourceOptions | None = None) -> Iterator[str]:
    """The documents of one local file, by the reader registered for its suffix."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"Cannot read {path}: supported local files are {_suffixes('and')}.")
    return reader.read(path, options or SourceOptions())


def _not_utf8(where: str, offset: int, e: UnicodeDecodeError, of: str = "") -> SourceError:
    bad = " ".join(f"0x{b:02x}" for b in e.object[e.start:e.end])
    return SourceError(
        f"{where} is not valid UTF-8: {bad} at byte offset {offset}{of} ({e.reason}). Give "
        "UTF-8 text (not a binary file or another encoding), or pass --errors replace "
        "(data.errors=replace) to prepare it with each invalid sequence replaced by U+FFFD.")


def _first_invalid_utf8(path: Path) -> tuple[int, UnicodeDecodeError] | None:
    """The byte offset of the first invalid UTF-8 sequence in ``path`` and its decode error
    (None when the whole file is valid), streamed in bounded pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            piece = f.read(1 << 20)
            buffered = len(decoder.getstate()[0])  # the start of a sequence cut by the last piece
            try:
                decoder.decode(piece, final=not piece)
            except UnicodeDecodeError as e:
                return offset - buffered + e.start, e
            if not piece:
                return None
            offset += len(piece)


@contextlib.contextmanager
def _utf8_errors_named(path: Path) -> Iterator[None]:
    """Turn a decode error while reading ``path`` as text into a ``SourceError`` that names the
    file's first invalid byte offset (a text stream's own error only knows its buffer's)."""
    try:
        yield
    except UnicodeDecodeError as e:
        found = _first_invalid_utf8(path)
        offset, e = found if found is not None else (e.start, e)
        raise _not_utf8(str(path), offset, e) from None


def _txt_count(path: Path, options: SourceOptions) -> int | None:
    # Read whole, a non-empty file is one document (it never decodes to ""); an empty one is an
    # empty document, which prepare skips. Paragraphs cannot be counted without reading.
    return None if options.split_blank_lines else int(path.stat().st_size > 0)


@register_reader(".txt", options=("split_blank_lines", "errors"), count=_txt_count)
def read_txt(path: Path, options: SourceOptions) -> Iterator[str]:
    """The whole file as one document, or with ``split_blank_lines`` one document per paragraph
    (lines separated by blank lines, each exactly as in the file without its final line break).
    Text that is not UTF-8 raises ``SourceError`` unless ``options.errors`` is "replace"."""
    if not options.split_blank_lines:
        with _utf8_errors_named(path):
            text = path.read_bytes().decode("utf-8", errors=options.errors)
        yield text
        return
    lines: list[str] = []
    with open(path, encoding="utf-8", errors=options.errors, newline="") as f, \
            _utf8_errors_named(path):
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\r\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\r\n")


@register_reader(".jsonl", options=("text_column", "errors"))
def read_jsonl(path: Path, options: SourceOptions) -> Iterator[str]:
    """One document per JSON object line (its ``text_column`` field; blank lines skipped)."""
    text_column = options.text_column
    with open(path, encoding="utf-8", errors=options.errors) as f, _utf8_errors_named(path):
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{lineno} is not valid JSON ({e}); each line of a "
                                  ".jsonl file must be one JSON object.") from e
            if not isinstance(row, dict) or text_column not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise SourceError(f"{path}:{lineno} has no {text_column!r} field (found {keys}). "
                                  "Pass --text-column with the field that holds the text.")
            if row[text_column] is not None:
                yield _encodable(str(row[text_column]), options.errors,
                                 f"{path}:{lineno}: the {text_column!r} field")


# JSON can escape half of a UTF-16 surrogate pair ("\ud800"): valid UTF-8 in the file, but a
# string that no UTF-8 tokenizer can encode.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str, errors: str, where: str) -> str:
    """``text``, whose lone surrogates raise ``SourceError`` (errors "strict") or become U+FFFD
    (errors "replace")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        if errors != "replace":
            raise SourceError(
                f"{where} holds {text[e.start]!r} at character {e.start}, half of a UTF-16 "
                "surrogate pair, which is not valid UTF-8. Fix the text, or pass --errors "
                "replace (data.errors=replace) to prepare it with U+FFFD in its place.") from None
        text = _LONE_SURROGATE.sub("\ufffd", text)
    return text


@register_reader(".parquet", options=("text_column", "errors"))
def read_parquet(path: Path, options: SourceOptions) -> Iterator[str]:
    """One document per row (its ``text_column`` column), read in batches of 1024 rows; a binary
    column is decoded as UTF-8 (``options.errors``)."""
    import pyarrow.parquet as pq

    text_column = options.text_column
    pf = pq.ParquetFile(path)
    if text_column not in pf.schema_arrow.names:
        raise SourceError(f"{path} has no column {text_column!r} (columns: "
                          f"{pf.schema_arrow.names}). Pass --text-column with the column that "
                          "holds the text.")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_column]):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8", errors=options.errors)
                except UnicodeDecodeError as e:
                    raise _not_utf8(f"{path}, row {row} of column {text_column!r},", e.start, e,
                                    of=" of the value") from None
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


# 0.02 rather than 0.0005: the stdlib has ~2,000 files, and 0.0005 would leave val one or two.
@register_source("stdlib", val_fraction=0.02)
def stdlib(options: SourceOptions) -> Source:
    """The running Python's standard library, one document per .py file (no download)."""
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


# One document and nanoGPT's 0.1 val share, as its shakespeare_char data (configs/data/shakespeare).
@register_source("shakespeare", val_fraction=0.1, defaults={"split_blank_lines": False})
def shakespeare(options: SourceOptions) -> Source:
    """tiny Shakespeare (nanoGPT's ``input.txt``, 1,115,394 ASCII bytes), read from a cache and
    downloaded there once when missing (``SHAKESPEARE_URL``)."""
    # Nothing is downloaded until documents() runs, so checking an existing prepare needs no
    # network. The checksum stands in for a fingerprint: it is what the prepared bytes come from.
    split_blank_lines = options.split_blank_lines
    info = {"url": SHAKESPEARE_URL, "sha256": SHAKESPEARE_SHA256,
            "path": str(shakespeare_path()), "split_blank_lines": split_blank_lines}

    def documents() -> Iterator[str]:
        yield from read_txt(fetch_shakespeare(), options)

    settings = {"source_fingerprint": SHAKESPEARE_SHA256, "split_blank_lines": split_blank_lines}
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
