"""Our GPT <-> Hugging Face ``transformers`` GPT-2 (``GPT2LMHeadModel``): configs, weights, tokenizer files.

The two models compute the same function; only the storage differs, and each difference is
handled exactly:

- **Conv1D.** HF's GPT-2 keeps its four projection matrices (``attn.c_attn``, ``attn.c_proj``,
  ``mlp.c_fc``, ``mlp.c_proj``) as ``Conv1D`` weights of shape ``[in, out]``; ours are
  ``nn.Linear`` weights ``[out, in]``. They are transposed both ways; nothing else is.
- **Biases.** HF's GPT-2 always has biases (projections and LayerNorms). Our default
  ``bias=False`` model has none, which is the same function as all-zero biases (adding 0.0 is
  exact in floating point), so the export writes zeros. The import into a ``bias=False`` model
  accepts only all-zero biases and otherwise names the tensor and asks for ``model.bias=true``.
- **Vocabulary padding.** Our embedding has ``vocab_size`` rows padded to a multiple of 64 (50304
  for GPT-2's 50257). :func:`to_hf_state_dict` keeps the first ``vocab_size`` rows you ask for:
  the data's true vocabulary by default in ``scripts/export_hf.py``, so the export is a standard
  GPT-2 whose logits equal ours on every real token id (padding rows are never targets and never
  inputs, so they carry nothing; HF's softmax is then over the real ids only). On import
  (:func:`from_hf_state_dict`) the extra rows of our padded embedding are set to the *mean* of the
  imported rows: their logit is then the mean of the real logits, so by Jensen's inequality they
  take at most ``(V - V_hf) / V_hf`` of the probability mass (< 0.1% for 47 rows over 50257):
  the imported model's loss is within ``log(1 + 47/50257) < 0.001`` nats of the original's. Zeros
  or a fresh N(0, 0.02) init would give those rows a logit near 0, which can outweigh every real
  token of a trained GPT-2 (whose logits are typically large and negative).
- **Tied head.** Both tie ``lm_head.weight`` to ``transformer.wte.weight``; the export writes the
  embedding once, as ``save_pretrained`` does, and ``from_pretrained`` re-ties it.
- **Activation.** Ours is ``nn.GELU(approximate="tanh")``, which is HF's ``gelu_pytorch_tanh``
  (the same kernel); ``gelu_new`` and ``gelu_fast`` are the same formula written in Python and are
  accepted on import.
- **Rest.** LayerNorm eps 1e-5 (torch's default, which ours uses), attention scaled by
  ``1/sqrt(head_dim)`` (``scale_attn_weights``), optionally by ``1/(layer_idx + 1)``
  (``scale_attn_by_inverse_layer_idx``, the same name in both), ``n_positions = block_size``,
  ``n_inner = 4 * n_embd``.

``transformers`` and ``safetensors`` are optional dependencies (``pip install -e '.[hf]'``), imported
only inside the functions that need them. This module imports neither ``data`` nor ``engine``;
problems are ``ValueError`` (:class:`HFConversionError`) naming the value and the fix.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, GPTConfig

# Our modules whose weight HF stores transposed (Conv1D), with (input, output) widths in n_embd.
_CONV1D = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}
_LAYER_NORMS = ("ln_1", "ln_2")
# Every HF activation name that is GELU's tanh approximation, the function our MLP computes.
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by every LayerNorm of model.gpt
GPT2_VOCAB = 50257  # the GPT-2 BPE vocabulary (tiktoken "gpt2", HF "gpt2")
_INSTALL = "pip install -e '.[hf]' (or: pip install 'transformers>=4.42' safetensors)"


class HFConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the value and the fix."""


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise HFConversionError(f"This needs the optional package {module!r}: {_INSTALL}.") from err


# --------------------------------------------------------------------------------------- configs


