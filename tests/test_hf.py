"""Hugging Face interop: scripts/export_hf.py -> transformers computes our logits (and, for gpt2 runs,
encodes as our tokenizer); model.init_from starts a run from a transformers GPT-2. Offline, random
weights, nothing downloaded."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# The `hf` extra (in `dev`, so CI has it). Without it, skip this module instead of failing the
# collection of every other one (e.g. `pytest -m gpu` on a bare GPU machine).
pytest.importorskip("safetensors")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from data.loader import TokenLoader
from data.tokenizers import get_tokenizer
from engine.build import build_trainer
from engine.checkpoint import save_checkpoint
from engine.distributed import DistEnv
from engine.errors import HarnessError
from engine.run import run
from model import GPT, PRESETS, GPTConfig
from model.hf import (
    HFConversionError,
    check_hf_config,
    from_hf_state_dict,
    hf_config_dict,
    load_hf_weights,
    to_hf_state_dict,
)
from train_helpers import compose_cfg, load_script, read_metrics, tiny_overrides

export_hf = load_script("export_hf", "export_hf_script")
BYTE_META = {"tokenizer": "byte", "vocab_size": 257, "eot": 256}
GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}
CPU = DistEnv(0, 0, 1, torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A GPT whose every tensor (biases and LayerNorms included) is random and far from its init,
    so that a tensor mapped to the wrong place or left out changes the logits."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def write_checkpoint(model: GPT, directory: Path, data_meta: dict) -> Path:
    """A checkpoint in the engine's format holding ``model`` (what export_hf.py reads)."""
    state = {"step": 7, "model": model.state_dict(), "optimizer": {}, "optimizer_name": "sophia",
             "model_config": model.config.to_dict(), "data_meta": data_meta}
    return save_checkpoint(state, directory, 7, keep_last=0)


def _sdpa_drops_layer_scale() -> bool:
    """Whether this transformers' default (SDPA) GPT-2 attention ignores
    scale_attn_by_inverse_layer_idx (huggingface/transformers#44380, e.g. 4.42; eager is right)."""
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=8, vocab_size=8,
                        scale_attn_by_inverse_layer_idx=True, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    x = torch.arange(8)[None]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for impl in ("eager", "sdpa"):  # chosen when the model is built, in every version
            loaded = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation=impl).eval()
            with torch.no_grad():
                out[impl] = loaded(x).logits
    return not torch.allclose(out["eager"], out["sdpa"], atol=1e-4)


SDPA_DROPS_LAYER_SCALE = _sdpa_drops_layer_scale()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out[0]


# ------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("preset", ["gpt2-nano", "gpt2-micro"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale_attn", [False, True])
def test_export_loads_in_transformers_with_our_logits(preset, bias, scale_attn, tmp_path):
    config = GPTConfig.from_preset(preset, vocab_size=320, bias=bias,
                                   scale_attn_by_inverse_layer_idx=scale_attn)
    ours = random_model(config)
    ckpt = write_checkpoint(ours, tmp_path / "ckpt", BYTE_META)
    info = export_hf.export(ckpt, tmp_path / "hf", verify=False, log=lambda _: None)

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")  # as a user loads it: the defaults
    assert not hf.training and hf.dtype == torch.float32
    c = hf.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size) == (
        config.n_layer, config.n_head, config.n_embd, config.block_size, 257)
    assert c.activation_function == "gelu_pytorch_tanh" and c.layer_norm_epsilon == 1e-5
    assert c.scale_attn_by_inverse_layer_idx == scale_attn and c.eos_token_id == 256
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.0)
    assert info["padding_rows_dropped"] == 63 and info["zero_biases_added"] == (not bias)

    x = torch.randint(0, 257, (3, config.block_size), generator=torch.Generator().manual_seed(1))
    implementations = ["eager", None]
    if scale_attn and SDPA_DROPS_LAYER_SCALE:
        implementations = ["eager"]  # transformers' bug, not ours: the default path is wrong
    for impl in implementations:
        model = hf if impl is None else GPT2LMHeadModel.from_pretrained(
            tmp_path / "hf", attn_implementation=impl)
        diff = (logits(model, x) - logits(ours, x)[..., :257]).abs().max().item()
        assert diff <= 1e-5, (impl, diff)

    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied: from_pretrained re-ties it to the embedding
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    biases = [v for k, v in saved.items() if k.endswith(".bias")]
    assert len(biases) == 6 * config.n_layer + 1
    assert all(torch.count_nonzero(b) == 0 for b in biases) == (not bias)


