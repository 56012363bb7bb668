"""The tail split (nanoGPT's: the last val_fraction of the tokens), its automatic choice for
sources with too few documents, the `shakespeare` source and experiment=shakespeare-char."""
from __future__ import annotations

import json
import logging
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import data.prepare as dp
import data.sources as sources
from data import DataError
from data.prepare import auto_min_documents, ensure_prepared, prepare, tail_sizes, val_mask
from train_helpers import compose_cfg, read_metrics

FAST = dict(workers=1, progress=False)


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """No test here may reach the network; the download cache is a fresh folder."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("SOPHIA_BENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shk_bytes(shakespeare_path) -> bytes:
    return shakespeare_path.read_bytes()


def tokens(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


def byte_stream(text: bytes, docs: int = 1) -> np.ndarray:
    """The byte tokenizer's stream of ``text`` read as one document: its bytes, then EOT."""
    assert docs == 1
    return np.append(np.frombuffer(text, dtype=np.uint8).astype(np.uint16), 256)


def write_paragraphs(path: Path, n: int) -> Path:
    path.write_text("\n\n".join(f"paragraph {i}: " + "word " * (i % 7) for i in range(n)) + "\n",
                    encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The tail split


def test_tail_split_is_the_last_fraction_of_the_tokens(tmp_path, shakespeare_path, shk_bytes):
    out = tmp_path / "out"
    meta = prepare(shakespeare_path, out, "byte", val_fraction=0.1, val_split="tail", **FAST)
    stream = byte_stream(shk_bytes)
    n = len(stream)
    n_val = round(0.1 * n)
    assert tail_sizes(n, 0.1) == (n - n_val, n_val)
    train, val = tokens(out, "train"), tokens(out, "val")
    assert np.array_equal(train, stream[:n - n_val]) and np.array_equal(val, stream[n - n_val:])
    # nanoGPT: train = the first int(0.9 n) characters; ours has the final EOT on top.
    assert (meta["train_tokens"], meta["val_tokens"]) == (n - n_val, n_val) == (1_003_855, 111_540)
    assert abs(meta["train_tokens"] - int(0.9 * len(shk_bytes))) <= 1
    # The document's EOT is in val: that is where it counts.
    assert (meta["train_documents"], meta["val_documents"], meta["documents"]) == (0, 1, 1)
    assert (meta["val_split"], meta["val_split_requested"]) == ("tail", "tail")
    assert meta["settings"]["val_split"] == "tail"
    assert meta["max_token_id"] == 256
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".prepare.lock")) == \
        ["meta.json", "train.bin", "val.bin"]


def test_tail_split_of_many_documents_cuts_the_stream_in_order(tmp_path):
    src = write_paragraphs(tmp_path / "p.txt", 50)
    out = tmp_path / "out"
    meta = prepare(src, out, "byte", val_fraction=0.25, val_split="tail", split_blank_lines=True,
                   **FAST)
    paras = src.read_text().rstrip("\n").split("\n\n")
    stream = np.concatenate([byte_stream(p.encode()) for p in paras])
    n_train, _ = tail_sizes(len(stream), 0.25)
    assert np.array_equal(tokens(out, "train"), stream[:n_train])
    assert np.array_equal(tokens(out, "val"), stream[n_train:])
    assert meta["val_documents"] == int(np.count_nonzero(stream[n_train:] == 256))
    assert meta["train_documents"] + meta["val_documents"] == meta["documents"] == 50


def test_tail_split_is_identical_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(dp, "CHUNK_DOCS", 7)  # many chunks in flight
    monkeypatch.setattr(dp, "TAIL_COPY_TOKENS", 100)  # val is copied in many pieces
    src = write_paragraphs(tmp_path / "p.txt", 200)
    metas = [prepare(src, tmp_path / f"w{w}", "byte", val_fraction=0.1, val_split="tail",
                     split_blank_lines=True, workers=w, progress=False) for w in (1, 2)]
    assert metas[0] == metas[1]
    for split in ("train", "val"):
        assert (tmp_path / "w1" / f"{split}.bin").read_bytes() == \
            (tmp_path / "w2" / f"{split}.bin").read_bytes()


