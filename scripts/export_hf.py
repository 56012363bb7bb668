"""Export a training checkpoint as a Hugging Face ``transformers`` GPT-2 directory.

    python scripts/export_hf.py outputs/.../checkpoints/ckpt_0005000.pt hf/my-gpt2
    python scripts/export_hf.py outputs/2026-11-25/sophia hf/my-gpt2     # the run's newest checkpoint

OUT_DIR then loads with ``transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)`` and computes our
logits (float32). It holds ``config.json``, ``model.safetensors``, ``README.md`` (what was exported
and how) and ``export_info.json`` (the same facts for programs); for a run on the ``gpt2``
tokenizer also the tokenizer (``AutoTokenizer.from_pretrained(OUT_DIR)`` encodes as ours), copied
from tiktoken's cache (``TIKTOKEN_CACHE_DIR``), never downloaded. A ``byte``-tokenizer run gets no
tokenizer: its ids are the UTF-8 bytes of the text (0-255) and 256 is the end of text.

Vocabulary: by default only the data's real token ids are exported (50257 for GPT-2 BPE, 257 for
bytes), not our padding rows (the model's vocab_size is padded to a multiple of 64), so the result
is a standard GPT-2 and its logits equal ours on every real id. ``--keep-padding`` exports every
row, so the logits equal ours everywhere. Biases: a ``model.bias=false`` run exports all-zero
biases, which computes the same function (HF's GPT-2 always has biases). See model/hf.py.

After writing, the export is checked (unless ``--no-verify``): the model is loaded back through
transformers and its logits compared with ours on random tokens, and the tokenizer's ids with ours
on a mixed text. Problems are reported as one paragraph on stderr with exit status 2; a failed
check exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_trained
from engine.errors import HarnessError
from model import GPT
from model.hf import HFConversionError, preset_overrides, save_gpt2_tokenizer, save_hf

# Logits of the reloaded export may differ from ours by float32 rounding only (they are equal in
# practice: the same matmuls); anything near this bound is a conversion bug.
LOGITS_TOLERANCE = 1e-4
# Text for the tokenizer check: accents, CJK, emoji, runs of spaces and newlines, digits, code,
# contractions and the end-of-text marker as plain text.
PROBE_TEXT = ("Hello world! Héllo wörld, naïve café. 日本語のテキスト 🤗🚀\n\n\n  indented\ttab  "
              "trailing   \n12345 3.14159 -0.5e-3 1,000,000\ndef f(x):\n    return x**2  # ok\n"
              "don't I'll we've <|endoftext|> after\r\n")
BYTE_NOTE = ("No Hugging Face tokenizer: this run used the byte tokenizer. A token id is one byte of "
             "the text's UTF-8 encoding (0-255) and 256 is the end-of-text id, so encode with "
             "list(text.encode('utf-8')) and decode with bytes(ids).decode('utf-8', "
             "errors='replace') after dropping ids >= 256. Do not use "
             "AutoTokenizer.from_pretrained on this directory: transformers 5 does not fail but "
             "returns an empty GPT-2 tokenizer that encodes every text to [].")


def tiktoken_cache_dir() -> Path:
    """Where tiktoken keeps its downloads: the folder it would use itself."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def export(ckpt_path: Path, out_dir: Path, *, keep_padding: bool = False, verify: bool = True,
           force: bool = False, log=print) -> dict[str, Any]:
    """Write the Hugging Face export of the checkpoint at ``ckpt_path`` (a file or a run dir) to
    ``out_dir``; returns the facts written to ``export_info.json``. Raises :class:`HarnessError`
    (a :class:`~engine.checkpoint.CheckpointError` for the checkpoint)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise HarnessError(f"{out_dir} exists and is not an empty directory; choose a new OUT_DIR "
                           f"or pass --force to overwrite the files the export writes there.")
    trained = load_trained(ckpt_path, load_tokenizer=False)
    ckpt_path, config, meta = trained.path, trained.config, trained.data_meta
    tokenizer = trained.tokenizer_name
    data_vocab = meta.get("vocab_size")
    if data_vocab is None and not keep_padding:
        log(f"note: {ckpt_path} records no data vocabulary; exporting all {config.vocab_size} rows")
    vocab = config.vocab_size if keep_padding or data_vocab is None else int(data_vocab)
    model_state = trained.model.state_dict()
    try:
        written = save_hf(model_state, config, out_dir, vocab_size=vocab, eot=meta.get("eot"))
        tok_files = []
        if tokenizer == "gpt2":
            tok_files = save_gpt2_tokenizer(out_dir, tiktoken_cache_dir(), config.block_size)
    except HFConversionError as err:
        raise HarnessError(str(err)) from None
    note = None if tokenizer == "gpt2" else (
        BYTE_NOTE if tokenizer == "byte"
        else f"No Hugging Face tokenizer: the run's tokenizer is {tokenizer!r}, which has none.")
    info = {
        "source_checkpoint": str(ckpt_path.resolve()),
        "step": trained.step,
        "optimizer": trained.optimizer_name,
        "model_config": config.to_dict(),
        "data_tokenizer": tokenizer,
        "data_vocab_size": data_vocab,
        "model_vocab_size": config.vocab_size,
        "exported_vocab_size": vocab,
        "padding_rows_dropped": config.vocab_size - vocab,
        "zero_biases_added": not config.bias,
        "activation_function": written["activation_function"],
        "tokenizer_files": tok_files,
        "tokenizer_note": note,
    }
    (out_dir / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(info, out_dir))
    log(f"exported {ckpt_path} (step {info['step']}) to {out_dir}: GPT-2 with {config.n_layer} "
        f"layers, {config.n_head} heads, n_embd {config.n_embd}, block {config.block_size}, "
        f"vocab {vocab}" + (f" (our {config.vocab_size} rows minus {config.vocab_size - vocab} "
                            f"padding rows)" if vocab < config.vocab_size else ""))
    if note:
        log(note)
    if verify:
        verify_export(trained.model, out_dir, vocab, tokenizer, log=log)
    return info


def verify_export(ours: GPT, out_dir: Path, vocab: int, tokenizer: str | None,
                  log=print) -> float:
    """Reload ``out_dir`` through transformers and compare with ``ours`` (in eval mode); returns
    the largest logit difference. Raises AssertionError when the export does not compute our
    model."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    config = ours.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (2, min(config.block_size, 64)), generator=gen)

    def max_diff(**kwargs: Any) -> float:
        hf = GPT2LMHeadModel.from_pretrained(out_dir, **kwargs).float().eval()
        with torch.no_grad():
            return (ours(x)[0][..., :vocab] - hf(x).logits).abs().max().item()

    diff = max_diff()
    if not diff <= LOGITS_TOLERANCE:
        if config.scale_attn_by_inverse_layer_idx and max_diff(
                attn_implementation="eager") <= LOGITS_TOLERANCE:
            raise AssertionError(
                f"the export is right, but this transformers' default (SDPA) GPT-2 attention "
                f"ignores scale_attn_by_inverse_layer_idx (huggingface/transformers#44380; logits "
                f"off by {diff:.3g}). Load it with GPT2LMHeadModel.from_pretrained(OUT_DIR, "
                f"attn_implementation='eager'), or upgrade transformers to a release with the fix "
                f"(#44397), then rerun with --no-verify.")
        raise AssertionError(f"the export's logits differ from the checkpoint's by {diff:.3g} "
                             f"(> {LOGITS_TOLERANCE}); the conversion is wrong, please report it.")
    log(f"verified: transformers' logits equal ours (max |diff| {diff:.2g} on {x.numel()} tokens)")
    if tokenizer == "gpt2":
        from data.tokenizers import get_tokenizer

        theirs = AutoTokenizer.from_pretrained(out_dir)(PROBE_TEXT, verbose=False)["input_ids"]
        if theirs != get_tokenizer("gpt2").encode(PROBE_TEXT):
            raise AssertionError("the exported tokenizer encodes differently from ours; please "
                                 "report it.")
        log("verified: AutoTokenizer's ids equal our gpt2 tokenizer's")
    return diff


