"""data.prepare settings: a prepared folder is never silently stale, re-split or shared by two
sources; ensure_prepared (the engine's entry point); CLI defaults that match configs/data."""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
from pathlib import Path

import pytest
import yaml

import data.prepare as dp
from data import DataError
from data.bins import read_meta
from data.prepare import ensure_prepared, prepare

REPO = Path(__file__).resolve().parents[1]
FAST = dict(workers=1, progress=False)


def write_corpus(path: Path, n: int = 60, tag: str = "") -> Path:
    """``n`` short blank-line-separated paragraphs: enough documents for a 10-30% val split."""
    path.write_text("\n\n".join(f"{tag}paragraph {i}: " + "word " * (i % 9) for i in range(n))
                    + "\n", encoding="utf-8")
    return path


def snapshot(out: Path) -> dict[str, tuple[bytes, int, int]]:
    """Each file's bytes, inode and mtime: a folder prepared again (written anew and renamed into
    place) differs even where the bytes come out the same."""
    return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(out.iterdir())
            if p.is_file() and not p.name.startswith(".prepare.lock")}


_FORBIDDEN: set[str] = set()  # files that must not be opened, checked by _refuse_opening


def _refuse_opening(event: str, args: tuple) -> None:
    if event == "open" and _FORBIDDEN and isinstance(args[0], (str, os.PathLike)) \
            and os.path.abspath(args[0]) in _FORBIDDEN:
        raise AssertionError(f"{args[0]} was opened: the corpus was read or tokenized again")


# An audit hook sees every open(), whichever code makes it; hooks cannot be removed, so this one
# is installed once and does nothing while _FORBIDDEN is empty.
sys.addaudithook(_refuse_opening)


@pytest.fixture()
def forbid_reading():
    """Call the returned function with source files to make the test fail if, from then on,
    any of them is opened (hence read or tokenized); looking at their size and mtime is fine."""

    def forbid(*paths: Path) -> None:
        _FORBIDDEN.update(os.path.abspath(p) for p in paths)

    yield forbid
    _FORBIDDEN.clear()


def config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "data" / f"{name}.yaml").read_text())


def test_other_val_fraction_refuses_and_leaves_the_data_alone(tmp_path, capsys, monkeypatch):
    src = write_corpus(tmp_path / "c.txt")
    out = tmp_path / "out"
    prepare(src, out, "byte", val_fraction=0.1, split_blank_lines=True, **FAST)
    before = snapshot(out)
    with pytest.raises(DataError) as err:
        prepare(src, out, "byte", val_fraction=0.3, split_blank_lines=True, **FAST)
    msg = str(err.value)
    assert "val_fraction: 0.1 -> 0.3" in msg and "--force" in msg and "--out" in msg
    assert "seed" not in msg  # only what differs is listed
    assert snapshot(out) == before
    # The command line says the same and exits non-zero.
    monkeypatch.chdir(tmp_path)
    rc = dp.main([str(src), "--out", str(out), "--tokenizer", "byte", "--val-fraction", "0.3",
                  "--split-blank-lines", "--workers", "1", "--no-progress"])
    assert rc == 2
    assert "val_fraction: 0.1 -> 0.3" in capsys.readouterr().err
    assert snapshot(out) == before


def test_force_resplits(tmp_path):
    src = write_corpus(tmp_path / "c.txt")
    out = tmp_path / "out"
    old = prepare(src, out, "byte", val_fraction=0.1, split_blank_lines=True, **FAST)
    new = prepare(src, out, "byte", val_fraction=0.3, split_blank_lines=True, force=True, **FAST)
    assert new["val_fraction"] == new["settings"]["val_fraction"] == 0.3
    assert new["val_documents"] > old["val_documents"]
    assert read_meta(out) == new