class Interrupt(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["tokenizing", "moving the tail", "after the move"])
def test_interrupted_tail_split_resumes_to_the_same_bytes(tmp_path, monkeypatch, where):
    monkeypatch.setattr(dp, "CHUNK_DOCS", 10)
    monkeypatch.setattr(dp, "CHECKPOINT_CHUNKS", 1)
    monkeypatch.setattr(dp, "TAIL_COPY_TOKENS", 100)  # val is copied in several pieces
    src = write_paragraphs(tmp_path / "p.txt", 100)
    kw = dict(val_fraction=0.2, val_split="tail", split_blank_lines=True, **FAST)
    reference = prepare(src, tmp_path / "ref", "byte", **kw)
    out = tmp_path / "out"

    def killed(progress):
        if where == "tokenizing" and progress.stage == "documents" and progress.done == 50:
            raise Interrupt("killed while tokenizing")
        if where == "moving the tail" and progress.stage == "tail":
            # The first piece of val has been copied; the rest has not.
            assert 0 < progress.done < progress.total
            raise Interrupt("killed while moving the tail")

    real_replace = os.replace

    def dies_renaming_bins(src_path, dst_path, *args, **kwargs):
        if str(dst_path).endswith(".bin"):
            raise Interrupt("killed before the renames")
        return real_replace(src_path, dst_path, *args, **kwargs)

    if where == "after the move":
        monkeypatch.setattr(os, "replace", dies_renaming_bins)
    with pytest.raises(Interrupt):
        prepare(src, out, "byte", on_progress=killed, **kw)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "meta.json").exists()
    state = json.loads((out / ".prepare-state.json").read_text())
    assert state["tail_done"] is (where == "after the move")
    assert prepare(src, out, "byte", **kw) == reference
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == \
            (tmp_path / "ref" / f"{split}.bin").read_bytes()


# ---------------------------------------------------------------------------------------------
# "auto": the rule and when it kicks in


def test_auto_min_documents_is_the_stated_rule():
    for f, seed in ((0.1, 2357), (0.01, 0), (0.3, 7), (0.0005, 2357)):
        need = auto_min_documents(f, seed)
        first_val = int(np.flatnonzero(val_mask(np.arange(100_000, dtype=np.uint64), seed, f))[0])
        assert need == max(int(np.ceil(2 / f)), first_val + 1)
    assert auto_min_documents(0.1, 2357) == 20
    assert auto_min_documents(0.0, 2357) == 0


def test_auto_falls_back_to_tail_for_a_single_document(tmp_path, shakespeare_path, shk_bytes,
                                                       caplog):
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        meta = prepare(shakespeare_path, tmp_path / "out", "byte", val_fraction=0.1, **FAST)
    assert (meta["val_split"], meta["val_split_requested"]) == ("tail", "auto")
    assert meta["settings"]["val_split"] == "tail"
    assert "has 1 document, fewer than the 20" in caplog.text and "val_split=tail" in caplog.text
    stream = byte_stream(shk_bytes)
    assert np.array_equal(tokens(tmp_path / "out", "val"), stream[-round(0.1 * len(stream)):])


def test_auto_keeps_the_document_split_with_enough_documents(tmp_path, caplog):
    src = write_paragraphs(tmp_path / "p.txt", 60)
    kw = dict(val_fraction=0.1, split_blank_lines=True, **FAST)
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        auto = prepare(src, tmp_path / "auto", "byte", **kw)
    documents = prepare(src, tmp_path / "documents", "byte", val_split="documents", **kw)
    assert "per-document split needs" not in caplog.text
    assert auto["val_split"] == documents["val_split"] == "documents"
    assert auto["val_documents"] > 0
    for split in ("train", "val"):
        assert (tmp_path / "auto" / f"{split}.bin").read_bytes() == \
            (tmp_path / "documents" / f"{split}.bin").read_bytes()


def test_auto_with_too_few_documents_counts_them_after_max_docs(tmp_path):
    src = write_paragraphs(tmp_path / "p.txt", 60)
    meta = prepare(src, tmp_path / "out", "byte", val_fraction=0.1, split_blank_lines=True,
                   max_docs=19, **FAST)  # 19 < 20 = auto_min_documents(0.1, 2357)
    assert meta["val_split"] == "tail" and meta["documents"] == 19 and meta["val_tokens"] > 0


