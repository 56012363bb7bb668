"""data.prepare: token counts, round trips, determinism, atomicity/resume, sources, errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import data.prepare as dp
import data.sources as sources
from data import DataError, get_tokenizer
from data.loader import TokenLoader
from data.prepare import PrepareProgress, prepare, val_mask
from data.sources import (Source, SourceOptions, default_val_fraction, read_file,
                          register_reader, register_source, resolve_source)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shk_text(shakespeare_path) -> str:
    # The first ~20k characters, cut at a paragraph boundary: small enough to keep tests fast.
    text = shakespeare_path.read_text(encoding="utf-8")
    cut = text.index("\n\n", 20_000)
    return text[:cut + 1]


@pytest.fixture()
def shk_file(tmp_path, shk_text) -> Path:
    p = tmp_path / "shk.txt"
    p.write_text(shk_text, encoding="utf-8")
    return p


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def read_docs(out: Path, split: str) -> list[list[int]]:
    """A prepared split as a list of documents (token lists without their EOT)."""
    meta = json.loads((out / "meta.json").read_text())
    tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
    docs, cur = [], []
    for t in tokens:
        if t == meta["eot"]:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == [], "every document must end with EOT"
    return docs


def assert_interleaving(expected: list, train: list, val: list) -> None:
    """``expected`` (in order) is exactly ``train`` and ``val`` merged, each in order."""
    i = j = 0
    for doc in expected:
        if i < len(train) and train[i] == doc:
            i += 1
        elif j < len(val) and val[j] == doc:
            j += 1
        else:
            raise AssertionError(f"document {doc[:10]}... missing or out of order")
    assert (i, j) == (len(train), len(val))


def test_gpt2_counts_and_round_trip(tmp_path, shk_file, shk_text):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    out = tmp_path / "out"
    meta = prepare(shk_file, out, "gpt2", val_fraction=0.2, workers=1, split_blank_lines=True,
                   progress=False)
    docs = paragraphs(shk_text)
    expected = [enc.encode_ordinary(d) for d in docs]
    assert meta["complete"] is True
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"], meta["dtype"]) == \
        ("gpt2", 50257, 50256, "uint16")
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(e) + 1 for e in expected)
    assert meta["train_documents"] + meta["val_documents"] == len(docs)
    assert meta["train_documents"] > 0 and meta["val_documents"] > 0
    assert meta["val_fraction"] == 0.2 and meta["seed"] == 2357
    train, val = read_docs(out, "train"), read_docs(out, "val")
    assert len(train) == meta["train_documents"] and len(val) == meta["val_documents"]
    assert_interleaving(expected, train, val)
    assert (out / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    # Decoding reproduces the text of every document.
    decoded = [enc.decode(d) for d in train + val]
    assert sorted(decoded) == sorted(docs)
    # Nothing temporary is left behind.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".prepare.lock")) == \
        ["meta.json", "train.bin", "val.bin"]


def test_byte_tokenizer_round_trips_utf8_jsonl(tmp_path):
    docs = ["héllo wörld", "emoji 🤖🚀👩‍👩‍👧", "日本語", "", "tab\tnew\nline", "Ω≈ç√∫"] * 5
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n",
                   encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare(src, out, "byte", val_fraction=0.3, seed=7, workers=1, text_column="body",
                   progress=False)
    nonempty = [d for d in docs if d]  # empty documents carry no text and are skipped
    assert meta["documents"] == len(nonempty)
    assert (meta["vocab_size"], meta["eot"], meta["max_token_id"]) == (257, 256, 256)
    assert meta["text_bytes"] == sum(len(d.encode()) for d in nonempty)
    tok = get_tokenizer("byte")
    train, val = read_docs(out, "train"), read_docs(out, "val")
    assert_interleaving([list(d.encode()) for d in nonempty], train, val)
    assert sorted(tok.decode(d) for d in train + val) == sorted(nonempty)


def test_workers_give_identical_bytes(tmp_path, shk_file, monkeypatch):
    monkeypatch.setattr(dp, "CHUNK_DOCS", 16)  # many chunks, so the pool really interleaves
    metas = []
    for w in (1, 2):
        metas.append(prepare(shk_file, tmp_path / f"w{w}", "gpt2", val_fraction=0.1, workers=w,
                             split_blank_lines=True, progress=False))
    assert metas[0] == metas[1]
    for split in ("train", "val"):
        assert (tmp_path / "w1" / f"{split}.bin").read_bytes() == \
            (tmp_path / "w2" / f"{split}.bin").read_bytes()


def test_val_split_is_deterministic_per_document():
    idx = np.arange(200_000, dtype=np.uint64)
    a = val_mask(idx, 2357, 0.01)
    assert np.array_equal(a, val_mask(idx, 2357, 0.01))
    assert not np.array_equal(a, val_mask(idx, 2358, 0.01))
    assert abs(a.mean() - 0.01) < 0.002
    # Membership of a document does not depend on which chunk it was hashed in.
    assert np.array_equal(a[1000:1100], val_mask(idx[1000:1100], 2357, 0.01))
    assert not val_mask(idx, 2357, 0.0).any()


def test_complete_prepare_is_skipped_and_force_redoes(tmp_path, shk_file):
    out = tmp_path / "out"
    calls: list[PrepareProgress] = []
    kw = dict(val_fraction=0.1, workers=1, split_blank_lines=True, progress=False,
              on_progress=calls.append)
    meta = prepare(shk_file, out, "byte", **kw)
    assert calls[-1] == PrepareProgress("documents", meta["documents"], None)
    calls.clear()
    assert prepare(shk_file, out, "byte", **kw) == meta
    assert calls == []  # nothing was tokenized
    assert prepare(shk_file, out, "byte", force=True, **kw) == meta
    assert calls
    # Different settings are not mistaken for the existing prepare: refused without --force...
    calls.clear()
    with pytest.raises(DataError, match=r"val_fraction: 0\.1 -> 0\.3(?s:.*)--force"):
        prepare(shk_file, out, "byte", **{**kw, "val_fraction": 0.3})
    assert calls == []
    # ... and redone with it.
    other = prepare(shk_file, out, "byte", force=True, **{**kw, "val_fraction": 0.3})
    assert calls and other["val_fraction"] == 0.3 and other["val_tokens"] > meta["val_tokens"]


class Interrupt(RuntimeError):
    pass


@pytest.fixture()
def scratch_registries():
    """Sources and readers a test registers are unregistered when it ends."""
    saved = dict(sources.SOURCES), dict(sources.READERS)
    yield
    for registry, before in zip((sources.SOURCES, sources.READERS), saved):
        registry.clear()
        registry.update(before)


def test_interrupted_prepare_is_detected_and_resumed(tmp_path, shk_file, monkeypatch,
                                                     scratch_registries):
    """A source that breaks mid-way, as a streamed dataset can: the re-run resumes from the last
    durable checkpoint and writes exactly what an uninterrupted prepare writes."""
    breaks_after = [None]  # documents the source yields before it breaks; None: it does not

    @register_source("flaky-paragraphs")
    def flaky(options: SourceOptions) -> Source:
        def documents():
            paragraphs = read_file(shk_file, SourceOptions(split_blank_lines=True))
            for i, doc in enumerate(paragraphs):
                if i == breaks_after[0]:
                    raise Interrupt("the stream broke")
                yield doc

        return Source(name="flaky", kind="test", spec="flaky-paragraphs", documents=documents,
                      settings={"path": str(shk_file)})

    kw = dict(tokenizer="gpt2", val_fraction=0.1, workers=1, progress=False)
    clean = tmp_path / "clean"
    prepare("flaky-paragraphs", clean, **kw)

    monkeypatch.setattr(dp, "CHUNK_DOCS", 10)
    monkeypatch.setattr(dp, "CHECKPOINT_CHUNKS", 2)  # durable after chunks 2 and 4, not 5
    breaks_after[0] = 50
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        prepare("flaky-paragraphs", out, **kw)
    assert not (out / "meta.json").exists()
    state = json.loads((out / ".prepare-state.json").read_text())
    assert state["docs_done"] == 40
    # Chunk 5 reached the file after the last checkpoint: the resume must cut it off again.
    assert (out / "train.bin.tmp").stat().st_size > state["train"]["bytes"]
    with pytest.raises(DataError, match="incomplete prepare.*Re-run the same"):
        TokenLoader(out, "train", block_size=8, seed=0)

    breaks_after[0] = None
    progress: list[PrepareProgress] = []
    meta = prepare("flaky-paragraphs", out, on_progress=progress.append, **kw)
    # Resumed: the first chunk written covers documents 41-50; 1-40 were not tokenized again.
    assert progress[0].done == 50 and progress[-1].done == meta["documents"]
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == (clean / f"{split}.bin").read_bytes()
    assert meta == json.loads((clean / "meta.json").read_text())
    assert not (out / ".prepare-state.json").exists()
    TokenLoader(out, "train", block_size=8, seed=0)


def test_interrupted_reprepare_never_leaves_stale_meta(tmp_path, shk_file):
    out = tmp_path / "out"
    kw = dict(tokenizer="byte", workers=1, split_blank_lines=True, progress=False)
    prepare(shk_file, out, val_fraction=0.1, **kw)

    def boom(progress):
        raise Interrupt("killed")

    with pytest.raises(Interrupt):  # other settings replace a complete prepare only with force
        prepare(shk_file, out, val_fraction=0.2, force=True, on_progress=boom, **kw)
    # The old meta.json must be gone: it would describe bins that are being replaced.
    with pytest.raises(DataError, match="incomplete prepare"):
        TokenLoader(out, "train", block_size=8, seed=0)


def test_a_registered_source_and_reader_are_prepared_and_checked(tmp_path, scratch_registries,
                                                                 capsys):
    """What docs/extending.md asks of a new source: one registered function each, and the
    pipeline (defaults, settings, skip, refusal, messages) picks it up."""
    size = [12]

    @register_source("numbers", val_fraction=0.25)
    def numbers(options: SourceOptions) -> Source:
        return Source(name="numbers", kind="test", spec="numbers",
                      documents=lambda: (f"number {i}" for i in range(size[0])),
                      num_documents=size[0], settings={"size": size[0]})

    @register_reader(".lines", options=("text_column",))
    def read_lines(path: Path, options: SourceOptions):
        for line in path.read_text(encoding="utf-8").splitlines():
            yield line.strip()

    assert default_val_fraction("numbers") == 0.25
    out = tmp_path / "numbers"
    meta = prepare("numbers", out, "byte", workers=1, progress=False)
    assert (meta["source_kind"], meta["val_fraction"], meta["documents"]) == ("test", 0.25, 12)
    assert meta["settings"]["size"] == 12 and meta["settings"]["source"] == "numbers"
    tok = get_tokenizer("byte")
    assert_interleaving([list(f"number {i}".encode()) for i in range(12)],
                        read_docs(out, "train"), read_docs(out, "val"))
    assert prepare("numbers", out, "byte", workers=1, progress=False,
                   on_progress=lambda p: pytest.fail("prepared again")) == meta
    size[0] = 13
    with pytest.raises(DataError, match="size: 12 -> 13"):
        prepare("numbers", out, "byte", workers=1, progress=False)

    # A folder mixing the new suffix with a built-in one; empty lines are empty documents.
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.lines").write_text("one\n\ntwo\n", encoding="utf-8")
    (folder / "b.txt").write_text("three", encoding="utf-8")
    meta = prepare(folder, tmp_path / "folder", "byte", val_fraction=0.0, progress=False)
    assert [tok.decode(d) for d in read_docs(tmp_path / "folder", "train")] == \
        ["one", "two", "three"]
    assert set(meta["settings"]) >= {"text_column", "split_blank_lines", "source_fingerprint"}
    (folder / "a.lines").write_text("one\ntwo!\n", encoding="utf-8")
    with pytest.raises(DataError, match="source_fingerprint"):
        prepare(folder, tmp_path / "folder", "byte", val_fraction=0.0, progress=False)

    # The choices named to a user come from the registries.
    with pytest.raises(DataError, match=r"numbers.*\.lines"):
        resolve_source("no/such/source")
    with pytest.raises(DataError, match=r"supported local files are .*\.lines"):
        resolve_source(str(tmp_path / "numbers" / "meta.json"))
    with pytest.raises(SystemExit):
        dp.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "numbers 0.25" in help_text and ".lines" in help_text
    # Names are unique, and a source's defaults must be options that exist.
    with pytest.raises(ValueError, match="'stdlib'.*registered already"):
        register_source("stdlib")
    with pytest.raises(ValueError, match="unknown option.*text_colum"):
        register_source("typo", defaults={"text_colum": "body"})
    with pytest.raises(ValueError, match="'.txt'.*registered already"):
        register_reader(".TXT")


def test_txt_whole_file_and_folder_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("first file\n\nstill the first document\n", encoding="utf-8")
    (folder / "b" / "c.jsonl").write_text(
        json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    pq.write_table(pa.table({"text": ["pq one", None, "pq two ✓"], "n": [1, 2, 3]}),
                   folder / "b" / "d.parquet")
    (folder / "ignored.csv").write_text("not,a,source\n")
    out = tmp_path / "out"
    meta = prepare(folder, out, "byte", val_fraction=0.0, workers=1, progress=False)
    expected = ["first file\n\nstill the first document\n", "json one", "json two", "pq one",
                "pq two ✓"]
    tok = get_tokenizer("byte")
    assert [tok.decode(d) for d in read_docs(out, "train")] == expected
    assert meta["val_tokens"] == 0 and meta["source_info"]["files"] == 3

    # One .txt file is one document unless paragraphs are asked for.
    meta = prepare(folder / "a.txt", tmp_path / "one", "byte", val_fraction=0.0, progress=False)
    assert meta["documents"] == 1
    meta = prepare(folder / "a.txt", tmp_path / "two", "byte", val_fraction=0.0,
                   split_blank_lines=True, progress=False)
    assert meta["documents"] == 2


def test_parquet_local_and_hf_paths_agree(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"row {i}: " + "lorem ipsum " * (i % 7) + "é🤖" for i in range(300)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"content": rows}), path, row_group_size=64)
    local = prepare(path, tmp_path / "local", "gpt2", val_fraction=0.1, workers=1,
                    text_column="content", progress=False)
    # The Hugging Face code path (streaming load_dataset), fed from a local parquet file: the
    # same path openwebtext and hf:<id> take, minus the network.
    hf = prepare("hf:parquet", tmp_path / "hf", "gpt2", val_fraction=0.1, workers=1,
                 text_column="content", hf_data_files=str(path), progress=False)
    assert hf["source_kind"] == "hf" and hf["source_info"]["hf_id"] == "parquet"
    recorded = hf["settings"]
    assert (recorded["source"], recorded["hf_id"], recorded["revision"], recorded["split"]) == \
        ("hf:parquet", "parquet", None, "train")
    assert recorded["hf_data_files"] == [str(path)] and recorded["text_column"] == "content"
    assert recorded["source_fingerprint"]  # local data files: their sizes and mtimes count
    assert hf["documents"] == local["documents"] == 300
    for split in ("train", "val"):
        assert (tmp_path / "hf" / f"{split}.bin").read_bytes() == \
            (tmp_path / "local" / f"{split}.bin").read_bytes()


def test_stdlib_corpus_is_the_sorted_stdlib(tmp_path):
    meta = prepare("stdlib", tmp_path / "std", "byte", val_fraction=0.0, max_docs=4,
                   progress=False)
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    expected = [f.read_bytes() for f in files if f.stat().st_size > 0][:4]
    assert meta["documents"] == 4 and meta["source_name"] == "stdlib"
    assert [bytes(d) for d in read_docs(tmp_path / "std", "train")] == expected


def test_default_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare("stdlib", tokenizer="byte", max_docs=2, val_fraction=0.0, progress=False)
    assert (tmp_path / "prepared" / "stdlib-byte" / "meta.json").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="no/such/corpus.txt"), "Unknown data source 'no/such/corpus.txt'"),
    (dict(source="stdlib", tokenizer="bpe"), "Unknown tokenizer 'bpe'"),
    (dict(source="stdlib", val_fraction=1.5), r"val_fraction=1.5 must be in \[0, 1\)"),
    (dict(source="stdlib", workers=0), "workers=0 must be at least 1"),
    (dict(source="stdlib", max_docs=0), "max_docs=0 must be a positive"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    kwargs = {"tokenizer": "byte", **kwargs}
    with pytest.raises(DataError, match=match):
        prepare(out_dir=tmp_path / "out", progress=False, **kwargs)


def test_bad_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl:1 has no 'text' field.*--text-column"):
        prepare(jl, tmp_path / "o1", "byte", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1 is not valid JSON"):
        prepare(bad, tmp_path / "o2", "byte", progress=False)
    pqf = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["hi"]}), pqf)
    with pytest.raises(DataError, match=r"no column 'text'.*--text-column"):
        prepare(pqf, tmp_path / "o3", "byte", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .txt, .jsonl or .parquet files"):
        prepare(empty, tmp_path / "o4", "byte", progress=False)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="supported local files are .txt"):
        prepare(csv, tmp_path / "o5", "byte", progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(blank, tmp_path / "o6", "byte", progress=False)


def test_hf_source_offline_error_names_the_network(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="(?s)network access.*HF_HUB_OFFLINE"):
        prepare("hf:nobody/no-such-dataset", tmp_path / "o", "byte", progress=False)


def test_cli(tmp_path, shk_file, capsys):
    out = tmp_path / "cli"
    rc = dp.main([str(shk_file), "--out", str(out), "--tokenizer", "byte", "--val-fraction",
                  "0.1", "--split-blank-lines", "--workers", "1", "--no-progress"])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert f"{meta['train_tokens']:,} train tokens" in capsys.readouterr().out
    rc = dp.main(["nowhere.txt", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2
    assert "error: Unknown data source" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path, shk_file):
    out = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, "-m", "data.prepare", str(shk_file), "--out", str(out), "--tokenizer",
         "byte", "--val-fraction", "0.1", "--split-blank-lines", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "meta.json").read_text())["complete"] is True
