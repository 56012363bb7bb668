"""Random windows of a prepared token stream, reproducible per (seed, stream, step).

Every global step draws the window offsets of its WHOLE batch from a generator seeded by
``(seed, stream, step)``; a caller asks for a slice of rows. A rank at micro-step ``m`` of a
``world``-rank job takes rows ``(m * world + rank) * micro_bs`` onwards, so

* a run resumed at step s sees exactly the batches of an uninterrupted run (no loader state to
  save beyond the step), and
* a 2-rank job sees exactly the data a 1-process job with the same global batch sees.

Offsets are drawn in fixed blocks of ``ROWS_PER_DRAW`` rows, each from its own generator, so the
offset of global row r never depends on how many rows a caller asked for.
"""
from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from data.bins import check_bin, check_tokens, read_meta, token_error
from data.errors import DataError

ROWS_PER_DRAW = 64
_MAX_PENDING = 8  # prefetched batches kept waiting for their get()
_SCAN_TOKENS = 1 << 24  # tokens per chunk when scanning a bin for its largest id


def _stream_id(stream: str) -> int:
    # crc32 rather than hash(): Python salts str hashes per process.
    return zlib.crc32(stream.encode("utf-8"))


class TokenLoader:
    """Batches of (x, y) windows from ``<data_dir>/<split>.bin`` (see the module docstring).

    Opening refuses (``DataError``) a folder whose meta.json, bin size or sampled token ids do
    not fit its tokenizer (``data.bins``); a batch that meets an id past the vocabulary raises
    ``DataError`` naming the bin and offset.

    Args:
        data_dir: a folder written by ``python -m data.prepare``.
        split: "train" or "val".
        block_size: tokens per row; each window reads ``block_size + 1`` tokens.
        seed: base seed; the same (seed, stream, step) always gives the same windows.
        device: where ``get`` puts the tensors. On CUDA they are staged in pinned memory and
            copied with ``non_blocking=True``.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, block_size: int, seed: int,
                 device: str | torch.device = "cpu", *, pin_memory: bool | None = None) -> None:
        if (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                or block_size < 1):
            raise ValueError(f"block_size={block_size!r} must be a positive integer.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer.")
        self.data_dir = Path(data_dir)
        self.split = split
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.meta: dict[str, Any] = read_meta(self.data_dir)
        self.path = check_bin(self.data_dir, split, self.meta)
        self.dtype = np.dtype(self.meta["dtype"])
        self.num_tokens = int(self.meta[f"{split}_tokens"])
        if self.num_tokens == 0:
            raise DataError(
                f"The {split} split of {self.data_dir} is empty: no document was assigned to it "
                f"(val_fraction={self.meta.get('val_fraction')}, {self.meta.get('documents')} "
                "documents). Re-run the prepare with a larger --val-fraction, or with "
                "--split-blank-lines so a single text file becomes many documents."
            )
        if self.block_size >= self.num_tokens:
            raise DataError(
                f"block_size={self.block_size} needs windows of {self.block_size + 1} tokens but "
                f"the {split} split of {self.data_dir} holds only {self.num_tokens} tokens. Use a "
                "smaller block_size or prepare more data (for val: a larger --val-fraction)."
            )
        check_tokens(self.path, split, self.meta)
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        self._data: np.memmap | None = None
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[tuple, Future] = {}

    # -- metadata ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot(self) -> int:
        return int(self.meta["eot"])

    @property
    def tokenizer(self) -> str:
        return str(self.meta["tokenizer"])

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"TokenLoader({str(self.data_dir)!r}, split={self.split!r}, block_size="
                f"{self.block_size}, seed={self.seed}, device={str(self.device)!r}, "
                f"tokens={self.num_tokens:,}, tokenizer={self.tokenizer!r})")

    def check_vocab(self, model_vocab_size: int, scan: bool = False) -> int | None:
        """Raise ``DataError`` if token ids can reach ``model_vocab_size``.

        Checks the tokenizer's vocabulary from meta.json; with ``scan=True`` also reads the whole
        bin (in chunks) and checks its largest id against both vocabularies, which catches a
        corrupt bin. Returns the largest id when scanned."""
        if self.vocab_size > int(model_vocab_size):
            raise DataError(
                f"{self.data_dir} was tokenized with {self.tokenizer} (ids up to "
                f"{self.vocab_size - 1}) but the model's vocab_size is {model_vocab_size}: those "
                f"ids would index past the embedding. Set the model's vocab_size to at least "
                f"{self.vocab_size} (GPT-2 pads 50257 to 50304), or prepare the data with a "
                "smaller tokenizer."
            )
        if not scan:
            return None
        data = self._memmap()
        largest = -1
        for i in range(0, self.num_tokens, _SCAN_TOKENS):
            largest = max(largest, int(data[i:i + _SCAN_TOKENS].max()))
        limit = min(self.vocab_size, int(model_vocab_size))
        if largest >= limit:
            raise DataError(
                f"{self.path} holds token id {largest}, which is not below the vocabulary "
                f"({self.tokenizer}: {self.vocab_size}, model: {model_vocab_size}). The bin is "
                "corrupt or belongs to another tokenizer; re-run the prepare with --force."
            )
        return largest

    # -- batches -------------------------------------------------------------------------------

    def offsets(self, step: int, row_start: int, row_count: int, stream: str = "train"
                ) -> np.ndarray:
        """Window start offsets (int64) of global rows ``row_start .. row_start + row_count``."""
        if step < 0 or row_start < 0 or row_count < 1:
            raise ValueError(f"need step >= 0, row_start >= 0, row_count >= 1; got step={step}, "
                             f"row_start={row_start}, row_count={row_count}.")
        high = self.num_tokens - self.block_size  # last window ends at the last token
        first, last = row_start // ROWS_PER_DRAW, (row_start + row_count - 1) // ROWS_PER_DRAW
        blocks = []
        for b in range(first, last + 1):
            ss = np.random.SeedSequence([self.seed, _stream_id(stream), int(step), b])
            blocks.append(np.random.Generator(np.random.PCG64(ss)).integers(
                0, high, size=ROWS_PER_DRAW, dtype=np.int64))
        rows = np.concatenate(blocks)
        lo = row_start - first * ROWS_PER_DRAW
        return rows[lo:lo + row_count]

    def get(self, step: int, row_start: int, row_count: int, stream: str = "train"
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, int64 ``[row_count, block_size]`` on ``device``."""
        fut = self._pending.pop((step, row_start, row_count, stream), None)
        if fut is not None:
            x, y = fut.result()
        else:
            x, y = self._cpu_batch(step, row_start, row_count, stream)
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=self.pin_memory)
            y = y.to(self.device, non_blocking=self.pin_memory)
        return x, y

    def prefetch(self, step: int, row_start: int, row_count: int, stream: str = "train") -> None:
        """Start reading a batch on a background thread; the matching ``get`` returns it."""
        key = (step, row_start, row_count, stream)
        if key in self._pending:
            return
        self._memmap()  # open it here, not racing in the thread
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="TokenLoader")
        while len(self._pending) >= _MAX_PENDING:  # never-collected prefetches must not pile up
            self._pending.pop(next(iter(self._pending)))
        self._pending[key] = self._executor.submit(self._cpu_batch, *key)

    def iterate(self, start_step: int, row_start: int, row_count: int, stream: str = "train",
                num_steps: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(step, x, y)`` from ``start_step`` on, reading the next step while the caller
        works on this one."""
        step = start_step
        self.prefetch(step, row_start, row_count, stream)
        while num_steps is None or step < start_step + num_steps:
            if num_steps is None or step + 1 < start_step + num_steps:
                self.prefetch(step + 1, row_start, row_count, stream)
            x, y = self.get(step, row_start, row_count, stream)
            yield step, x, y
            step += 1

    def close(self) -> None:
        """Stop the prefetch thread and drop the memory map (reopened on next use)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._pending.clear()
        self._data = None

    # -- internals -----------------------------------------------------------------------------

    def _memmap(self) -> np.memmap:
        # Opened lazily (and dropped when pickled) so a loader can cross fork / spawn boundaries,
        # e.g. into DataLoader workers, without sharing a file mapping.
        if self._data is None:
            with self._lock:
                if self._data is None:
                    self._data = np.memmap(self.path, dtype=self.dtype, mode="r",
                                           shape=(self.num_tokens,))
        return self._data

    def _cpu_batch(self, step: int, row_start: int, row_count: int, stream: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        offs = self.offsets(step, row_start, row_count, stream)
        data = self._memmap()
        shape = (row_count, self.block_size)
        x = torch.empty(shape, dtype=torch.int64, pin_memory=self.pin_memory)
        y = torch.empty(shape, dtype=torch.int64, pin_memory=self.pin_memory)
        xn, yn = x.numpy(), y.numpy()
        for i, o in enumerate(offs):
            window = data[o:o + self.block_size + 1]
            xn[i] = window[:-1]
            yn[i] = window[1:]
        # An id past the vocabulary would index past the embedding: refuse it here, naming the
        # bin, rather than as an IndexError deep in the model (the bin changed since it was
        # opened, or holds a corrupt stretch that check_tokens' sample missed).
        if max(int(xn.max()), int(yn[:, -1].max())) >= self.vocab_size:
            for o in offs:
                window = np.asarray(data[o:o + self.block_size + 1])
                bad = np.flatnonzero(window >= self.vocab_size)
                if bad.size:
                    raise token_error(self.path, int(o) + int(bad[0]), int(window[bad[0]]),
                                      self.meta)
        return x, y

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_data=None, _lock=None, _executor=None, _pending={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        ex = getattr(self, "_executor", None)
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)