def model_card(info: dict[str, Any], out_dir: Path) -> str:
    """README.md of the export: what it is, how its vocabulary and biases map, how to load it."""
    c = info["model_config"]
    vocab, rows = info["exported_vocab_size"], info["model_vocab_size"]
    if info["padding_rows_dropped"]:
        vocab_text = (f"The training model's embedding had {rows} rows: the data's "
                      f"{info['data_vocab_size']} token ids padded to a multiple of 64. Only the "
                      f"{vocab} real ids are exported (padding rows are never inputs or targets), so "
                      f"this is a standard {vocab}-token model and its logits equal the training "
                      f"model's on every id; its softmax is over the real ids only.")
    elif info["data_vocab_size"] is not None and vocab > info["data_vocab_size"]:
        vocab_text = (f"All {rows} embedding rows are exported (--keep-padding); only ids below "
                      f"{info['data_vocab_size']} (the data's vocabulary) are real tokens, the "
                      f"rest are padding that training never targeted.")
    else:
        vocab_text = f"All {rows} embedding rows are exported."
    bias_text = ("The run trained without biases (model.bias=false); GPT-2 in transformers always "
                 "has them, so they are exported as zeros, which computes the same function."
                 if info["zero_biases_added"] else "The run trained with biases; they are exported.")
    tok = info["data_tokenizer"]
    if tok == "gpt2":
        tok_text = ("The GPT-2 BPE tokenizer is included (the same vocab.json / merges.txt as "
                    "OpenAI's GPT-2). `split_special_tokens` is on so that the text "
                    "`<|endoftext|>` is encoded as plain text, as the training data was; append "
                    "`tokenizer.eos_token_id` (50256) yourself between documents.")
    else:
        tok_text = info["tokenizer_note"]
    load = (f'tok = AutoTokenizer.from_pretrained("{out_dir}")\n'
            f'ids = tok("Hello", return_tensors="pt").input_ids\n' if tok == "gpt2" else
            'ids = torch.tensor([list("Hello".encode("utf-8"))])\n')
    train_args = preset_overrides(c["n_layer"], c["n_head"], c["n_embd"], c["block_size"])
    train_args += "".join(f" model.{key}=true" for key in ("bias", "scale_attn_by_inverse_layer_idx")
                          if c[key])
    # Some transformers releases drop this scale in their default SDPA attention (eager is right).
    scale_note = ("\n  (with a transformers release affected by huggingface/transformers#44380, load "
                  "with `attn_implementation=\"eager\"`)" if c["scale_attn_by_inverse_layer_idx"]
                  else "")
    return f"""---
library_name: transformers
tags: [gpt2, sophia-bench]
---
# GPT-2 exported from a sophia-bench checkpoint

- source: `{info['source_checkpoint']}` (step {info['step']}, optimizer {info['optimizer']})
- shape: {c['n_layer']} layers, {c['n_head']} heads, n_embd {c['n_embd']}, block size (`n_positions`)
  {c['block_size']}, vocabulary {vocab}
- `scale_attn_by_inverse_layer_idx`: {str(c['scale_attn_by_inverse_layer_idx']).lower()}{scale_note}
- activation `{info['activation_function']}` (GELU, tanh approximation, as trained); LayerNorm eps
  1e-5; dropout {c['dropout']} (inactive in eval mode)
- weights: float32, `model.safetensors`, token embedding tied to the output head

**Vocabulary.** {vocab_text}

**Biases.** {bias_text}

**Tokenizer.** {tok_text}

```python
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel
model = GPT2LMHeadModel.from_pretrained("{out_dir}")
{load}logits = model(ids).logits
```

To continue training it with this harness (on data with the same tokenizer):

    python train.py {train_args} model.init_from={out_dir}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a checkpoint as a Hugging Face transformers GPT-2 directory "
                    "(config.json, model.safetensors, tokenizer for gpt2-tokenizer runs).")
    parser.add_argument("checkpoint", type=Path,
                        help="a ckpt_*.pt file, or a run directory (its newest checkpoint)")
    parser.add_argument("out_dir", type=Path, help="directory to write (new or empty)")
    parser.add_argument("--keep-padding", action="store_true",
                        help="export every embedding row, padding included (logits equal ours on "
                             "every id) instead of the data's real vocabulary")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reloading the export through transformers to compare logits")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out_dir, keep_padding=args.keep_padding,
               verify=not args.no_verify, force=args.force)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except AssertionError as err:
        print(f"error: export check failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
