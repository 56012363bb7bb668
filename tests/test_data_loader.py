"""TokenLoader: exact resume, composable slices, rank split, prefetch, validation errors."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataError
from data.loader import ROWS_PER_DRAW, TokenLoader
from data.prepare import prepare

BLOCK = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shakespeare_path) -> Path:
    src = tmp_path_factory.mktemp("src") / "shk.txt"
    src.write_text(shakespeare_path.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    out = tmp_path_factory.mktemp("prepared") / "shk-byte"
    prepare(src, out, "byte", val_fraction=0.1, workers=1, split_blank_lines=True, progress=False)
    return out


@pytest.fixture()
def copy_of(prepared, tmp_path):
    """A private copy of the prepared folder that a test may damage."""
    def make() -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(prepared, dst)
        return dst
    return make


def loader(path, **kw) -> TokenLoader:
    args = dict(split="train", block_size=BLOCK, seed=1234)
    args.update(kw)
    return TokenLoader(path, **args)


def test_windows_come_from_the_bin(prepared):
    L = loader(prepared)
    tokens = np.fromfile(prepared / "train.bin", dtype=np.uint16).astype(np.int64)
    assert L.num_tokens == len(tokens) == len(L)
    assert (L.vocab_size, L.eot, L.tokenizer) == (257, 256, "byte")
    x, y = L.get(3, 0, 8)
    assert x.shape == y.shape == (8, BLOCK) and x.dtype == y.dtype == torch.int64
    offs = L.offsets(3, 0, 8)
    assert offs.min() >= 0 and offs.max() + BLOCK < L.num_tokens
    for i, o in enumerate(offs):
        assert x[i].tolist() == tokens[o:o + BLOCK].tolist()
        assert y[i].tolist() == tokens[o + 1:o + BLOCK + 1].tolist()


def test_resume_sees_the_same_batches(prepared):
    uninterrupted = [loader(prepared).get(s, 0, 4) for s in range(8)]
    resumed = loader(prepared)  # a fresh process after restarting from step 5
    for s in range(5, 8):
        x, y = resumed.get(s, 0, 4)
        assert torch.equal(x, uninterrupted[s][0]) and torch.equal(y, uninterrupted[s][1])
    # Different steps, streams and seeds give different windows.
    assert not torch.equal(uninterrupted[0][0], uninterrupted[1][0])
    assert not torch.equal(resumed.get(0, 0, 4, stream="hessian")[0], uninterrupted[0][0])
    assert not torch.equal(loader(prepared, seed=99).get(0, 0, 4)[0], uninterrupted[0][0])


@pytest.mark.parametrize("start, count",
                         [(0, 4), (4, 4), (60, 10), (ROWS_PER_DRAW - 1, 3), (130, 1)])
def test_slices_compose(prepared, start, count):
    L = loader(prepared)
    whole_x, whole_y = L.get(7, 0, 140)
    x, y = L.get(7, start, count)
    assert torch.equal(x, whole_x[start:start + count])
    assert torch.equal(y, whole_y[start:start + count])


def test_ranks_split_the_single_process_batch(prepared):
    """Rank r at micro-step m takes rows (m * world + r) * micro_bs: together the ranks see
    exactly the batch one process with the same global batch sees."""
    world, micro_bs, accum, step = 2, 3, 2, 11
    single = loader(prepared).get(step, 0, world * micro_bs * accum)[0]
    ranks = [loader(prepared) for _ in range(world)]
    seen = torch.empty_like(single)
    for m in range(accum):
        for r in range(world):
            row = (m * world + r) * micro_bs
            seen[row:row + micro_bs] = ranks[r].get(step, row, micro_bs)[0]
    assert torch.equal(seen, single)


def test_prefetch_and_iterate_match_get(prepared):
    L = loader(prepared)
    expected = [L.get(s, 2, 5, stream="train") for s in range(6)]
    P = loader(prepared)
    P.prefetch(0, 2, 5)
    P.prefetch(1, 2, 5)
    for s in (0, 1):
        x, y = P.get(s, 2, 5)
        assert torch.equal(x, expected[s][0]) and torch.equal(y, expected[s][1])
    got = list(P.iterate(2, 2, 5, num_steps=4))
    assert [s for s, _, _ in got] == [2, 3, 4, 5]
    for s, x, y in got:
        assert torch.equal(x, expected[s][0]) and torch.equal(y, expected[s][1])
    P.close()
    assert torch.equal(P.get(0, 2, 5)[0], expected[0][0])  # reopens after close


def test_pickle_carries_no_tokens_and_reopens_lazily(prepared):
    """A loader sent to a worker process is a few hundred bytes, not its memory-mapped tokens."""
    L = loader(prepared)
    x, _ = L.get(0, 0, 4)
    blob = pickle.dumps(L)
    assert len(blob) < (prepared / "train.bin").stat().st_size / 10
    L2 = pickle.loads(blob)
    assert torch.equal(L2.get(0, 0, 4)[0], x)


def test_smallest_valid_block(prepared):
    n = loader(prepared, split="val").num_tokens
    L = loader(prepared, split="val", block_size=n - 1)
    assert (L.offsets(0, 0, 8) == 0).all()
    match = rf"block_size={n} needs windows of {n + 1} tokens.*holds only {n}"
    with pytest.raises(DataError, match=match):
        loader(prepared, split="val", block_size=n)


def test_check_vocab(prepared, copy_of):
    L = loader(prepared)
    assert L.check_vocab(257) is None
    assert L.check_vocab(50304, scan=True) == 256
    with pytest.raises(DataError, match="model's vocab_size is 200.*at least 257"):
        L.check_vocab(200)
    d = copy_of()
    opened = loader(d)  # opening checks a sample of the ids; the scan reads every one
    tokens = np.fromfile(d / "train.bin", dtype=np.uint16)
    tokens[len(tokens) // 2] = 300  # an id the byte tokenizer cannot produce
    tokens.tofile(d / "train.bin")
    with pytest.raises(DataError, match="holds token id 300, which is not below the vocabulary"):
        opened.check_vocab(50304, scan=True)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DataError, match="does not exist.*python -m data.prepare"):
        loader(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no meta.json.*python -m data.prepare"):
        loader(tmp_path)


def test_incomplete_prepare_is_refused(copy_of):
    d = copy_of()
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match="incomplete prepare.*Re-run the same"):
        loader(d)


def test_meta_not_marked_complete(copy_of):
    d = copy_of()
    meta = json.loads((d / "meta.json").read_text())
    meta["complete"] = False
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not mark a complete prepare"):
        loader(d)


@pytest.mark.parametrize("change, match", [
    ({"train_tokens": 12345}, "do not belong together"),
    ({"dtype": "uint32"}, "dtype is 'uint32', expected 'uint16' .the dtype that holds the byte"),
    ({"format_version": 99}, "format_version 99"),
    ({"eot": 999}, "eot is 999, expected 256 .the byte tokenizer's end-of-text id"),
    ({"max_token_id": 257}, "records token id 257, which is not below its vocabulary of 257"),
    ({"settings": None}, "settings is None, not a mapping"),
])
def test_meta_that_disagrees_with_the_bins(copy_of, change, match):
    d = copy_of()
    meta = json.loads((d / "meta.json").read_text())
    meta.update(change)
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=match):
        loader(d)


def test_truncated_or_missing_bin(copy_of):
    d = copy_of()
    with open(d / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="has 100 bytes but meta.json says"):
        loader(d)
    (d / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin is missing"):
        loader(d, split="val")


def test_empty_val_split(tmp_path, shakespeare_path):
    src = tmp_path / "one.txt"
    src.write_text(shakespeare_path.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    prepare(src, tmp_path / "out", "byte", val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="val split of .* is empty.*--val-fraction"):
        loader(tmp_path / "out", split="val")


def test_bad_arguments(prepared):
    with pytest.raises(ValueError, match="block_size=0 must be a positive integer"):
        loader(prepared, block_size=0)
    with pytest.raises(ValueError, match="seed=-1"):
        loader(prepared, seed=-1)
    with pytest.raises(DataError, match="Unknown split 'test'"):
        loader(prepared, split="test")
    with pytest.raises(ValueError, match="row_count >= 1"):
        loader(prepared).get(0, 0, 0)


@pytest.mark.gpu
def test_cuda_pinned_non_blocking_matches_cpu(prepared):
    cpu = loader(prepared).get(4, 0, 8)
    L = loader(prepared, device="cuda")
    assert L.pin_memory
    L.prefetch(4, 0, 8)
    x, y = L.get(4, 0, 8)
    assert x.is_cuda and torch.equal(x.cpu(), cpu[0]) and torch.equal(y.cpu(), cpu[1])