def test_keep_padding_exports_every_row_and_matches_every_logit(tmp_path):
    config = GPTConfig.from_preset("gpt2-nano", vocab_size=320)
    ours = random_model(config, seed=3)
    ckpt = write_checkpoint(ours, tmp_path / "ckpt", BYTE_META)
    info = export_hf.export(ckpt, tmp_path / "hf", keep_padding=True, verify=False,
                            log=lambda _: None)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert hf.config.vocab_size == 320 and info["padding_rows_dropped"] == 0
    x = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(2))
    assert (logits(hf, x) - logits(ours, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_maps_onto_transformers_gpt2_without_allocating(preset):
    """Shapes of every tensor, on the meta device: the big presets cost no memory."""
    config = GPTConfig.from_preset(preset)  # vocab 50304, block 1024 unless the preset sets it
    kwargs = hf_config_dict(config, vocab_size=50257, eot=50256)
    hf_config = GPT2Config(**kwargs)
    assert hf_config.n_positions == config.block_size and hf_config.vocab_size == 50257
    with torch.device("meta"):
        ours = GPT(config)
        hf = GPT2LMHeadModel(hf_config)
    theirs = {k: v.shape for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    mapped = {k: v.shape for k, v in to_hf_state_dict(ours.state_dict(), config, 50257).items()}
    assert mapped == theirs
    # HF counts every bias we do not have, and 47 fewer embedding rows.
    # Per block: ln_1, ln_2 (C each), c_attn (3C), attn.c_proj (C), c_fc (4C), mlp.c_proj (C);
    # then ln_f (C).
    n_bias = (config.n_layer * (2 + 3 + 1 + 4 + 1) + 1) * config.n_embd
    assert hf.num_parameters() == ours.num_params(non_embedding=False) + n_bias - 47 * config.n_embd
    check_hf_config(hf_config.to_dict(), config, data_vocab=50257)


# The shapes of OpenAI's four GPT-2 checkpoints on the Hugging Face hub (their config.json).
OPENAI = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
          "gpt2-xl": (48, 25, 1600)}


@pytest.mark.parametrize("hub_id", sorted(OPENAI))
def test_openai_gpt2_configs_are_checked_against_the_run_and_the_right_preset_is_named(hub_id):
    n_layer, n_head, n_embd = OPENAI[hub_id]
    hf = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024,
                    vocab_size=50257, activation_function="gelu_new").to_dict()
    preset = "gpt2-small" if hub_id == "gpt2" else hub_id
    check_hf_config(hf, GPTConfig.from_preset(preset, bias=True), data_vocab=50257)
    other = "gpt2-xl" if preset == "gpt2-small" else "gpt2-small"
    with pytest.raises(HFConversionError, match=rf"n_layer {n_layer} \(checkpoint\) vs .*use "
                                                rf"model={preset}\b"):
        check_hf_config(hf, GPTConfig.from_preset(other, bias=True))


def test_gpt2_tokenizer_run_exports_a_tokenizer_that_encodes_as_ours(tmp_path, capsys):
    config = GPTConfig.from_preset("gpt2-nano", vocab_size=50304)
    ours = random_model(config)
    ckpt = write_checkpoint(ours, tmp_path / "ckpt", GPT2_META)
    # Through the command line, with its own check (logits and tokenizer) on.
    assert export_hf.main([str(ckpt), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "verified: transformers' logits equal ours" in out
    assert "verified: AutoTokenizer's ids equal our gpt2 tokenizer's" in out
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    gpt2 = get_tokenizer("gpt2")
    texts = ["Hello world", " leading space", "multiple   spaces\tand\ttabs\n\n\nnewlines\r\n",
             "naïve café résumé Ünïcödé", "日本語 中文 한국어", "emoji 🤗🚀👍🏽 and ZWJ 👨‍👩‍👧",
             "numbers 0 12 345 6789 3.14159 -2e-5 1,000,000", "code: def f(x):\n    return x**2",
             "don't can't I'll we've they're", "<|endoftext|> is plain text here", "", " ",
             "trailing spaces   ", "ÀÁÂÃÄÅ\u0301\u200b\ufeff", "a" * 300]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == gpt2.encode(text), text
        assert tok.decode(ids) == gpt2.decode(ids)
    assert tok.eos_token_id == gpt2.eot == 50256
    assert tok.model_max_length == config.block_size

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert hf.config.vocab_size == 50257 and hf.config.eos_token_id == 50256
    x = torch.tensor([gpt2.encode("The quick brown fox jumps over the lazy dog")])
    assert (logits(hf, x) - logits(ours, x)[..., :50257]).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def byte_run(tiny_data, tmp_path_factory) -> Path:
    """A real 2-step gpt2-nano run on the byte-tokenized corpus (its run dir)."""
    run_dir = tmp_path_factory.mktemp("byte_run")
    run(compose_cfg(tiny_overrides(tiny_data, "adamw", **{
        "train.max_steps": 2, "train.eval_interval": 0, "checkpoint.interval": 2})), run_dir)
    return run_dir


def test_byte_tokenizer_run_exports_no_tokenizer_and_says_why(byte_run, tmp_path, capsys):
    out_dir = tmp_path / "hf"
    assert export_hf.main([str(byte_run), str(out_dir)]) == 0  # a run dir: its newest checkpoint
    out = capsys.readouterr().out
    assert "No Hugging Face tokenizer: this run used the byte tokenizer" in out
    assert "verified: transformers' logits equal ours" in out
    names = {p.name for p in out_dir.iterdir()}
    assert names == {"config.json", "model.safetensors", "README.md", "export_info.json"}
    info = json.loads((out_dir / "export_info.json").read_text())
    assert info["tokenizer_files"] == []  # no tokenizer, but a note saying how ids map to text
    assert "UTF-8" in info["tokenizer_note"] and info["step"] == 2
    assert info["exported_vocab_size"] == 257 and info["model_vocab_size"] == 320
    assert "No Hugging Face tokenizer" in (out_dir / "README.md").read_text()


def test_export_refuses_a_non_empty_out_dir_and_a_missing_checkpoint(byte_run, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert export_hf.main([str(byte_run), str(tmp_path / "busy")]) == 2
    assert "--force" in capsys.readouterr().err
    assert export_hf.main([str(tmp_path), str(tmp_path / "hf")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ import


def random_hf(tmp_path: Path, **config) -> tuple[Path, GPT2LMHeadModel]:
    """A random transformers GPT-2 saved with save_pretrained; biases and LayerNorms random too."""
    kwargs = dict(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=320,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                  eos_token_id=None)
    torch.manual_seed(5)
    hf = GPT2LMHeadModel(GPT2Config(**{**kwargs, **config})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    # The reference computes with eager attention: some transformers releases' SDPA path ignores
    # scale_attn_by_inverse_layer_idx (see _sdpa_drops_layer_scale).
    return tmp_path / "hf", GPT2LMHeadModel.from_pretrained(tmp_path / "hf",
                                                            attn_implementation="eager").eval()


def test_init_from_starts_a_run_from_transformers_weights(tiny_data, tmp_path):
    """The step-0 validation loss of a run with model.init_from equals the transformers model's
    loss on the same batches: far from a fresh init's ln(320), so only the loaded weights match."""
    path, hf = random_hf(tmp_path, scale_attn_by_inverse_layer_idx=True)
    overrides = {"model.init_from": path, "model.bias": True,
                 "model.scale_attn_by_inverse_layer_idx": True, "train.max_steps": 1}
    cfg = compose_cfg(tiny_overrides(tiny_data, "sophia", **overrides))
    run(cfg, tmp_path / "run")
    step0 = read_metrics(tmp_path / "run")[0]
    assert step0["step"] == 0

    val = TokenLoader(tiny_data, "val", 32, seed=cfg.seed, device=torch.device("cpu"))
    losses = []
    for i in range(cfg.train.eval_batches):
        x, y = val.get(i, 0, cfg.train.micro_batch_size, stream="val")
        losses.append(F.cross_entropy(logits(hf, x).flatten(0, 1), y.flatten()).item())
    expected = sum(losses) / len(losses)
    assert abs(expected - math.log(320)) > 0.5
    assert step0["val/loss"] == pytest.approx(expected, abs=1e-5)


def test_init_from_loads_every_weight_and_fills_padding_rows_with_the_mean(tiny_data, tmp_path):
    path, hf = random_hf(tmp_path, vocab_size=300)  # < our padded 320, >= the data's 257
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{
        "model.init_from": path, "model.bias": True}))
    model = build_trainer(cfg, tmp_path / "run", CPU).raw_model
    ours = model.state_dict()
    theirs = hf.state_dict()
    for key, value in theirs.items():
        if key in ("transformer.wte.weight", "lm_head.weight"):
            continue
        transpose = key.endswith(".weight") and any(m in key for m in ("c_attn", "c_proj", "c_fc"))
        assert torch.equal(ours[key], value.t() if transpose else value), key
    wte = ours["transformer.wte.weight"]
    assert torch.equal(wte[:300], theirs["transformer.wte.weight"])
    assert torch.allclose(wte[300:], theirs["transformer.wte.weight"].mean(0).expand(20, -1))
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    assert (logits(model.eval(), x)[..., :300] - logits(hf, x)).abs().max().item() <= 1e-5


def test_a_mismatched_transformers_model_is_refused_naming_the_field(tiny_data, tmp_path):
    path, _ = random_hf(tmp_path, n_layer=3)
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"model.init_from": path,
                                                            "model.bias": True}))
    with pytest.raises(HarnessError, match=r"n_layer 3 \(checkpoint\) vs 2 \(run\).*"
                                           r"model\.n_layer=3 model\.n_head=2"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,message", [
    (dict(n_layer=4, n_head=4, n_embd=128), r"use model=gpt2-micro model\.block_size=32"),
    (dict(n_positions=64), r"block_size \(n_positions\) 64 \(checkpoint\) vs 32 \(run\)"),
    (dict(vocab_size=512), r"vocab_size 512 \(checkpoint\) > 320 \(run\): set model\.vocab_size=512"),
    (dict(vocab_size=200), r"vocab_size 200 \(checkpoint\) < the data's 257 token ids"),
    (dict(scale_attn_by_inverse_layer_idx=True), r"model\.scale_attn_by_inverse_layer_idx=true"),
    (dict(activation_function="gelu"), r"activation_function 'gelu'"),
    (dict(layer_norm_epsilon=1e-6), r"layer_norm_epsilon 1e-06"),
])
def test_each_config_mismatch_is_named(change, message, tiny_data, tmp_path):
    path, _ = random_hf(tmp_path, **change)
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"model.init_from": path,
                                                            "model.bias": True}))
    with pytest.raises(HarnessError, match=message):
        build_trainer(cfg, tmp_path / "run", CPU)


