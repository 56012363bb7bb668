"""Zero-shot downstream evaluation of a training checkpoint (HellaSwag, as llm.c scores it).

    python scripts/evaluate.py outputs/.../checkpoints/ckpt_0005000.pt --task hellaswag
    python scripts/evaluate.py outputs/2026-11-25/sophia --limit 500        # the run's newest checkpoint
    python scripts/evaluate.py RUN_DIR --task-file hellaswag_val.jsonl      # no download

Each example's context is followed by each of its 4 endings; `acc` picks the ending with the
lowest summed token loss, `acc_norm` the lowest mean loss per token (engine/hellaswag.py has the
rules: tokenization, left truncation to the block size, ties). The model and its tokenizer come
from the checkpoint (`model_config`, `data_meta["tokenizer"]`). Without --task-file the
validation split is downloaded once into $SOPHIA_BENCH_CACHE (default ~/.cache/sophia-bench).

A progress bar goes to stderr, one result line to stdout, and the result as JSON to --out
(default RUN_DIR/eval_hellaswag.json). Problems are one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from data.files import write_text_atomic
from engine.build import autocast_factory, resolve_dtype
from engine.checkpoint import load_trained, resolve_checkpoint
from engine.errors import HarnessError
from evals import hellaswag

TASKS = ("hellaswag",)


def run_dir_of(ckpt_path: Path) -> Path:
    """The run directory a checkpoint belongs to (RUN_DIR/checkpoints/ckpt.pt -> RUN_DIR), or the
    checkpoint's own folder for a file kept elsewhere."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Strict JSON (NaN as null), written atomically."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in obj.items()}
    write_text_atomic(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")


def evaluate(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Load, score, return the result record and where it is to be written."""
    if args.limit is not None and args.limit < 1:
        raise HarnessError(f"--limit must be >= 1, got {args.limit}; omit it to evaluate every example.")
    if args.batch_size < 1:
        raise HarnessError(f"--batch-size must be >= 1, got {args.batch_size}.")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"--device {args.device} was requested but CUDA is not available; use "
                           f"--device cpu.")
    path = resolve_checkpoint(args.checkpoint)
    # The task first: a missing file or network fails before the (possibly large) model loads.
    try:
        task_file = hellaswag.task_file_path(args.task_file)
        examples = hellaswag.load_task(task_file, args.limit)
        trained = load_trained(path, device)
        dtype = resolve_dtype(args.dtype, torch.device(device))
    except HarnessError as err:  # one line: the progress bar and the result line follow it
        raise HarnessError(str(err).replace("\n", " ")) from None
    model, tok = trained.model, trained.tokenizer
    # Named once everything has loaded, so that a refusal stays a single line.
    print(f"{args.task}: {len(examples)} examples, {path} (step {trained.step}) on {device}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    scores = hellaswag.score_examples(
        model, examples, tok.encode, model.config.block_size, device,
        autocast_factory(dtype, torch.device(device)), args.batch_size,
        progress=not args.no_progress)
    counts = hellaswag.count_correct(scores)
    record = {
        "task": args.task, **counts.result(),
        "correct": counts.correct, "correct_norm": counts.correct_norm,
        "truncated": sum(s.truncated for s in scores),
        "checkpoint": str(path.resolve()), "step": trained.step,
        "task_file": str(task_file.resolve()),
        "limit": args.limit, "tokenizer": tok.name, "block_size": model.config.block_size,
        "device": device, "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - start, 3),
    }
    out = args.out if args.out is not None else run_dir_of(path) / f"eval_{args.task}.json"
    return record, out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0, or 2 with a one-line error on stderr)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path,
                   help="a checkpoint written by train.py, or a run directory (its newest checkpoint)")
    p.add_argument("--task", choices=TASKS, default="hellaswag")
    p.add_argument("--task-file", default=None,
                   help="local jsonl in rowanz/hellaswag's format (default: download "
                        f"{hellaswag.HELLASWAG_FILE} once into the cache)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast dtype of the forward pass (auto: bf16 on CUDA, else float32)")
    p.add_argument("--batch-size", type=int, default=hellaswag.DEFAULT_BATCH_SIZE,
                   help="examples per forward pass (4 sequences each)")
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default: RUN_DIR/eval_<task>.json beside checkpoints/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        record, out = evaluate(args)
        try:
            write_json(out, record)
        except OSError as err:
            raise HarnessError(f"cannot write the result to {out} ({err.strerror or err}); pass "
                               f"--out with a writable path.") from None
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.task}: acc {record['acc']:.4f} | acc_norm {record['acc_norm']:.4f} | "
          f"n {record['n']} | step {record['step']} | {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
