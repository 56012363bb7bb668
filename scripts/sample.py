"""Sample text from a training checkpoint.

    python scripts/sample.py outputs/.../checkpoints/ckpt_0005000.pt --prompt "ROMEO:" --num-samples 3
    python scripts/sample.py outputs/2026-11-25/sophia --prompt "ROMEO:"   # the run's newest checkpoint

A run directory (or its `checkpoints/` folder) stands for its newest checkpoint; the path used is
named on stderr.

The checkpoint is loaded and checked by the engine (`engine.checkpoint.load_checkpoint`, which
uses `torch.load(weights_only=True)`, so no code in it runs). The model is rebuilt from its
`model_config` and the tokenizer from its `data_meta["tokenizer"]`, the tokenizer the training data
was prepared with. Samples go to stdout, separated by a line of dashes; problems are reported as
one paragraph on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from data.errors import DataError
from data.tokenizers import Tokenizer, get_tokenizer
from engine import checkpoint
from engine.errors import HarnessError
from model import GPT, GPTConfig

SEPARATOR = "-" * 40


class SampleError(HarnessError):
    """A problem the user can fix; printed as one paragraph without a traceback."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The training state in ``path``, loaded and checked by the engine; problems as SampleError."""
    if not path.is_file():
        raise SampleError(f"{path} does not exist or is not a file. Pass a checkpoint such as "
                          f"RUN_DIR/checkpoints/ckpt_0001000.pt, or a run directory RUN_DIR.")
    try:
        return checkpoint.load_checkpoint(path)
    except checkpoint.UnreadableCheckpoint as err:
        if not zipfile.is_zipfile(path):
            # torch.save has written zip archives since torch 1.6; for anything else torch blames
            # weights_only, which misleads.
            reason = "not a torch.save archive"
        else:  # torch's own message can run to pages; its first line says enough
            cause = err.__cause__
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            reason = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
        raise SampleError(f"{path} is not a checkpoint this tool can read ({reason}). Pass a .pt file "
                          f"written by train.py (RUN_DIR/checkpoints/ckpt_*.pt); a truncated or foreign "
                          f"file cannot be sampled from.") from None
    except HarnessError as err:
        raise SampleError(f"{err} Pass a file written by train.py (RUN_DIR/checkpoints/ckpt_*.pt), "
                          f"not a bare state dict or another file.") from None


def build_model(ckpt: dict[str, Any], device: str) -> GPT:
    """Rebuild the GPT from the checkpoint's config and weights, in eval mode on `device`."""
    try:
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    except (TypeError, ValueError) as e:
        raise SampleError(f"the checkpoint's model_config cannot build a GPT ({e}). The checkpoint was "
                          f"written by an incompatible version of the harness.") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SampleError(f"the checkpoint's weights do not match its model_config "
                          f"({str(e).splitlines()[0]}); the file is corrupt or was edited.") from None
    return model.to(device).eval()


def resolve_tokenizer(ckpt: dict[str, Any], requested: str | None, model_vocab: int) -> Tokenizer:
    """The tokenizer to decode with: the checkpoint's, refusing any mismatch with `requested`."""
    meta = ckpt.get("data_meta") if isinstance(ckpt.get("data_meta"), dict) else {}
    trained = meta.get("tokenizer")
    if requested and trained and requested != trained:
        raise SampleError(f"tokenizer mismatch: --tokenizer {requested} was given but this model was trained on "
                          f"data tokenized with {trained!r}. Decoding its ids with another tokenizer prints "
                          f"garbage; drop --tokenizer (the checkpoint's own is used) or pass --tokenizer {trained}.")
    name = requested or trained
    if not name:
        raise SampleError("the checkpoint does not record its tokenizer (no data_meta.tokenizer); pass "
                          "--tokenizer with the tokenizer the training data was prepared with (gpt2 or byte).")
    try:
        tok = get_tokenizer(name)
    except DataError as e:
        raise SampleError(str(e)) from None
    if tok.vocab_size > model_vocab:
        raise SampleError(f"tokenizer mismatch: {name!r} has {tok.vocab_size} tokens but the model's vocabulary "
                          f"has only {model_vocab}, so it cannot have been trained with it. Use the tokenizer "
                          f"the model was trained with (--tokenizer), or a checkpoint trained on {name!r} data.")
    return tok


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
            raise SampleError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
        if args.num_samples < 1:
            raise SampleError(f"--num-samples must be >= 1, got {args.num_samples}.")
        if not args.temperature > 0:
            raise SampleError(f"--temperature must be > 0, got {args.temperature}; use e.g. 0.8 "
                              f"(lower is more conservative).")
        if args.top_k < 0:
            raise SampleError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}.")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SampleError(f"--device {args.device} was requested but CUDA is not available; use --device cpu.")
        path = checkpoint.resolve_checkpoint(args.checkpoint)
        if path != args.checkpoint:
            print(f"sampling from {path}", file=sys.stderr)
        ckpt = load_checkpoint(path)
        model = build_model(ckpt, args.device)
        tok = resolve_tokenizer(ckpt, args.tokenizer, model.config.vocab_size)
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
