"""Faulty inputs the data layer refuses with one DataError instead of preparing or reading them:
text that is not UTF-8, a meta.json that does not describe its tokenizer or its bins, an empty
source (refused without leaving anything behind), symlinks that lead out of a source folder."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import data.prepare as dp
from data import DataError
from data.bins import read_meta
from data.loader import TokenLoader
from data.prepare import ensure_prepared, prepare

REPO = Path(__file__).resolve().parents[1]
FAST = dict(workers=1, progress=False)
BLOCK = 16


def paragraphs(n: int, tag: str = "") -> str:
    return "\n\n".join(f"{tag}paragraph {i}: " + "word " * (i % 7) for i in range(n)) + "\n"


def leftovers(out: Path) -> list[str]:
    """What a failed prepare left in ``out`` (nothing at all when the folder is gone)."""
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


# ---------------------------------------------------------------------------------------------
# 1. Text that is not UTF-8


BAD = "café".encode() + b" and then \xff\xfe binary \x80 junk"  # 0xff at byte offset 15
BAD_OFFSET = len("café".encode() + b" and then ")


@pytest.mark.parametrize("split_blank_lines", [True, False])
def test_a_txt_that_is_not_utf8_is_refused_naming_file_offset_and_fix(tmp_path,
                                                                      split_blank_lines):
    head = paragraphs(40).encode()
    src = tmp_path / "binary.txt"
    src.write_bytes(head + b"\n" + BAD + b"\n")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare(src, out, "byte", split_blank_lines=split_blank_lines, **FAST)
    msg = str(err.value)
    assert str(src) in msg and "not valid UTF-8" in msg
    assert f"byte offset {len(head) + 1 + BAD_OFFSET}" in msg and "0xff" in msg
    assert "--errors replace" in msg and "data.errors=replace" in msg
    assert "\n" not in msg
    assert leftovers(out) == []


def test_a_jsonl_that_is_not_utf8_is_refused(tmp_path):
    src = tmp_path / "rows.jsonl"
    good = b"".join(json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(3))
    src.write_bytes(good + b'{"text": "' + BAD + b'"}\n')
    with pytest.raises(DataError, match=rf"rows.jsonl.*not valid UTF-8.*byte offset "
                                        rf"{len(good) + 10 + BAD_OFFSET}.*--errors replace"):
        prepare(src, tmp_path / "out", "byte", **FAST)
    assert leftovers(tmp_path / "out") == []


def test_a_jsonl_escape_of_half_a_surrogate_pair_is_refused_or_replaced(tmp_path):
    """Valid UTF-8 bytes whose JSON escapes decode to a lone surrogate: text no tokenizer can
    encode as UTF-8."""
    src = tmp_path / "rows.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "ok \\ud800 bad"}\n{"text": "\\ud83d\\ude00"}\n',
                   encoding="utf-8")
    with pytest.raises(DataError, match=r"rows.jsonl:2: .*'\\ud800' at character 3.*not valid "
                                        r"UTF-8.*--errors replace"):
        prepare(src, tmp_path / "out", "byte", **FAST)
    assert leftovers(tmp_path / "out") == []
    meta = prepare(src, tmp_path / "out", "byte", val_fraction=0.0, errors="replace", **FAST)
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16).tolist()
    assert bytes(t for t in ids if t < 256).decode() == "fineok \ufffd bad\U0001f600"
    assert meta["documents"] == 3


def test_a_parquet_binary_column_is_decoded_not_stringified(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": pa.array([b"hello", "é".encode()], pa.binary())}), good)
    meta = prepare(good, tmp_path / "g", "byte", val_fraction=0.0, **FAST)
    assert np.fromfile(tmp_path / "g" / "train.bin", dtype=np.uint16).tolist() == \
        [*b"hello", 256, *"é".encode(), 256]
    assert meta["documents"] == 2
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": pa.array([b"fine", BAD], pa.binary())}), bad)
    with pytest.raises(DataError, match=rf"bad.parquet, row 2.*not valid UTF-8.*byte offset "
                                        rf"{BAD_OFFSET}.*--errors replace"):
        prepare(bad, tmp_path / "b", "byte", **FAST)


def test_errors_replace_prepares_it_knowingly_and_is_recorded(tmp_path, capsys):
    src = tmp_path / "mixed.txt"
    src.write_bytes(paragraphs(40).encode() + b"\n" + BAD + b"\n")
    out = tmp_path / "out"
    meta = prepare(src, out, "byte", split_blank_lines=True, errors="replace", **FAST)
    assert meta["settings"]["errors"] == "replace"
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16).tolist() + \
        np.fromfile(out / "val.bin", dtype=np.uint16).tolist()
    fffd = list("\ufffd".encode())
    assert any(tokens[i:i + 3] == fffd for i in range(len(tokens)))
    # A strict request does not silently take the replaced text...
    with pytest.raises(DataError, match=r"data\.errors: replace -> strict"):
        ensure_prepared(str(src), out, prepare_if_missing=True, tokenizer="byte",
                        val_fraction=None, seed=2357, split_blank_lines=True, errors="strict")
    # ... and the command it names for a missing folder carries the option.
    with pytest.raises(DataError, match=r"python -m data\.prepare .* --errors replace"):
        ensure_prepared(str(src), tmp_path / "other", prepare_if_missing=False,
                        tokenizer="byte", val_fraction=None, seed=2357, split_blank_lines=True,
                        errors="replace")
    # The CLI flag: refused without it, prepared (the same folder, skipped) with it.
    assert dp.main([str(src), "--out", str(tmp_path / "cli"), "--tokenizer", "byte",
                    "--no-progress", "--workers", "1"]) == 2
    assert "--errors replace" in capsys.readouterr().err
    assert dp.main([str(src), "--out", str(out), "--tokenizer", "byte", "--errors", "replace",
                    "--no-progress", "--workers", "1"]) == 0


def test_strict_is_the_default_and_leaves_the_settings_as_before(tmp_path):
    """A valid file prepares to the same settings (and settings_hash) whatever ``errors`` is
    asked for as long as it is strict: folders prepared before the option existed stay valid."""
    src = tmp_path / "ok.txt"
    src.write_text(paragraphs(40), encoding="utf-8")
    a = prepare(src, tmp_path / "a", "byte", **FAST)
    b = prepare(src, tmp_path / "b", "byte", errors="strict", **FAST)
    assert "errors" not in a["settings"] and a["settings_hash"] == b["settings_hash"]
    with pytest.raises(DataError, match="errors='ignore'.*strict.*replace"):
        prepare(src, tmp_path / "c", "byte", errors="ignore", **FAST)


@pytest.mark.parametrize("name", ["local", "shakespeare"])
def test_text_data_configs_declare_errors_strict(name):
    cfg = yaml.safe_load((REPO / "configs" / "data" / f"{name}.yaml").read_text())
    assert cfg["errors"] == "strict"


# ---------------------------------------------------------------------------------------------
# 2 and 5. meta.json against its tokenizer, and the bins against meta.json


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "c.txt"
    src.write_text(paragraphs(300), encoding="utf-8")
    out = tmp_path_factory.mktemp("prepared") / "c-byte"
    prepare(src, out, "byte", val_fraction=0.1, split_blank_lines=True, **FAST)
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "c.txt"
    src.write_text(paragraphs(300, tag="Enumerated "), encoding="utf-8")
    out = tmp_path_factory.mktemp("prepared") / "c-gpt2"
    prepare(src, out, "gpt2", val_fraction=0.1, split_blank_lines=True, **FAST)
    return out


def edited(folder: Path, tmp_path: Path, **changes) -> Path:
    """A copy of ``folder`` whose meta.json has ``changes`` applied (a "settings.key" name
    edits the recorded settings)."""
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    meta = json.loads((dst / "meta.json").read_text())
    for key, value in changes.items():
        if key.startswith("settings."):
            meta["settings"][key.split(".", 1)[1]] = value
        else:
            meta[key] = value
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def halved(folder: Path) -> dict:
    """Token counts that make uint16 bins look like uint32 ones of the right size."""
    meta = json.loads((folder / "meta.json").read_text())
    return {"train_tokens": meta["train_tokens"] // 2, "val_tokens": meta["val_tokens"] // 2}


@pytest.mark.parametrize("changes, match", [
    # A vocabulary the tokenizer does not have: a far larger (slower) model, silently.
    ({"vocab_size": 50257}, r"meta.json: vocab_size is 50257, expected 257 \(the byte tokenizer"),
    ({"eot": 0}, r"meta.json: eot is 0, expected 256 \(the byte tokenizer"),
    ({"tokenizer": "sentencepiece"}, r"meta.json: tokenizer is 'sentencepiece', expected one of "
                                     r"gpt2, byte"),
    ({"settings.tokenizer": "gpt2"}, r"meta.json: settings.tokenizer is 'gpt2', expected 'byte'"),
    ({"train_tokens": -4}, r"meta.json: train_tokens is -4, expected a count"),
    ({"val_tokens": "many"}, r"meta.json: val_tokens is 'many', expected a count"),
])
def test_meta_that_does_not_describe_its_tokenizer_is_refused(byte_dir, tmp_path, changes, match):
    d = edited(byte_dir, tmp_path, **changes)
    with pytest.raises(DataError, match=match) as err:
        read_meta(d)
    assert "\n" not in str(err.value) and "--force" in str(err.value)


def test_a_uint32_meta_with_matching_sizes_is_refused(byte_dir, gpt2_dir, tmp_path):
    """Bins of uint16 ids read as uint32 give ids past any vocabulary (an IndexError at the first
    eval); sizes that match do not make them right."""
    for folder, tokenizer, vocab in ((byte_dir, "byte", 257), (gpt2_dir, "gpt2", 50257)):
        d = edited(folder, tmp_path / tokenizer, dtype="uint32", vocab_size=70000,
                   **halved(folder))
        with pytest.raises(DataError, match=rf"vocab_size is 70000, expected {vocab}"):
            TokenLoader(d, "train", BLOCK, seed=0)
        d = edited(folder, tmp_path / f"{tokenizer}-dtype", dtype="uint32", **halved(folder))
        with pytest.raises(DataError, match=r"dtype is 'uint32', expected 'uint16'"):
            TokenLoader(d, "train", BLOCK, seed=0)


def test_a_bin_whose_size_is_not_whole_tokens_is_refused(byte_dir, tmp_path):
    d = edited(byte_dir, tmp_path)
    with open(d / "val.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(DataError, match=r"val.bin: size is \d+ bytes, expected a multiple of 2 "
                                        r"\(the uint16 item size\)"):
        TokenLoader(d, "val", BLOCK, seed=0)


def test_a_byte_meta_over_gpt2_bins_is_refused(byte_dir, gpt2_dir, tmp_path):
    """meta.json copied from a byte prepare into a GPT-2 folder, token counts fixed up: the ids
    in the bins do not fit the vocabulary it names."""
    gpt2 = json.loads((gpt2_dir / "meta.json").read_text())
    d = edited(byte_dir, tmp_path, train_tokens=gpt2["train_tokens"],
               val_tokens=gpt2["val_tokens"])
    for split in ("train", "val"):
        shutil.copy(gpt2_dir / f"{split}.bin", d / f"{split}.bin")
    with pytest.raises(DataError, match=r"train.bin: token id is \d+ at offset \d+, expected "
                                        r"below 257 \(vocab_size of tokenizer byte"):
        TokenLoader(d, "train", BLOCK, seed=0)


def test_a_gpt2_meta_over_byte_bins_is_refused(byte_dir, tmp_path):
    """Byte ids are all valid GPT-2 ids, so only the end-of-text ids give the bins away."""
    d = edited(byte_dir, tmp_path, tokenizer="gpt2", vocab_size=50257, eot=50256,
               **{"settings.tokenizer": "gpt2"})
    read_meta(d)  # a consistent GPT-2 meta.json
    with pytest.raises(DataError, match=r"train.bin: last token is 256, expected 50256 \(the "
                                        r"end-of-text id of tokenizer gpt2"):
        TokenLoader(d, "train", BLOCK, seed=0)


def test_a_bin_corrupted_after_opening_is_refused_at_the_batch(byte_dir, tmp_path):
    d = edited(byte_dir, tmp_path)
    loader = TokenLoader(d, "train", BLOCK, seed=0)
    tokens = np.fromfile(d / "train.bin", dtype=np.uint16)
    tokens[:-1] = 300  # every id but the final end-of-text one out of the byte vocabulary
    tokens.tofile(d / "train.bin")
    with pytest.raises(DataError, match=r"train.bin: token id is 300 at offset \d+, expected "
                                        r"below 257"):
        loader.get(0, 0, 4)


def test_a_tail_split_train_bin_need_not_end_with_eot(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text(paragraphs(30), encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare(src, out, "byte", val_fraction=0.1, val_split="tail",
                   split_blank_lines=False, **FAST)
    assert np.fromfile(out / "train.bin", dtype=np.uint16)[-1] != meta["eot"]
    TokenLoader(out, "train", BLOCK, seed=0).get(0, 0, 2)
    TokenLoader(out, "val", BLOCK, seed=0).get(0, 0, 2)


# ---------------------------------------------------------------------------------------------
# 3. Empty sources: refused, and nothing is left that makes a corrected re-run look interrupted


# Sources without a document: files by name and content ("corpus/..." files make a folder).
EMPTY_SOURCES = {
    "empty.txt": {"empty.txt": ""},
    "blank.txt": {"blank.txt": "\n\n  \n\n"},
    "empty.jsonl": {"empty.jsonl": ""},
    "null-rows.jsonl": {"null-rows.jsonl": '{"text": null}\n\n{"text": ""}\n'},
    "corpus": {"corpus/a.txt": "", "corpus/b.jsonl": ""},
}


def empty_source(tmp_path: Path, name: str) -> Path:
    for file, text in EMPTY_SOURCES[name].items():
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text(text)
    return tmp_path / name


# Read whole (split_blank_lines false), a file of blank lines is a document of whitespace.
@pytest.mark.parametrize("name, split_blank_lines", [
    (name, split) for name in EMPTY_SOURCES for split in (True, False)
    if (name, split) != ("blank.txt", False)])
def test_an_empty_source_is_refused_leaving_nothing_behind(tmp_path, name, split_blank_lines):
    src = empty_source(tmp_path, name)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(src, out, "byte", split_blank_lines=split_blank_lines, **FAST)
    assert leftovers(out) == []
    # The corrected source prepares normally into the same folder.
    fixed = tmp_path / "fixed.txt"
    fixed.write_text(paragraphs(40), encoding="utf-8")
    meta = prepare(fixed, out, "byte", split_blank_lines=split_blank_lines, **FAST)
    assert read_meta(out)["settings_hash"] == meta["settings_hash"]


def test_an_empty_source_keeps_a_folder_that_was_there(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README").write_text("not mine to delete\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(empty_source(tmp_path, "empty.jsonl"), out, "byte", **FAST)
    assert leftovers(out) == ["README"]


def test_a_forced_reprepare_of_an_emptied_source_keeps_the_old_data(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(paragraphs(40), encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare(src, out, "byte", split_blank_lines=True, **FAST)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".bin", ".json")}
    src.write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(src, out, "byte", split_blank_lines=True, force=True, **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".bin", ".json")} == \
        before
    assert read_meta(out) == meta
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or "state" in p.name]


def test_a_source_error_midway_leaves_nothing_and_a_fixed_rerun_starts_clean(tmp_path,
                                                                           monkeypatch, caplog):
    """A fault found after some documents were written (here invalid UTF-8 near the end) is no
    interruption: resuming would meet it again, so what was written is removed."""
    monkeypatch.setattr(dp, "CHUNK_DOCS", 50)
    monkeypatch.setattr(dp, "CHECKPOINT_CHUNKS", 1)
    src = tmp_path / "c.txt"  # longer than the 8 KiB a text file is decoded by
    src.write_bytes(paragraphs(600).encode() + b"\n" + BAD + b"\n")
    out = tmp_path / "out"
    written: list = []
    kw = dict(split_blank_lines=True, val_split="documents", val_fraction=0.2, **FAST)
    with pytest.raises(DataError, match="not valid UTF-8"):
        prepare(src, out, "byte", on_progress=written.append, **kw)
    assert written and written[-1].done >= 100  # documents were on disk before the fault
    assert leftovers(out) == []
    with caplog.at_level("WARNING", logger="data.prepare"):
        prepare(src, out, "byte", errors="replace", **kw)
    assert "unfinished prepare" not in caplog.text


# ---------------------------------------------------------------------------------------------
# 4. Symlinks in a source folder


@pytest.fixture()
def linked(tmp_path) -> Path:
    """corpus/ with a.txt, a link to a file outside, and a link to a.txt inside."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("inside text\n", encoding="utf-8")
    (tmp_path / "secret.txt").write_text("outside text\n", encoding="utf-8")
    os.symlink(tmp_path / "secret.txt", corpus / "link.txt")
    os.symlink(corpus / "a.txt", corpus / "again.txt")
    return corpus


