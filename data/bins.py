"""On-disk format: ``train.bin`` / ``val.bin`` (flat token streams) and ``meta.json``.

Reading checks that they belong together: ``read_meta`` that meta.json describes the tokenizer it
names (vocabulary, end-of-text id, dtype), ``check_bin`` that a bin's size is whole tokens of its
count, ``check_tokens`` that a sample of its ids fits the vocabulary and that it ends with the
end-of-text id where a document ends.

Atomicity: prepare writes ``<split>.bin.tmp`` and a resume state file, fsyncs, renames the bins to
their final names and writes ``meta.json`` last (itself via temp + fsync + rename). A folder whose
meta.json is missing, or says ``complete: false``, is therefore never mistaken for finished data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import DataError
from data.files import write_text_atomic
from data.sources import source_choices
from data.tokenizers import TOKENIZER_SPECS, token_dtype, tokenizer_spec

FORMAT_VERSION = 1
SPLITS = ("train", "val")
META_NAME = "meta.json"
STATE_NAME = ".prepare-state.json"  # resume point of an unfinished prepare
LOCK_NAME = ".prepare.lock"
TMP_SUFFIX = ".tmp"


def bin_path(data_dir: str | os.PathLike, split: str) -> Path:
    return Path(data_dir) / f"{split}.bin"


def tmp_bin_path(data_dir: str | os.PathLike, split: str) -> Path:
    return Path(data_dir) / f"{split}.bin{TMP_SUFFIX}"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` so that readers see either the old file or the whole new one."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _prepare_hint(data_dir: Path) -> str:
    return (f"Run `python -m data.prepare SOURCE --out {data_dir}` (SOURCE: {source_choices()}) "
            "to create it.")


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check ``meta.json`` of a complete prepare, or raise ``DataError``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"Prepared data folder {data_dir} does not exist. "
                        f"{_prepare_hint(data_dir)}")
    meta_path = data_dir / META_NAME
    if not meta_path.exists():
        leftovers = [p.name for p in data_dir.iterdir()
                     if p.name == STATE_NAME or p.name.endswith(TMP_SUFFIX) or p.suffix == ".bin"]
        if leftovers:
            raise DataError(
                f"{data_dir} holds an incomplete prepare (found {sorted(leftovers)} but no "
                f"{META_NAME}): it was interrupted before it finished. Re-run the same "
                "`python -m data.prepare ...` command with this --out folder; it resumes where it "
                "stopped and writes meta.json when the data is complete."
            )
        raise DataError(f"{data_dir} has no {META_NAME}, so it holds no prepared data. "
                        f"{_prepare_hint(data_dir)}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path} is unreadable ({e}). Re-run the prepare with --force to "
                        "rebuild it.") from e
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        raise DataError(f"{meta_path} does not mark a complete prepare. Re-run the same "
                        "`python -m data.prepare ...` command to finish it.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{meta_path} has format_version {meta.get('format_version')!r}; this code "
                        f"reads version {FORMAT_VERSION}. Re-run the prepare with --force.")
    for key in ("tokenizer", "vocab_size", "eot", "dtype", "train_tokens", "val_tokens",
                "settings"):
        if key not in meta:
            raise DataError(f"{meta_path} lacks the field {key!r}. Re-run the prepare with "
                            "--force.")
    if not isinstance(meta["settings"], dict):
        raise DataError(f"{meta_path}: settings is {meta['settings']!r}, not a mapping of the "
                        "prepare's settings. Re-run the prepare with --force.")
    _check_against_tokenizer(meta_path, meta)
    if meta.get("max_token_id", -1) >= meta["vocab_size"]:
        raise DataError(f"{meta_path} records token id {meta['max_token_id']}, which is not below "
                        f"its vocabulary of {meta['vocab_size']}. The prepare was corrupt; re-run "
                        "it with --force.")
    return meta


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_against_tokenizer(meta_path: Path, meta: dict[str, Any]) -> None:
    """Refuse a meta.json whose counts are no counts, or whose vocabulary, end-of-text id or
    dtype are not those of the tokenizer it names: a model would be built for the wrong
    vocabulary, or the bins read with the wrong item size."""
    def refuse(field: str, found: Any, expected: str) -> DataError:
        return DataError(f"{meta_path}: {field} is {found!r}, expected {expected}: this meta.json "
                         "does not describe its data. Re-run the prepare with --force.")

    for field in ("train_tokens", "val_tokens"):
        if not _is_count(meta[field]):
            raise refuse(field, meta[field], "a count (an integer >= 0)")
    max_id = meta.get("max_token_id", -1)
    if not (_is_count(max_id) or max_id == -1):
        raise refuse("max_token_id", max_id, "a token id (an integer >= 0)")
    name = meta["tokenizer"]
    if not isinstance(name, str) or name not in TOKENIZER_SPECS:
        raise refuse("tokenizer", name, f"one of {', '.join(TOKENIZER_SPECS)}")
    spec = tokenizer_spec(name)
    facts = [("vocab_size", spec.vocab_size, f"the {name} tokenizer's vocabulary"),
             ("eot", spec.eot, f"the {name} tokenizer's end-of-text id"),
             ("dtype", token_dtype(spec.vocab_size).name, f"the dtype that holds the {name} "
              "tokenizer's ids")]
    for field, expected, what in facts:
        if meta[field] != expected:
            raise refuse(field, meta[field], f"{expected!r} ({what})")
    recorded = meta["settings"].get("tokenizer", name)
    if recorded != name:
        raise refuse("settings.tokenizer", recorded, f"{name!r} (its tokenizer field)")


def check_bin(data_dir: str | os.PathLike, split: str, meta: dict[str, Any]) -> Path:
    """Check that ``<split>.bin`` exists and its size matches the meta's token count."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    path = bin_path(data_dir, split)
    if not path.exists():
        raise DataError(f"{path} is missing although meta.json marks the prepare complete. "
                        "Re-run the prepare with --force to rebuild the folder.")
    itemsize = np.dtype(meta["dtype"]).itemsize
    tokens = int(meta[f"{split}_tokens"])
    size = path.stat().st_size
    if size % itemsize:
        raise DataError(f"{path}: size is {size} bytes, expected a multiple of {itemsize} (the "
                        f"{meta['dtype']} item size): the file was cut short or written with "
                        "another dtype. Re-run the prepare with --force.")
    if size != tokens * itemsize:
        raise DataError(
            f"{path} has {size} bytes but meta.json says {tokens} {meta['dtype']} tokens "
            f"({tokens * itemsize} bytes): the bin and the meta do not belong together (a copy "
            "was truncated, or files from different prepares were mixed). Re-run the prepare "
            "with --force."
        )
    return path


