"""Parameter counts, FLOPs per token, MFU, and peak FLOP/s of known accelerators.

Everything here works from a GPTConfig alone, so the engine can budget FLOPs without building a
model (and tests can check the formulas without allocating 1.5B parameters).
"""
from __future__ import annotations

import re

import torch

from .config import GPTConfig


def count_params(config: GPTConfig, non_embedding: bool = True) -> int:
    """Parameter count of ``GPT(config)`` in closed form: the one implementation, which
    ``GPT.num_params`` and the rest of the harness use (tests check it against the tensors).

    The tied wte/lm_head matrix is counted once. ``non_embedding=True`` subtracts the position
    embedding only (nanoGPT's convention): it is a table lookup that costs no FLOPs, while the token
    embedding doubles as the output head, whose matmul does, so it stays in. This is the ``N`` of
    ``6N`` in :func:`flops_per_token`. For the N of scaling laws see :func:`scaling_params`.
    """
    C, L = config.n_embd, config.n_layer
    per_block = 12 * C * C + 2 * C  # qkv 3C^2 + proj C^2 + fc 4C^2 + proj 4C^2, two LN weights
    if config.bias:
        per_block += 9 * C + 2 * C  # qkv 3C, proj C, fc 4C, proj C; two LN biases
    final_ln = C + (C if config.bias else 0)
    n = config.vocab_size * C + config.block_size * C + L * per_block + final_ln
    if non_embedding:
        n -= config.block_size * C
    return n


def scaling_params(config: GPTConfig) -> int:
    """The model size N of scaling-law fits (Kaplan et al. 2020): every parameter but the token
    and position embeddings, i.e. the transformer blocks and the final LayerNorm.

    It is :func:`count_params` (non-embedding) less the token embedding too: that matrix grows with
    the vocabulary, not with the model's capacity, so leaving it in would make models on the same
    data but different tokenizers, or a padded vocabulary, look like different sizes.
    """
    return count_params(config, non_embedding=True) - config.vocab_size * config.n_embd


def flops_per_token(config: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward) of ``GPT(config)`` at full context.

    The PaLM appendix B / nanoGPT ``estimate_mfu`` estimate: ``6 N + 12 L H Q T`` with
    N = ``count_params(config, non_embedding=True)``, L layers, H heads, Q = head dim,
    T = block_size. ``6N`` is 2 FLOPs per multiply-add for the forward pass times 3 for forward
    plus backward; ``12 L H Q T`` is the same factor on the two attention matmuls (QK^T and AV),
    ``2 * 2 * L * T * C`` per token forward. A forward pass alone costs a third of this; the
    engine applies that to evaluation, and counts Hessian passes (forward + backward) in full.
    """
    N = count_params(config, non_embedding=True)
    L, H, Q, T = config.n_layer, config.n_head, config.head_dim, config.block_size
    return 6 * N + 12 * L * H * Q * T


def estimate_mfu(config: GPTConfig, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s divided by the device's peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops!r}")
    return flops_per_token(config) * tokens_per_s / peak_flops


# Dense (no sparsity) peak FLOP/s per GPU from the vendor data sheets. "tf32" is the tensor-core
# TF32 rate, "fp32" the plain CUDA-core rate. Keys are regexes on torch.cuda.get_device_name();
# order matters: the first match wins, so variants come before the generic entry. The H100 SXM row
# (the one MFU is reported against here) was checked on 2026-11-25 against the H100 table at
# glennklockwood.com/garden/processors/h100 (989.4 bf16/fp16, 494.7 tf32, 66.9 fp32 TFLOPS); the
# PCIe and NVL rows are half the data sheets' with-sparsity figures. Pass `train.peak_flops` to
# override for a clock-limited or unlisted part.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    r"H100.*(PCIe|PCIE)": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    r"H100.*NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    r"H100": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM
    # H200 is the H100 SXM die with more, faster memory: same compute peak.
    r"H200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    r"A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    r"L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    r"\bL4\b": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    r"\bA10\b": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    r"V100": {"fp16": 125e12, "fp32": 15.7e12},  # no bf16 tensor cores
}

_DTYPE_KEYS = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "tf32": "tf32",
}


def _device_name(device: torch.device | str | int) -> str | None:
    """Marketing name of a CUDA device, or the string itself if it is not a device spec."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            return device  # already a name such as "NVIDIA H100 80GB HBM3"
    if isinstance(device, int):
        device = torch.device("cuda", device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def device_peak_flops(device: torch.device | str | int, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s of ``device`` for matmuls in ``dtype``, or None if unknown.

    ``device`` is a torch device (``"cuda:0"``), a CUDA index, or a device name as reported by
    ``torch.cuda.get_device_name``. ``dtype`` is a torch dtype or one of bf16/fp16/fp32/tf32
    (pass "tf32" when fp32 matmuls run on TF32 tensor cores). CPUs and unknown GPUs give None, and
    callers then report MFU as absent rather than invent a number.
    """
    key = _DTYPE_KEYS.get(dtype)
    if key is None:
        raise ValueError(
            f"unknown dtype {dtype!r} for peak FLOP/s; use one of torch.bfloat16, torch.float16, "
            "torch.float32 or the strings bf16, fp16, fp32, tf32"
        )
    name = _device_name(device)
    if name is None:
        return None
    for pattern, table in PEAK_FLOPS.items():
        if re.search(pattern, name):
            return table.get(key)
    return None