def test_same_settings_are_skipped_without_reading_the_corpus(tmp_path, forbid_reading):
    src = write_corpus(tmp_path / "c.txt")
    out = tmp_path / "out"
    meta = prepare(src, out, "byte", val_fraction=0.1, split_blank_lines=True, **FAST)
    assert meta["settings"] == {
        "source": str(src.resolve()), "source_fingerprint": meta["settings"]["source_fingerprint"],
        "split_blank_lines": True, "tokenizer": "byte", "val_fraction": 0.1,
        "val_split": "documents", "seed": 2357,
        "max_docs": None}  # no text_column: a .txt file has no columns; auto meant documents
    before = snapshot(out)
    forbid_reading(src)
    assert prepare(src, out, "byte", val_fraction=0.1, split_blank_lines=True, **FAST) == meta
    assert ensure_prepared(str(src), out, prepare_if_missing=True, tokenizer="byte",
                           val_fraction=0.1, seed=2357, split_blank_lines=True) == meta
    # The engine passes unset options as None: they mean "the default", not a difference.
    assert ensure_prepared(str(src), out, prepare_if_missing=False, tokenizer="byte",
                           val_fraction=0.1, seed=2357, split_blank_lines=True, max_docs=None,
                           hf_id=None, revision=None, text_column=None) == meta
    assert snapshot(out) == before


def test_two_sources_into_one_folder_refuse_naming_both(tmp_path, forbid_reading):
    a = write_corpus(tmp_path / "A.txt", tag="a ")
    b = write_corpus(tmp_path / "B.txt", tag="b ")
    out = tmp_path / "prepared" / "local-byte"  # data=local: one dir whatever data.source is
    kw = dict(tokenizer="byte", val_fraction=0.01, seed=2357, split_blank_lines=True)
    meta = ensure_prepared(str(a), out, prepare_if_missing=True, progress=False, **kw)
    assert meta["settings"]["source"] == str(a.resolve())
    before = snapshot(out)
    forbid_reading(a, b)
    with pytest.raises(DataError) as err:
        ensure_prepared(str(b), out, prepare_if_missing=True, **kw)
    msg = str(err.value)
    assert f"data.source: {a.resolve()} -> {b.resolve()}" in msg
    assert "data.dir" in msg and "--force" in msg and "python -m data.prepare" in msg
    assert snapshot(out) == before


def test_editing_the_source_after_preparing_is_detected(tmp_path):
    src = write_corpus(tmp_path / "c.txt")
    out = tmp_path / "out"
    kw = dict(tokenizer="byte", val_fraction=0.1, seed=2357, split_blank_lines=True)
    ensure_prepared(str(src), out, prepare_if_missing=True, progress=False, **kw)
    before = snapshot(out)
    st = src.stat()
    with open(src, "a", encoding="utf-8") as f:
        f.write("\none more paragraph\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"source_fingerprint: \w+ -> \w+ \(the source files"):
        ensure_prepared(str(src), out, prepare_if_missing=True, **kw)
    with pytest.raises(DataError, match="source_fingerprint"):
        prepare(src, out, kw["tokenizer"], val_fraction=0.1, split_blank_lines=True, **FAST)
    assert snapshot(out) == before
    meta = prepare(src, out, "byte", val_fraction=0.1, split_blank_lines=True, force=True, **FAST)
    assert meta["documents"] == before_docs(before) + 1


def before_docs(files: dict[str, tuple[bytes, int, int]]) -> int:
    return json.loads(files["meta.json"][0])["documents"]


def test_stdlib_meta_records_the_python_version(tmp_path):
    meta = prepare("stdlib", tmp_path / "std", "byte", max_docs=3, **FAST)
    assert meta["settings"]["python"] == platform.python_version()
    assert meta["settings"]["source"] == "stdlib"
    assert meta["settings"]["val_fraction"] == config("stdlib")["val_fraction"]


@pytest.mark.parametrize("name", ["stdlib", "openwebtext", "local"])
def test_cli_default_val_fraction_matches_the_training_config(name, tmp_path):
    expected = config(name)["val_fraction"]
    source = str(write_corpus(tmp_path / "c.txt")) if name == "local" else name
    mirror = []
    if name == "openwebtext":  # its Hugging Face path, from a local parquet "mirror"
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [f"web page {i}" for i in range(5)]}),
                       tmp_path / "owt.parquet")
        mirror = ["--hf-id", "parquet", "--data-files", str(tmp_path / "owt.parquet")]
    out = tmp_path / "out"
    rc = dp.main([source, "--out", str(out), "--tokenizer", "byte", "--max-docs", "5",
                  "--workers", "1", "--no-progress", *mirror])
    assert rc == 0
    meta = read_meta(out)
    assert meta["val_fraction"] == meta["settings"]["val_fraction"] == expected
    assert meta["seed"] == config(name)["seed"]
    assert dp.default_val_fraction(source) == expected


