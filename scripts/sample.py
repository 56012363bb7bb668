"""Sample text from a training checkpoint.

    python scripts/sample.py outputs/.../checkpoints/ckpt_0005000.pt --prompt "ROMEO:" --num-samples 3
    python scripts/sample.py outputs/2026-11-25/sophia --prompt "ROMEO:"   # the run's newest checkpoint

A run directory (or its `checkpoints/` folder) stands for its newest checkpoint; the path used is
named on stderr.

The checkpoint is loaded and checked by the engine (`engine.checkpoint.load_trained`, which
uses `torch.load(weights_only=True)`, so no code in it runs). The model is rebuilt from its
`model_config` and the tokenizer from its `data_meta["tokenizer"]`, the tokenizer the training data
was prepared with. Samples go to stdout, separated by a line of dashes; problems are reported as
one paragraph on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from data.tokenizers import Tokenizer
from engine.checkpoint import load_trained
from engine.errors import HarnessError
from model import GPT

SEPARATOR = "-" * 40


def sample(model: GPT, tok: Tokenizer, prompt: str, *, num_samples: int, max_new_tokens: int, temperature: float,
           top_k: int | None, seed: int, device: str) -> list[str]:
    """Generate `num_samples` continuations of `prompt` (prompt included), reproducible from `seed`."""
    ids = tok.encode(prompt) if prompt else [tok.eot]  # an empty prompt starts a fresh document
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    texts = []
    for row in out.tolist():
        # The vocabulary may be padded past the tokenizer's (50304 vs 50257); those ids have no text.
        texts.append(tok.decode([t for t in (row if prompt else row[1:]) if t < tok.vocab_size]))
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0, or 2 with a one-paragraph error on stderr)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path,
                   help="a checkpoint written by train.py, or a run directory (its newest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0 disables")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", default=None,
                   help="must match the checkpoint's tokenizer (default: the checkpoint's)")
    args = p.parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise HarnessError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
        if args.num_samples < 1:
            raise HarnessError(f"--num-samples must be >= 1, got {args.num_samples}.")
        if not args.temperature > 0:
            raise HarnessError(f"--temperature must be > 0, got {args.temperature}; use e.g. 0.8 "
                               f"(lower is more conservative).")
        if args.top_k < 0:
            raise HarnessError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}.")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise HarnessError(f"--device {args.device} was requested but CUDA is not available; use --device cpu.")
        trained = load_trained(args.checkpoint, args.device, tokenizer=args.tokenizer)
        if trained.path != args.checkpoint:
            print(f"sampling from {trained.path}", file=sys.stderr)
        model, tok = trained.model, trained.tokenizer
        texts = sample(model, tok, args.prompt, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k or None, seed=args.seed, device=args.device)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, text in enumerate(texts):
        if i:
            print(SEPARATOR)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