def test_biases_into_a_bias_free_model_are_refused_unless_zero(tiny_data, tmp_path):
    path, _ = random_hf(tmp_path)
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"model.init_from": path}))
    with pytest.raises(HarnessError, match=r"non-zero biases .* set model\.bias=true"):
        build_trainer(cfg, tmp_path / "run", CPU)


def test_a_wrong_tensor_shape_or_a_bad_source_is_a_clear_error(tmp_path):
    config = GPTConfig.from_preset("gpt2-nano", vocab_size=320, bias=True)
    state = to_hf_state_dict(random_model(config).state_dict(), config)
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 200)
    with pytest.raises(HFConversionError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight has shape "
                                                r"\(64, 200\), this run's model needs \(64, 256\)"):
        from_hf_state_dict(state, config)
    model = GPT(config)
    with pytest.raises(HFConversionError, match="cannot read a Hugging Face config"):
        load_hf_weights(model, str(tmp_path / "missing"))
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(HFConversionError, match=r"is a file.*checkpoint\.resume="):
        load_hf_weights(model, str(tmp_path / "ckpt.pt"))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("keep_padding", [False, True])
def test_export_then_import_round_trip_gives_identical_logits(bias, keep_padding, tmp_path):
    config = GPTConfig.from_preset("gpt2-micro", vocab_size=320, bias=bias,
                                   scale_attn_by_inverse_layer_idx=True)
    ours = random_model(config, seed=11)
    ckpt = write_checkpoint(ours, tmp_path / "ckpt", BYTE_META)
    export_hf.export(ckpt, tmp_path / "hf", keep_padding=keep_padding, verify=False,
                     log=lambda _: None)
    assert AutoConfig.from_pretrained(tmp_path / "hf").vocab_size == (320 if keep_padding else 257)
    back = GPT(config)
    info = load_hf_weights(back, str(tmp_path / "hf"), data_vocab=257)
    assert info["padding_rows"] == (0 if keep_padding else 63)
    x = torch.randint(0, 257, (2, 128), generator=torch.Generator().manual_seed(4))
    assert torch.equal(logits(back.eval(), x)[..., :257], logits(ours, x)[..., :257])
    if keep_padding:  # every tensor, padding rows included, comes back bit for bit
        for key, value in ours.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key


def test_a_resumed_run_ignores_init_from(tiny_data, tmp_path, capsys):
    """The run's own checkpoint wins; the HF directory is not even needed any more."""
    path, _ = random_hf(tmp_path)
    overrides = {"model.init_from": path, "model.bias": True, "train.max_steps": 4,
                 "train.stop_at_step": 2, "checkpoint.interval": 2, "train.eval_interval": 0}
    run(compose_cfg(tiny_overrides(tiny_data, "adamw", **overrides)), tmp_path / "run")
    for f in path.iterdir():
        f.unlink()
    capsys.readouterr()
    resumed = {**overrides, "train.stop_at_step": "null", "checkpoint.resume": "auto"}
    summary = run(compose_cfg(tiny_overrides(tiny_data, "adamw", **resumed)), tmp_path / "run")
    assert summary["step"] == 4
    assert f"model.init_from={path} not loaded: the run resumes from" in capsys.readouterr().out
