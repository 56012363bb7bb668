"""GPT-2 model: shapes, parameter counts, causality, training sanity, tying, sampling, FLOPs."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, PRESETS, GPTConfig, device_peak_flops, flops_per_token, math_attention
from model.flops import count_params, estimate_mfu, scaling_params


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16), **overrides})


def build(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


# --- configuration -----------------------------------------------------------------------------


def test_config_defaults_match_gpt2():
    c = GPTConfig()
    assert (c.block_size, c.vocab_size, c.dropout, c.bias) == (1024, 50304, 0.0, False)
    assert c.scale_attn_by_inverse_layer_idx is False


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(n_embd=100, n_head=12), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(block_size=2.5), "block_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        GPTConfig(**kwargs)


def test_from_preset_overrides_and_errors():
    c = GPTConfig.from_preset("gpt2-nano", vocab_size=257)
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size) == (2, 2, 64, 257)
    assert GPTConfig.from_preset("gpt2-medium", block_size=256).block_size == 256
    with pytest.raises(ValueError) as err:
        GPTConfig.from_preset("gpt3")
    for name in PRESETS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_preset("gpt2-small", n_layers=3)


def test_config_dict_round_trip():
    c = GPTConfig.from_preset("gpt2-micro", vocab_size=257, scale_attn_by_inverse_layer_idx=True)
    assert GPTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="bogus"):
        GPTConfig.from_dict({**c.to_dict(), "bogus": 1})


# --- parameter counts --------------------------------------------------------------------------

# Hugging Face's GPT2Model counts (vocab 50257, block 1024, biases on), all parameters, tied
# wte/lm_head once: the "124M / 355M / 774M / 1.5B" of the GPT-2 release. With bias=True and
# vocab 50257 our model must reproduce them exactly.
HF_COUNTS = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_gpt2_param_counts(name):
    hf = GPTConfig.from_preset(name, vocab_size=50257, bias=True)
    with torch.device("meta"):  # nothing is allocated, even for 1.5B parameters
        model = GPT(hf)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == HF_COUNTS[name]  # the tensors themselves
    assert model.num_params(non_embedding=False) == HF_COUNTS[name]
    # nanoGPT's printed "non-embedding" number subtracts the position table only.
    assert model.num_params() == HF_COUNTS[name] - hf.block_size * hf.n_embd
    assert count_params(hf, non_embedding=False) == HF_COUNTS[name]

    # The project's default shape (vocab padded to 50304, no biases) stays within 0.5%.
    default = GPTConfig.from_preset(name)
    with torch.device("meta"):
        model = GPT(default)
    n = model.num_params(non_embedding=False)
    assert abs(n - HF_COUNTS[name]) / HF_COUNTS[name] < 0.005
    assert count_params(default, non_embedding=True) == model.num_params(non_embedding=True)


def test_param_count_formula_matches_small_models():
    for cfg in (tiny_config(), tiny_config(bias=True), GPTConfig.from_preset("gpt2-micro", vocab_size=257)):
        model = GPT(cfg)
        tensors = sum(p.numel() for p in model.parameters())  # the tied matrix once
        assert count_params(cfg, non_embedding=False) == model.num_params(False) == tensors
        wpe = model.transformer.wpe.weight.numel()
        assert count_params(cfg, non_embedding=True) == model.num_params(True) == tensors - wpe
        wte = model.transformer.wte.weight.numel()
        assert scaling_params(cfg) == tensors - wpe - wte


def test_no_biases_by_default_and_biases_on_request():
    names = [n for n, _ in build(tiny_config()).named_parameters()]
    assert not any(n.endswith(".bias") for n in names)
    names = [n for n, _ in build(tiny_config(bias=True)).named_parameters()]
    assert sum(n.endswith(".bias") for n in names) == 2 * 6 + 1  # 4 linears + 2 LNs per block, ln_f


def test_init_statistics():
    cfg = GPTConfig(block_size=32, vocab_size=512, n_layer=8, n_head=4, n_embd=128)
    model = build(cfg)
    std = lambda t: t.detach().float().std().item()  # noqa: E731
    assert std(model.transformer.wte.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.transformer.h[0].attn.c_attn.weight) == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert std(model.transformer.h[3].attn.c_proj.weight) == pytest.approx(resid, rel=0.05)
    assert std(model.transformer.h[3].mlp.c_proj.weight) == pytest.approx(resid, rel=0.05)


# --- forward -----------------------------------------------------------------------------------


def test_forward_shapes_and_loss_at_init():
    cfg = GPTConfig.from_preset("gpt2-nano", vocab_size=257)
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.block_size))
    logits, loss = model(idx)
    assert logits.shape == (4, cfg.block_size, cfg.vocab_size) and loss is None
    logits, loss = model(idx, torch.randint(0, cfg.vocab_size, (4, cfg.block_size)))
    assert logits.shape == (4, cfg.block_size, cfg.vocab_size)
    # Small init gives near-uniform predictions.
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=0.1)


def test_loss_is_mean_token_ce_with_ignore_index():
    cfg = tiny_config()
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    targets = torch.randint(0, cfg.vocab_size, (2, 8))
    targets[0, :3] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    manual = -F.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(loss, manual)


def test_last_only_matches_full_logits():
    cfg = tiny_config()
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    full, _ = model(idx)
    last, loss = model(idx, last_only=True)
    assert last.shape == (3, 1, cfg.vocab_size) and loss is None
    torch.testing.assert_close(last, full[:, -1:, :])


def test_causality():
    cfg = tiny_config()
    model = build(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    t = 9
    changed = idx.clone()
    shift = 1 + torch.randint(0, cfg.vocab_size - 1, changed[:, t:].shape)  # never 0 mod V
    changed[:, t:] = (changed[:, t:] + shift) % cfg.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t], b[:, t])  # the changed position does see its own token


def test_sequence_longer_than_block_size_is_a_clear_error():
    cfg = tiny_config()
    model = build(cfg)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, time"):
        model(torch.zeros(cfg.block_size, dtype=torch.long))


def test_token_id_debug_check():
    cfg = tiny_config()
    model = build(cfg)
    bad = torch.full((1, 4), cfg.vocab_size, dtype=torch.long)
    model.check_token_ids = True
    with pytest.raises(ValueError, match="vocab_size"):
        model(bad)


def test_dropout_active_only_in_training():
    cfg = tiny_config(dropout=0.5)
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    model.train()
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.allclose(a, b)
    model.eval()
    a, _ = model(idx)
    b, _ = model(idx)
    torch.testing.assert_close(a, b)


def test_tiny_preset_overfits_one_batch():
    cfg = GPTConfig.from_preset("gpt2-nano", vocab_size=257, block_size=32)
    model = build(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), generator=g)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    _, loss0 = model(x, y)
    for _ in range(100):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * loss0.item(), (loss0.item(), loss.item())


# --- tied weights, state dicts -----------------------------------------------------------------


def test_tied_weights_survive_state_dict_round_trip():
    cfg = tiny_config()
    src = build(cfg, seed=1)
    assert src.lm_head.weight is src.transformer.wte.weight
    with torch.no_grad():
        src.lm_head.weight.add_(1.0)  # visible through both names if tied
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    dst = build(cfg, seed=2)
    dst.load_state_dict(state)
    assert dst.transformer.wte.weight.data_ptr() == dst.lm_head.weight.data_ptr()
    torch.testing.assert_close(dst.transformer.wte.weight, src.transformer.wte.weight)
    # Still tied for training: one gradient step moves both names together.
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    _, loss = dst(idx, idx)
    loss.backward()
    with torch.no_grad():
        dst.lm_head.weight.sub_(dst.lm_head.weight.grad)
    assert torch.equal(dst.transformer.wte.weight, dst.lm_head.weight)


# --- generation --------------------------------------------------------------------------------


def test_generate_is_deterministic_with_a_generator():
    cfg = tiny_config()
    model = build(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    # Longer than block_size, so the context crop is exercised.
    out1 = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    out2 = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    out3 = model.generate(prompt, 20, generator=torch.Generator().manual_seed(8))
    assert out1.shape == (2, 25)
    assert torch.equal(out1[:, :5], prompt)
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)


def test_generate_top_k_1_is_greedy():
    cfg = tiny_config()
    model = build(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 3))
    out = model.generate(prompt, 4, top_k=1, generator=torch.Generator().manual_seed(0))
    ctx = prompt
    for _ in range(4):
        logits, _ = model(ctx)
        ctx = torch.cat([ctx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ctx)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=0.0)


# --- second derivatives ------------------------------------------------------------------------


def test_double_backward_under_math_attention_matches_finite_differences():
    cfg = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8)
    model = build(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    params = [p for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    def grads():
        _, loss = model(idx, idx)
        return torch.autograd.grad(loss, params, create_graph=torch.is_grad_enabled())

    with math_attention():
        gs = grads()
        hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(gs, v)), params)

    # Central differences have O(eps^2) error; the curvature here is O(10), so eps=1e-6 in
    # float64 leaves ~1e-7 of truncation error and ~1e-10 of round-off.
    eps = 1e-6
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(vi, alpha=eps)
    plus = grads()
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.sub_(vi, alpha=2 * eps)
    minus = grads()
    for h, a, b in zip(hv, plus, minus):
        torch.testing.assert_close(h, (a - b) / (2 * eps), rtol=1e-5, atol=1e-6)


# --- scale_attn_by_inverse_layer_idx -----------------------------------------------------------


def test_scale_attn_by_inverse_layer_idx():
    base_cfg = tiny_config(n_layer=3)
    scaled_cfg = tiny_config(n_layer=3, scale_attn_by_inverse_layer_idx=True)
    base = build(base_cfg).eval()
    scaled = GPT(scaled_cfg).eval()
    scaled.load_state_dict(base.state_dict())
    idx = torch.randint(0, base_cfg.vocab_size, (2, 12))
    assert not torch.allclose(base(idx)[0], scaled(idx)[0])

    # Layer 0 divides by 1: unchanged. Layer 2 divides by 3: equals a hand-written attention.
    x = torch.randn(2, 12, base_cfg.n_embd)
    torch.testing.assert_close(base.transformer.h[0].attn(x), scaled.transformer.h[0].attn(x))
    attn = scaled.transformer.h[2].attn
    B, T, C = x.shape
    H, D = base_cfg.n_head, C // base_cfg.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(D) / 3
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn(x), attn.c_proj(y))


# --- FLOPs and MFU -----------------------------------------------------------------------------


def test_flops_per_token_hand_computation():
    cfg = GPTConfig.from_preset("gpt2-small")  # vocab 50304, block 1024, no biases
    L, C, V, T = 12, 768, 50304, 1024
    N = V * C + L * (12 * C * C + 2 * C) + C  # tied head once, wpe excluded
    assert N == 123_587_328
    expected = 6 * N + 12 * L * C * T  # H * Q == C
    assert flops_per_token(cfg) == expected
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.flops_per_token() == expected
    assert model.estimate_mfu(10_000.0, 989.4e12) == pytest.approx(expected * 1e4 / 989.4e12)
    assert estimate_mfu(cfg, 10_000.0, 312e12) == pytest.approx(expected * 1e4 / 312e12)
    with pytest.raises(ValueError):
        estimate_mfu(cfg, 1.0, 0.0)


def test_flops_grow_with_context_length():
    a = GPTConfig.from_preset("gpt2-nano", block_size=64)
    b = GPTConfig.from_preset("gpt2-nano", block_size=128)
    # wpe is excluded from N, so only the attention term moves: 12 * L * C * dT.
    assert flops_per_token(b) - flops_per_token(a) == 12 * 2 * 64 * 64


def test_device_peak_flops_table():
    assert device_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert device_peak_flops("NVIDIA H200", "bf16") == device_peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert device_peak_flops("NVIDIA H100 PCIe", "bf16") < 989.4e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert device_peak_flops("NVIDIA A10", "bf16") == 125e12  # not mistaken for an A100
    assert device_peak_flops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores
    assert device_peak_flops("Some Future GPU", "bf16") is None
    assert device_peak_flops("cpu", torch.float32) is None
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    with pytest.raises(ValueError, match="dtype"):
        device_peak_flops("NVIDIA H100 80GB HBM3", torch.int8)


@pytest.mark.gpu
def test_cuda_forward_backward_bf16():
    cfg = GPTConfig.from_preset("gpt2-nano", vocab_size=257)
    model = build(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