def hf_config_dict(config: GPTConfig, vocab_size: int | None = None,
                   eot: int | None = None) -> dict[str, Any]:
    """The ``transformers.GPT2Config`` keyword arguments of the model ``config`` describes.

    ``vocab_size`` (default ``config.vocab_size``) is the number of embedding rows exported; it may
    be smaller than ours to drop the padding rows. ``eot`` (the data's end-of-text id) becomes
    ``bos_token_id`` / ``eos_token_id``; None leaves them unset. Pure: imports nothing and
    allocates nothing, so the largest presets can be checked anywhere.
    """
    vocab = config.vocab_size if vocab_size is None else int(vocab_size)
    if not 0 < vocab <= config.vocab_size:
        raise HFConversionError(
            f"vocab_size={vocab} must be in [1, {config.vocab_size}] (the model's embedding rows); "
            f"pass the data's vocabulary (e.g. 50257 for GPT-2 BPE) or None to keep every row.")
    if eot is not None and not 0 <= eot < vocab:
        raise HFConversionError(f"eot={eot} is not a token id of a {vocab}-token vocabulary; pass "
                                f"the data's end-of-text id (50256 for GPT-2 BPE, 256 for bytes).")
    return dict(
        architectures=["GPT2LMHeadModel"],
        vocab_size=vocab,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=4 * config.n_embd,
        activation_function="gelu_pytorch_tanh",  # = nn.GELU(approximate="tanh"), our MLP's
        # Dropout only acts in train mode (from_pretrained returns eval mode); carrying the run's
        # value keeps a fine-tune in transformers regularised as the run was (0.0 by default).
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        initializer_range=0.02,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
    )


def preset_overrides(n_layer: int, n_head: int, n_embd: int, block_size: int) -> str:
    """The ``model=...`` overrides that give this shape: a preset name (plus ``model.block_size``
    when it differs from the preset's), or the four shape keys when no preset has it."""
    for name, shape in PRESETS.items():
        if (shape["n_layer"], shape["n_head"], shape["n_embd"]) == (n_layer, n_head, n_embd):
            default_block = shape.get("block_size", GPTConfig.block_size)
            return f"model={name}" + ("" if default_block == block_size
                                      else f" model.block_size={block_size}")
    return (f"model.n_layer={n_layer} model.n_head={n_head} model.n_embd={n_embd} "
            f"model.block_size={block_size}")