def test_help_names_the_default_val_fractions(capsys):
    with pytest.raises(SystemExit):
        dp.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "stdlib 0.02" in text and "openwebtext 0.0005" in text
    assert "any other source 0.01" in text


def test_cli_after_a_quickstart_prepare_skips(tmp_path, monkeypatch, capsys):
    """The quickstart (data=stdlib) prepares through the engine; the README's command afterwards
    must find the same settings instead of re-splitting them."""
    cfg = config("stdlib")
    monkeypatch.chdir(tmp_path)
    meta = ensure_prepared(cfg["source"], cfg["dir"], prepare_if_missing=True,
                           tokenizer=cfg["tokenizer"], val_fraction=cfg["val_fraction"],
                           seed=cfg["seed"], max_docs=40, **FAST)
    before = snapshot(tmp_path / cfg["dir"])
    assert dp.main(["stdlib", "--tokenizer", "byte", "--max-docs", "40", "--no-progress"]) == 0
    assert snapshot(tmp_path / cfg["dir"]) == before
    assert f"{meta['val_tokens']:,} val tokens" in capsys.readouterr().out


def test_ensure_prepared_missing_folder(tmp_path):
    src = write_corpus(tmp_path / "my corpus.txt")
    out = tmp_path / "nowhere"
    kw = dict(tokenizer="byte", val_fraction=0.05, seed=7, split_blank_lines=True)
    with pytest.raises(DataError) as err:
        ensure_prepared(str(src), out, prepare_if_missing=False, **kw)
    msg = str(err.value)
    assert "does not exist" in msg and "python -m data.prepare" in msg
    assert (f"python -m data.prepare '{src.resolve()}' --out {out} --tokenizer byte "
            "--val-fraction 0.05 --seed 7\n") in msg  # paragraphs are the CLI default
    assert not out.exists()
    meta = ensure_prepared(str(src), out, prepare_if_missing=True, progress=False, **kw)
    assert meta["complete"] and meta["val_fraction"] == 0.05 and meta["seed"] == 7
    assert ensure_prepared(str(src), out, prepare_if_missing=False, **kw) == meta


def test_ensure_prepared_rejects_unknown_options(tmp_path):
    with pytest.raises(DataError, match="unknown option.*force"):
        ensure_prepared("stdlib", tmp_path, prepare_if_missing=True, tokenizer="byte",
                        val_fraction=0.02, seed=1, force=True)


class Interrupt(RuntimeError):
    pass


def test_unfinished_prepare_with_other_settings_restarts_with_a_warning(tmp_path, monkeypatch,
                                                                       caplog):
    src = write_corpus(tmp_path / "c.txt", n=200)
    out = tmp_path / "out"
    kw = dict(split_blank_lines=True, **FAST)
    monkeypatch.setattr(dp, "CHUNK_DOCS", 10)
    monkeypatch.setattr(dp, "CHECKPOINT_CHUNKS", 1)

    def dies_after_three(progress):
        if progress.done == 30:
            raise Interrupt("killed")

    with pytest.raises(Interrupt):
        prepare(src, out, "byte", val_fraction=0.1, on_progress=dies_after_three, **kw)
    assert json.loads((out / ".prepare-state.json").read_text())["docs_done"] == 30
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        meta = prepare(src, out, "byte", val_fraction=0.3, **kw)
    assert "val_fraction: 0.1 -> 0.3" in caplog.text and "from scratch" in caplog.text
    clean = prepare(src, tmp_path / "clean", "byte", val_fraction=0.3, **kw)
    assert meta == clean
    assert (out / "train.bin").read_bytes() == (tmp_path / "clean" / "train.bin").read_bytes()