def test_auto_counts_non_empty_documents_as_the_recorded_meta_does(tmp_path):
    """A folder of one-document .txt files knows its count without reading them; empty files are
    skipped documents, so they must not count, or a later check from meta.json would disagree."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(30):
        (folder / f"{i:02d}.txt").write_text("" if i % 2 else f"file {i}\n")
    kw = dict(val_fraction=0.1, split_blank_lines=False, **FAST)
    meta = prepare(folder, tmp_path / "out", "byte", **kw)
    assert meta["documents"] == 15 and meta["val_split"] == "tail"  # 15 < 20
    assert prepare(folder, tmp_path / "out", "byte",
                   on_progress=lambda p: pytest.fail("tokenized again"), **kw) == meta


def test_explicit_document_split_of_one_document_still_warns_and_leaves_val_empty(
        tmp_path, shakespeare_path, caplog):
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        meta = prepare(shakespeare_path, tmp_path / "out", "byte", val_fraction=0.1,
                       val_split="documents", **FAST)
    assert meta["val_tokens"] == 0 and meta["val_split"] == "documents"
    assert "--val-split tail" in caplog.text


# ---------------------------------------------------------------------------------------------
# The split mode is a setting


def test_other_split_mode_on_an_existing_folder_is_refused(tmp_path, shakespeare_path):
    out = tmp_path / "out"
    prepare(shakespeare_path, out, "byte", val_fraction=0.1, val_split="tail", **FAST)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".bin", ".json")}
    with pytest.raises(DataError) as err:
        prepare(shakespeare_path, out, "byte", val_fraction=0.1, val_split="documents", **FAST)
    assert "val_split: tail -> documents" in str(err.value) and "--force" in str(err.value)
    with pytest.raises(DataError) as err:
        ensure_prepared(str(shakespeare_path), out, prepare_if_missing=True, tokenizer="byte",
                        val_fraction=0.1, seed=2357, val_split="documents")
    assert "data.val_split: tail -> documents" in str(err.value)
    assert "--val-split documents" in str(err.value) and str(err.value).endswith("--force`.")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".bin", ".json")} == \
        before
    # "auto" means tail for this one-document source: the same data, reused without preparing it
    # again (ensure_prepared may not prepare here, so it must find the folder usable).
    never = dict(on_progress=lambda p: pytest.fail("prepared again"))
    assert ensure_prepared(str(shakespeare_path), out, prepare_if_missing=False,
                           tokenizer="byte", val_fraction=0.1, seed=2357,
                           **never)["val_split"] == "tail"
    assert prepare(shakespeare_path, out, "byte", val_fraction=0.1, **FAST,
                   **never)["val_split"] == "tail"


def test_auto_that_means_documents_is_refused_by_a_tail_folder(tmp_path):
    src = write_paragraphs(tmp_path / "p.txt", 60)
    out = tmp_path / "out"
    prepare(src, out, "byte", val_fraction=0.1, val_split="tail", split_blank_lines=True, **FAST)
    with pytest.raises(DataError, match="val_split: tail -> documents"):
        prepare(src, out, "byte", val_fraction=0.1, split_blank_lines=True, **FAST)


def test_bad_val_split_names_the_choices(tmp_path, shakespeare_path):
    with pytest.raises(DataError, match="val_split='tokens'.*documents.*tail.*auto"):
        prepare(shakespeare_path, tmp_path / "out", "byte", val_split="tokens", **FAST)


def test_cli_val_split(tmp_path, shakespeare_path, capsys):
    rc = dp.main([str(shakespeare_path), "--out", str(tmp_path / "out"), "--tokenizer", "byte",
                  "--val-fraction", "0.1", "--val-split", "tail", "--workers", "1",
                  "--no-progress"])
    assert rc == 0
    assert "split tail" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    # --val-split tail cuts the stream of paragraphs that --split-blank-lines (the .txt default)
    # makes, an EOT after each; nanoGPT's stream is --no-split-blank-lines (one document).
    assert meta["settings"]["split_blank_lines"] is True and meta["documents"] > 1000
    n = meta["train_tokens"] + meta["val_tokens"]
    assert (meta["train_tokens"], meta["val_tokens"]) == tail_sizes(n, 0.1)
    assert meta["val_split"] == meta["val_split_requested"] == "tail"


# ---------------------------------------------------------------------------------------------
# The shakespeare source


def test_shakespeare_source_without_network_names_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        prepare("shakespeare", tmp_path / "out", "byte", **FAST)
    msg = str(err.value)
    assert sources.SHAKESPEARE_URL in msg and "data.source=/path/to/input.txt" in msg
    assert not (tmp_path / "cache" / "tinyshakespeare" / "input.txt").exists()


def test_shakespeare_source_downloads_once_then_works_offline(tmp_path, monkeypatch, shk_bytes,
                                                              shakespeare_path):
    class Response:
        def __init__(self, data):
            self.data = data

        def read(self):
            return self.data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return Response(shk_bytes)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    out = tmp_path / "out"
    meta = prepare("shakespeare", out, "byte", **FAST)  # val_fraction 0.1 is the source's default
    assert urls == [sources.SHAKESPEARE_URL]
    assert (tmp_path / "cache" / "tinyshakespeare" / "input.txt").read_bytes() == shk_bytes
    assert (meta["source"], meta["source_kind"], meta["val_fraction"]) == \
        ("shakespeare", "download", 0.1)
    assert meta["val_split"] == "tail" and meta["settings"]["split_blank_lines"] is False
    local = prepare(shakespeare_path, tmp_path / "local", "byte", val_fraction=0.1, **FAST)
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == \
            (tmp_path / "local" / f"{split}.bin").read_bytes()
    assert (meta["train_tokens"], meta["val_tokens"]) == \
        (local["train_tokens"], local["val_tokens"])
    # From the cache: no second download, also for a fresh folder.
    prepare("shakespeare", tmp_path / "again", "byte", force=True, **FAST)
    assert len(urls) == 1


def test_a_wrong_download_is_not_cached(tmp_path, monkeypatch):
    class Response:
        def read(self):
            return b"<html>rate limited</html>"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Response())
    with pytest.raises(DataError, match="is not tiny Shakespeare"):
        prepare("shakespeare", tmp_path / "out", "byte", **FAST)
    assert not (tmp_path / "cache" / "tinyshakespeare" / "input.txt").exists()
    cached = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("not it")
    with pytest.raises(DataError, match="Delete it to download it again"):
        prepare("shakespeare", tmp_path / "out", "byte", **FAST)


def test_prepare_cli_shakespeare_defaults_to_one_document(tmp_path, monkeypatch, shk_bytes):
    cached = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(shk_bytes)
    monkeypatch.chdir(tmp_path)
    assert dp.main(["shakespeare", "--tokenizer", "byte", "--workers", "1", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "prepared" / "shakespeare-byte" / "meta.json").read_text())
    assert (meta["documents"], meta["val_split"], meta["val_tokens"]) == (1, "tail", 111_540)


# ---------------------------------------------------------------------------------------------
# experiment=shakespeare-char


def test_experiment_composes_with_nanogpts_numbers():
    cfg = compose_cfg(["experiment=shakespeare-char"])
    d = cfg.data
    assert (d.source, d.tokenizer, d.val_fraction, d.val_split, d.split_blank_lines) == \
        ("shakespeare", "byte", 0.1, "tail", False)
    assert d.dir == "prepared/shakespeare-byte"
    m = cfg.model
    assert (m.preset, m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == \
        ("gpt2-micro", 4, 4, 128, 64, 0.0, False)
    t = cfg.train
    assert t.global_batch_tokens == 12 * 64 and t.micro_batch_size == 12 and t.block_size == 64
    assert (t.max_steps, t.decay_steps, t.warmup_steps, t.min_lr_ratio, t.grad_clip) == \
        (2000, None, 100, 0.1, 1.0)
    assert (t.eval_interval, t.eval_batches) == (250, 20)
    o = cfg.optimizer
    assert (o.name, o.lr, list(o.betas), o.weight_decay, o.decay_rule) == \
        ("adamw", 1e-3, [0.9, 0.99], 0.1, "matrices")
    assert (cfg.device, cfg.dtype, cfg.compile) == ("cpu", "float32", False)
    local = compose_cfg(["experiment=shakespeare-char", "data.source=/x/input.txt"])
    assert local.data.dir == "prepared/input-byte"
    # Another optimizer gets its own defaults, not nanoGPT's AdamW values.
    sophia = compose_cfg(["experiment=shakespeare-char", "optimizer=sophia"]).optimizer
    assert (list(sophia.betas), sophia.weight_decay) == \
        (list(compose_cfg(["optimizer=sophia"]).optimizer.betas), 0.2)


def test_a_val_split_override_reaches_the_data_check(tmp_path, shakespeare_path):
    """data.val_split is passed to the prepared-data check: asking for another split than the
    folder holds is refused, never ignored."""
    from data.errors import DataError
    from engine.run import run

    base = ["experiment=shakespeare-char", f"data.source={shakespeare_path}",
            f"data.dir={tmp_path / 'prepared'}", "train.max_steps=1", "train.eval_interval=0"]
    run(compose_cfg(base), tmp_path / "a")
    with pytest.raises(DataError, match="val_split"):
        run(compose_cfg(base + ["data.val_split=documents", "data.val_fraction=0.5"]),
            tmp_path / "b")


def test_experiment_trains_ci_sized(tmp_path, shakespeare_path, shk_bytes):
    from engine.run import run

    data_dir = tmp_path / "prepared"
    cfg = compose_cfg(["experiment=shakespeare-char", f"data.source={shakespeare_path}",
                       f"data.dir={data_dir}", "train.max_steps=20", "train.warmup_steps=2",
                       "train.eval_interval=10", "train.eval_batches=4", "train.log_interval=5"])
    summary = run(cfg, tmp_path / "run")
    meta = json.loads((data_dir / "meta.json").read_text())
    n = len(shk_bytes) + 1  # the bytes and one EOT
    assert (meta["train_tokens"], meta["val_tokens"]) == tail_sizes(n, 0.1)
    assert meta["train_tokens"] == pytest.approx(0.9 * n, abs=1)
    assert meta["val_split"] == "tail" and meta["vocab_size"] == 257
    evals = [r["val/loss"] for r in read_metrics(tmp_path / "run") if "val/loss" in r]
    assert len(evals) == 3 and evals[0] > 5.0  # ~ln(320) = 5.77 at the start
    assert evals[-1] < evals[0] - 1.0 and evals[-1] < evals[1]
    assert summary["step"] == 20 and summary["val_loss"] == pytest.approx(evals[-1])