def check_hf_config(hf: Mapping[str, Any], config: GPTConfig, *, data_vocab: int | None = None,
                    source: str = "the checkpoint") -> None:
    """Refuse an HF GPT-2 config (``GPT2Config.to_dict()``) whose model is not ``config``'s.

    Shapes and attention options must match exactly; the checkpoint's vocabulary may be smaller
    than ours (padding rows, see the module docstring) but must cover the data's ``data_vocab``
    ids. Raises :class:`HFConversionError` listing every mismatch and the settings that fit.
    """
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise HFConversionError(
            f"{source} is a {model_type!r} model, not GPT-2 (model_type 'gpt2'); init_from takes "
            f"a GPT-2 checkpoint such as gpt2, gpt2-medium or a directory written by "
            f"scripts/export_hf.py.")
    g = hf.get
    problems: list[str] = []
    shape = {k: g(k) for k in ("n_layer", "n_head", "n_embd")}
    shape["block_size"] = g("n_positions")
    ours = {k: getattr(config, k) for k in shape}
    wrong = [k for k in shape if shape[k] != ours[k]]
    if wrong:
        fix = preset_overrides(shape["n_layer"], shape["n_head"], shape["n_embd"], shape["block_size"])
        names = {"block_size": "block_size (n_positions)"}
        problems.append(
            ", ".join(f"{names.get(k, k)} {shape[k]} (checkpoint) vs {ours[k]} (run)" for k in wrong)
            + f": use {fix} (train.block_size may stay shorter to train on shorter sequences)")
    vocab = g("vocab_size")
    if vocab > config.vocab_size:
        padded = -(-vocab // 64) * 64
        problems.append(f"vocab_size {vocab} (checkpoint) > {config.vocab_size} (run): set "
                        f"model.vocab_size={padded} (the checkpoint's, padded to a multiple of 64)")
    if data_vocab is not None and vocab < data_vocab:
        problems.append(
            f"vocab_size {vocab} (checkpoint) < the data's {data_vocab} token ids: ids >= {vocab} "
            f"would have no trained embedding; use data tokenized as the checkpoint was "
            f"(GPT-2 checkpoints: data.tokenizer=gpt2, {GPT2_VOCAB} ids)")
    if bool(g("scale_attn_by_inverse_layer_idx", False)) != config.scale_attn_by_inverse_layer_idx:
        value = bool(g("scale_attn_by_inverse_layer_idx", False))
        problems.append(f"scale_attn_by_inverse_layer_idx {value} (checkpoint) vs "
                        f"{config.scale_attn_by_inverse_layer_idx} (run): set "
                        f"model.scale_attn_by_inverse_layer_idx={str(value).lower()}")
    if not g("scale_attn_weights", True):
        problems.append("scale_attn_weights false: our attention always scales by 1/sqrt(head_dim)")
    if g("n_inner") not in (None, 4 * config.n_embd):
        problems.append(f"n_inner {g('n_inner')}: our MLP is 4 * n_embd = {4 * config.n_embd} wide")
    if g("activation_function", "gelu_new") not in TANH_GELUS:
        problems.append(f"activation_function {g('activation_function')!r}: our MLP computes GELU's "
                        f"tanh approximation (one of {', '.join(TANH_GELUS)})")
    eps = g("layer_norm_epsilon", LAYER_NORM_EPS)
    if not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon {eps}: our LayerNorms use {LAYER_NORM_EPS}")
    if g("add_cross_attention", False):
        problems.append("add_cross_attention true: our GPT has no cross-attention")
    if problems:
        raise HFConversionError(f"{source} does not fit this run's model: " + "; ".join(problems)
                                + ".")


# --------------------------------------------------------------------------------------- weights


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: GPTConfig,
                     vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (``GPT.state_dict()``, a checkpoint's ``"model"``) in HF GPT-2 names and layout.

    Projection weights are transposed to Conv1D's ``[in, out]``; a ``bias=False`` model gets
    all-zero biases (the same function); the embedding keeps its first ``vocab_size`` rows (default
    all); ``lm_head.weight`` is left out because HF ties it to ``transformer.wte.weight``. Works on
    meta tensors too. Every tensor is contiguous and owns its storage, as safetensors requires.
    """
    vocab = hf_config_dict(config, vocab_size)["vocab_size"]
    missing = [k for k in _our_keys(config) if k not in state]
    if missing:
        raise HFConversionError(
            f"the state dict lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}: it is not a "
            f"GPT state dict for this config ({config}); pass a checkpoint's 'model' entry.")
    C = config.n_embd
    like = state["transformer.wpe.weight"]

    def bias(key: str, width: int) -> torch.Tensor:
        if key in state:
            return state[key]
        return torch.zeros(width, dtype=like.dtype, device=like.device)

    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": state["transformer.wte.weight"][:vocab],
        "transformer.wpe.weight": state["transformer.wpe.weight"],
    }
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        for ln in _LAYER_NORMS:
            out[p + ln + ".weight"] = state[p + ln + ".weight"]
            out[p + ln + ".bias"] = bias(p + ln + ".bias", C)
        for name, (_, n_out) in _CONV1D.items():
            out[p + name + ".weight"] = state[p + name + ".weight"].t()
            out[p + name + ".bias"] = bias(p + name + ".bias", n_out * C)
    out["transformer.ln_f.weight"] = state["transformer.ln_f.weight"]
    out["transformer.ln_f.bias"] = bias("transformer.ln_f.bias", C)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _our_keys(config: GPTConfig) -> list[str]:
    keys = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"]
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        keys += [p + ln + ".weight" for ln in _LAYER_NORMS]
        keys += [p + name + ".weight" for name in _CONV1D]
    return keys


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], config: GPTConfig, *,
                       source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """An HF ``GPT2LMHeadModel`` state dict as ours, ready for ``GPT(config).load_state_dict``.

    The HF vocabulary may be smaller than ``config.vocab_size``: the extra (padding) rows are set to
    the mean of the imported rows (see the module docstring for why not zeros). Into a
    ``bias=False`` model only all-zero biases load; an untied head that differs from the embedding
    is refused (ours is tied). Shape mismatches raise :class:`HFConversionError` naming the tensor.
    """
    state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}  # GPT2Model has none
    C, L = config.n_embd, config.n_layer

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in state:
            raise HFConversionError(f"{source} has no tensor transformer.{key}: it is not a GPT-2 "
                                    f"LM checkpoint with {L} layers.")
        t = state[key]
        if tuple(t.shape) != shape:
            raise HFConversionError(f"{source}: transformer.{key} has shape {tuple(t.shape)}, this "
                                    f"run's model needs {shape}; check the model settings "
                                    f"(model.n_layer/n_head/n_embd/block_size/vocab_size).")
        return t.detach().float()

    def bias(key: str, width: int, ours: str) -> dict[str, torch.Tensor]:
        t = take(key, (width,))
        if config.bias:
            return {ours: t}
        if torch.count_nonzero(t):
            raise HFConversionError(
                f"{source} has non-zero biases (transformer.{key}, max |b| = "
                f"{t.abs().max().item():.3g}) but this run's model has none (model.bias=false); "
                f"set model.bias=true to load them (OpenAI's GPT-2 checkpoints need it).")
        return {}

    # The one tensor whose first dimension may be smaller than ours (vocabulary padding).
    vocab = state["wte.weight"].shape[0] if "wte.weight" in state else config.vocab_size
    wte = take("wte.weight", (min(vocab, config.vocab_size), C))
    head = hf_state.get("lm_head.weight")
    if head is not None and not torch.equal(head.detach().float(), wte):
        raise HFConversionError(
            f"{source} has an lm_head.weight that differs from its token embedding (an untied "
            f"head); our GPT ties the two, so it cannot hold this checkpoint.")
    if vocab < config.vocab_size:
        pad = wte.mean(dim=0, keepdim=True).expand(config.vocab_size - vocab, C)
        wte = torch.cat([wte, pad])
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": wte,
        "lm_head.weight": wte,
        "transformer.wpe.weight": take("wpe.weight", (config.block_size, C)),
        "transformer.ln_f.weight": take("ln_f.weight", (C,)),
        **bias("ln_f.bias", C, "transformer.ln_f.bias"),
    }
    for i in range(L):
        p = f"h.{i}."
        for ln in _LAYER_NORMS:
            out[f"transformer.{p}{ln}.weight"] = take(f"{p}{ln}.weight", (C,))
            out.update(bias(f"{p}{ln}.bias", C, f"transformer.{p}{ln}.bias"))
        for name, (n_in, n_out) in _CONV1D.items():
            n_in, n_out = n_in * C, n_out * C
            out[f"transformer.{p}{name}.weight"] = take(f"{p}{name}.weight", (n_in, n_out)).t()
            out.update(bias(f"{p}{name}.bias", n_out, f"transformer.{p}{name}.bias"))
    extra = sorted(k for k in state if k.startswith("h.") and int(k.split(".")[1]) >= L)
    if extra:
        raise HFConversionError(f"{source} has more than {L} layers ({extra[0]}); set model.n_layer "
                                f"to the checkpoint's layer count.")
    return out


def load_hf_weights(model: torch.nn.Module, source: str, *, data_vocab: int | None = None
                    ) -> dict[str, Any]:
    """Load a Hugging Face GPT-2 (a local directory, or a hub id such as ``gpt2-medium`` when the
    network or the HF cache has it) into our ``model`` (a :class:`model.gpt.GPT`), in place.

    The config is checked first (:func:`check_hf_config`), so a wrong preset is named before any
    weight is read. Returns what was done: ``source``, ``hf_vocab_size``, ``padding_rows``,
    ``tensors``.
    """
    config: GPTConfig = model.config
    if Path(source).is_file():
        raise HFConversionError(
            f"model.init_from={source} is a file; it takes a Hugging Face model directory "
            f"(config.json + model.safetensors) or a hub id. To continue a run of this harness use "
            f"checkpoint.resume={source}, or export it first with scripts/export_hf.py.")
    _require("transformers")
    from transformers import AutoConfig, GPT2LMHeadModel

    try:
        hf_config = AutoConfig.from_pretrained(source)
    except Exception as err:  # OSError (not found / offline), ValueError (not a model dir), ...
        raise HFConversionError(
            f"model.init_from={source}: cannot read a Hugging Face config ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}). Pass a local "
            f"directory holding config.json and the weights, or a hub id (gpt2, gpt2-medium, "
            f"...) with network access or in the local HF cache.") from err
    check_hf_config(hf_config.to_dict(), config, data_vocab=data_vocab,
                    source=f"model.init_from={source}")
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(source)
    except Exception as err:
        raise HFConversionError(f"model.init_from={source}: cannot load its weights "
                                f"({type(err).__name__}: {err}).") from err
    hf_state = hf_model.state_dict()
    ours = from_hf_state_dict(hf_state, config, source=f"model.init_from={source}")
    with torch.no_grad():
        model.load_state_dict(ours, strict=True)
    hf_vocab = int(hf_config.vocab_size)
    return {"source": source, "hf_vocab_size": hf_vocab,
            "padding_rows": config.vocab_size - hf_vocab, "tensors": len(ours)}


def save_hf(state: Mapping[str, torch.Tensor], config: GPTConfig, out_dir: str | Path, *,
            vocab_size: int | None = None, eot: int | None = None) -> dict[str, Any]:
    """Write ``config.json`` and ``model.safetensors`` (float32) of our weights ``state`` to
    ``out_dir``: a directory ``transformers.GPT2LMHeadModel.from_pretrained`` loads. Returns the
    config dict written."""
    _require("transformers")
    _require("safetensors")
    from safetensors.torch import save_file
    from transformers import GPT2Config

    kwargs = hf_config_dict(config, vocab_size, eot)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().cpu() for k, v in to_hf_state_dict(state, config,
                                                               kwargs["vocab_size"]).items()}
    # "format": "pt" is what transformers looks for in safetensors metadata before loading.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    GPT2Config(**kwargs).save_pretrained(out)
    return kwargs


# ------------------------------------------------------------------------------------- tokenizer


def find_gpt2_bpe_files(cache_dir: str | Path) -> tuple[Path, Path]:
    """``(encoder.json, vocab.bpe)`` of GPT-2's BPE in tiktoken's cache folder ``cache_dir``.

    tiktoken stores them under hashed names, so they are recognised by content: the merges file
    starts with ``#version``; the encoder is a JSON object of 50257 entries mapping
    ``<|endoftext|>`` to 50256. These are the files HF's GPT-2 tokenizer calls ``vocab.json`` and
    ``merges.txt``. Raises :class:`HFConversionError` when either is absent.
    """
    cache = Path(cache_dir)
    encoder = merges = None
    for path in sorted(cache.iterdir()) if cache.is_dir() else []:
        if not path.is_file() or path.stat().st_size > 8_000_000:
            continue
        with open(path, "rb") as f:
            head = f.read(16)
        if merges is None and head.startswith(b"#version"):
            merges = path
        elif encoder is None and head.startswith(b"{"):
            try:
                table = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            if (isinstance(table, dict) and len(table) == GPT2_VOCAB
                    and table.get("<|endoftext|>") == GPT2_VOCAB - 1):
                encoder = path
    if encoder is None or merges is None:
        lacking = " and ".join(n for n, p in (("encoder.json", encoder), ("vocab.bpe", merges))
                               if p is None)
        raise HFConversionError(
            f"GPT-2's {lacking} not found in the tiktoken cache {cache}. Load the gpt2 tokenizer "
            f"once with network access (it caches them), or set TIKTOKEN_CACHE_DIR to the folder "
            f"that holds them.")
    return encoder, merges


def save_gpt2_tokenizer(out_dir: str | Path, cache_dir: str | Path,
                        model_max_length: int) -> list[str]:
    """Write GPT-2's tokenizer to ``out_dir`` so ``AutoTokenizer.from_pretrained`` encodes as our
    ``gpt2`` tokenizer (tiktoken's ``encode_ordinary``): the BPE files from tiktoken's cache as
    ``vocab.json`` / ``merges.txt``, their ``tokenizer.json`` and a ``tokenizer_config.json``.

    ``split_special_tokens`` is on because ours encodes the text ``<|endoftext|>`` as plain text
    (the end-of-text id 50256 only ever comes between documents); append
    ``tokenizer.eos_token_id`` yourself where you want one. Returns the file names written.
    """
    _require("transformers")
    from transformers import AutoTokenizer

    encoder, merges = find_gpt2_bpe_files(cache_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(encoder, out / "vocab.json")
    shutil.copyfile(merges, out / "merges.txt")
    eot = "<|endoftext|>"
    settings = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                "add_bos_token": False, "bos_token": eot, "eos_token": eot, "unk_token": eot,
                "errors": "replace", "model_max_length": int(model_max_length),
                "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    # tokenizer.json (the fast tokenizer's single file) is what most other tools read; build it
    # from the two files rather than by hand, and keep our tokenizer_config.json.
    tok = AutoTokenizer.from_pretrained(out)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    return ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]