# Where check_tokens looks: this many evenly spaced pieces of this many tokens, a few reads however
# large the bin (a full scan is TokenLoader.check_vocab(scan=True)).
SAMPLE_PIECES = 16
SAMPLE_TOKENS = 4096


def token_error(path: Path, offset: int, token: int, meta: dict[str, Any]) -> DataError:
    """The refusal of token id ``token`` at ``offset`` of bin ``path``: not below the vocabulary
    of the tokenizer ``meta`` names."""
    return DataError(f"{path}: token id is {token} at offset {offset}, expected below "
                     f"{meta['vocab_size']} (vocab_size of tokenizer {meta['tokenizer']} in "
                     "meta.json): the bin is corrupt or was written by another tokenizer. Re-run "
                     "the prepare with --force.")


def check_tokens(path: Path, split: str, meta: dict[str, Any]) -> None:
    """Check a sample of ``path``'s token ids (the bin of ``split``, sized as ``check_bin``
    checked) against the tokenizer in ``meta``: every sampled id below its vocabulary, and the
    last token its end-of-text id when the bin ends where a document does.

    Bins of another tokenizer fail one or the other: byte ids are all valid GPT-2 ids, but the
    stream ends with 256, not 50256. Only the train bin of a tail split (``val_split: tail``
    with val tokens) may end inside a document."""
    dtype = np.dtype(meta["dtype"])
    n = int(meta[f"{split}_tokens"])
    if n == 0:
        return
    vocab, eot = int(meta["vocab_size"]), int(meta["eot"])
    count = min(SAMPLE_TOKENS, n)
    for start in sorted({int(x) for x in np.linspace(0, n - count, SAMPLE_PIECES)}):
        piece = np.fromfile(path, dtype=dtype, count=count, offset=start * dtype.itemsize)
        bad = np.flatnonzero(piece >= vocab)
        if bad.size:
            raise token_error(path, start + int(bad[0]), int(piece[bad[0]]), meta)
    last = int(np.fromfile(path, dtype=dtype, count=1, offset=(n - 1) * dtype.itemsize)[0])
    cut_inside_a_document = (split == "train" and meta.get("val_split") == "tail"
                             and int(meta["val_tokens"]) > 0)
    if last != eot and not cut_inside_a_document:
        raise DataError(f"{path}: last token is {last}, expected {eot} (the end-of-text id of "
                        f"tokenizer {meta['tokenizer']}, which ends every document): the bin was "
                        "written by another tokenizer or is corrupt. Re-run the prepare with "
                        "--force.")
