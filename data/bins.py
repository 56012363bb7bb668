"""On-disk format: ``train.bin`` / ``val.bin`` (flat token streams) and ``meta.json``.

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
from data.tokenizers import token_dtype

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
    expected = token_dtype(int(meta["vocab_size"])).name
    if meta["dtype"] != expected:
        raise DataError(f"{meta_path} says dtype {meta['dtype']} but a vocabulary of "
                        f"{meta['vocab_size']} is stored as {expected}. The meta does not match "
                        "the bins; re-run the prepare with --force.")
    if int(meta.get("max_token_id", -1)) >= int(meta["vocab_size"]):
        raise DataError(f"{meta_path} records token id {meta['max_token_id']}, which is not below "
                        f"its vocabulary of {meta['vocab_size']}. The prepare was corrupt; re-run "
                        "it with --force.")
    if not 0 <= int(meta["eot"]) < int(meta["vocab_size"]):
        raise DataError(f"{meta_path}: eot {meta['eot']} is outside the vocabulary of "
                        f"{meta['vocab_size']}. Re-run the prepare with --force.")
    return meta


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
    if size != tokens * itemsize:
        raise DataError(
            f"{path} has {size} bytes but meta.json says {tokens} {meta['dtype']} tokens "
            f"({tokens * itemsize} bytes): the bin and the meta do not belong together (a copy "
            "was truncated, or files from different prepares were mixed). Re-run the prepare "
            "with --force."
        )
    return path