def test_a_symlink_out_of_the_source_folder_is_refused(linked, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare(linked, out, "byte", val_split="tail", **FAST)
    msg = str(err.value)
    assert str(linked.resolve() / "link.txt") in msg
    assert str((tmp_path / "secret.txt").resolve()) in msg
    assert "--follow-symlinks" in msg and "data.follow_symlinks=true" in msg
    assert "\n" not in msg and not out.exists()


def test_follow_symlinks_reads_it_and_inside_links_count_once(linked, tmp_path, capsys):
    meta = prepare(linked, tmp_path / "out", "byte", val_split="tail", val_fraction=0.0,
                   follow_symlinks=True, **FAST)
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    text = bytes(int(t) for t in ids if t < 256).decode()
    assert meta["documents"] == 2  # a.txt once, the outside file once
    assert text.count("inside text") == 1 and text.count("outside text") == 1
    assert meta["settings"]["follow_symlinks"] is True
    assert dp.main([str(linked), "--out", str(tmp_path / "cli"), "--tokenizer", "byte",
                    "--no-progress", "--workers", "1"]) == 2
    assert "--follow-symlinks" in capsys.readouterr().err
    assert dp.main([str(linked), "--out", str(tmp_path / "cli"), "--tokenizer", "byte",
                    "--follow-symlinks", "--no-progress", "--workers", "1"]) == 0


def test_links_inside_the_folder_are_read_once(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "a.txt").write_text("alpha\n", encoding="utf-8")
    (corpus / "notes.md").write_text("beta\n", encoding="utf-8")
    os.symlink(corpus / "sub", corpus / "sub-again")  # a folder reachable twice
    os.symlink(corpus / "sub" / "a.txt", corpus / "z.txt")  # a file reachable twice
    os.symlink(corpus / "notes.md", corpus / "notes.txt")  # the only .txt name of notes.md
    meta = prepare(corpus, tmp_path / "out", "byte", val_split="tail", val_fraction=0.0, **FAST)
    assert meta["documents"] == 2 and meta["source_info"]["files"] == 2
    assert "follow_symlinks" not in meta["settings"]


def test_a_folder_symlink_out_of_the_source_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha\n", encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.txt").write_text("beta\n", encoding="utf-8")
    os.symlink(tmp_path / "elsewhere", corpus / "more")
    with pytest.raises(DataError, match=r"corpus/more is a symbolic link to .*elsewhere, "
                                        r"outside the source folder"):
        prepare(corpus, tmp_path / "out", "byte", **FAST)
    meta = prepare(corpus, tmp_path / "out", "byte", val_split="tail", val_fraction=0.0,
                   follow_symlinks=True, **FAST)
    assert meta["documents"] == 2


def test_a_dangling_symlink_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha\n", encoding="utf-8")
    os.symlink(corpus / "gone.txt", corpus / "b.txt")
    with pytest.raises(DataError, match=r"corpus/b.txt is a symbolic link to .*gone.txt, which "
                                        r"does not exist"):
        prepare(corpus, tmp_path / "out", "byte", **FAST)


def test_local_data_config_declares_follow_symlinks_false():
    cfg = yaml.safe_load((REPO / "configs" / "data" / "local.yaml").read_text())
    assert cfg["follow_symlinks"] is False
