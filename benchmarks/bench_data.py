"""Benchmark the data pipeline: prepare throughput with 1 and N workers, loader batches/s.

    python -m benchmarks.bench_data                                  # stdlib corpus, byte tokenizer
    python -m benchmarks.bench_data tests/fixtures/tinyshakespeare.txt --split-blank-lines \
        --tokenizer gpt2 --workers 4 --json results/bench_data.json

Prepares into a temporary folder (or --keep DIR), so it never touches prepared/.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from data.loader import TokenLoader
from data.prepare import default_workers, prepare
from benchmarks.common import write_json


def bench_prepare(corpus: str, out: Path, workers: int, args: argparse.Namespace) -> dict:
    """Prepare ``corpus`` into ``out`` with ``workers`` processes; its size and throughput."""
    t0 = time.perf_counter()
    meta = prepare(corpus, out, args.tokenizer, val_fraction=args.val_fraction, workers=workers,
                   max_docs=args.max_docs, split_blank_lines=args.split_blank_lines, force=True,
                   progress=False)
    dt = time.perf_counter() - t0
    tokens = meta["train_tokens"] + meta["val_tokens"]
    return {"workers": workers, "seconds": dt, "documents": meta["documents"], "tokens": tokens,
            "text_mb": meta["text_bytes"] / 1e6, "mb_per_s": meta["text_bytes"] / 1e6 / dt,
            "tokens_per_s": tokens / dt}


def bench_loader(out: Path, args: argparse.Namespace) -> dict:
    """Batches/s and tokens/s of reading ``out``'s train split, without and with prefetch."""
    loader = TokenLoader(out, "train", block_size=args.block_size, seed=0)
    result = {"block_size": args.block_size, "batch_size": args.batch_size}
    for name, prefetch in (("get", False), ("prefetch", True)):
        t0 = time.perf_counter()
        if prefetch:
            for _ in loader.iterate(0, 0, args.batch_size, num_steps=args.steps):
                pass
        else:
            for step in range(args.steps):
                loader.get(step, 0, args.batch_size)
        dt = time.perf_counter() - t0
        result[f"{name}_batches_per_s"] = args.steps / dt
        result[f"{name}_tokens_per_s"] = args.steps * args.batch_size * args.block_size / dt
    loader.close()
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 1 when worker counts prepared different outputs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", nargs="?", default="stdlib",
                   help="any data.prepare source (default: stdlib)")
    p.add_argument("--tokenizer", default="byte", choices=("byte", "gpt2"))
    p.add_argument("--workers", type=int, default=max(2, default_workers()),
                   help="the N of the 1-vs-N comparison")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--split-blank-lines", action="store_true")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=200, help="loader batches to time")
    p.add_argument("--keep", default=None, help="prepare here instead of a temporary folder")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        runs = [bench_prepare(args.corpus, base / f"w{w}", w, args)
                for w in sorted({1, args.workers})]
        identical = all(
            (base / f"w{runs[0]['workers']}" / f"{s}.bin").read_bytes()
            == (base / f"w{r['workers']}" / f"{s}.bin").read_bytes()
            for r in runs[1:] for s in ("train", "val"))
        load = bench_loader(base / f"w{runs[0]['workers']}", args)

    print(f"corpus {args.corpus} ({args.tokenizer}): {runs[0]['documents']:,} documents, "
          f"{runs[0]['text_mb']:.1f} MB, {runs[0]['tokens']:,} tokens; cpu_count {os.cpu_count()}")
    for r in runs:
        print(f"  prepare workers={r['workers']:<3} {r['seconds']:7.2f} s  "
              f"{r['mb_per_s']:7.2f} MB/s  {r['tokens_per_s']:12,.0f} tokens/s")
    print(f"  outputs identical across worker counts: {identical}")
    print(f"  loader B={load['batch_size']} T={load['block_size']}: "
          f"{load['get_batches_per_s']:,.0f} batches/s (get), "
          f"{load['prefetch_batches_per_s']:,.0f} batches/s (iterate with prefetch)")
    if args.json:
        write_json(args.json, {"corpus": args.corpus, "tokenizer": args.tokenizer, "prepare": runs,
                               "identical": identical, "loader": load,
                               "cpu_count": os.cpu_count()})
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
