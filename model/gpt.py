"""A nanoGPT-style GPT-2: pre-LN decoder, GELU(tanh), tied embeddings, learned positions, SDPA.

References: Radford et al. 2019 (GPT-2); Karpathy's nanoGPT model.py, which this follows closely
so that numbers (parameter counts, FLOPs, losses) are comparable with the Sophia paper's runs.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import flops as _flops
from .config import GPTConfig


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Force the math SDPA backend inside the block.

    The fused (flash / memory-efficient, and the CPU flash) kernels have no double backward, so
    Hutchinson's Hessian-vector products (SophiaH) must run under this context. It is slower and
    uses O(T^2) memory, so use it only where second derivatives are needed.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # Logits q.k / sqrt(d), further divided by (layer_idx + 1) when asked (GPT-2 / Mistral
        # option): it damps deep layers' attention logits, which the Sophia paper finds AdamW
        # and Lion need for stability at 355M+ and Sophia does not.
        self.scale = 1.0 / math.sqrt(config.head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            scale=self.scale,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 language model.

    Parameter names follow nanoGPT / Hugging Face (``transformer.h.0.attn.c_attn.weight``, ...)
    so that grouping rules and checkpoints read the same. ``lm_head.weight`` *is*
    ``transformer.wte.weight`` (weight tying); ``named_parameters()`` lists it once, under
    ``transformer.wte.weight``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        # Debug aid: checks token ids against vocab_size in forward. Off by default because the
        # check forces a host sync on GPU; the data side validates ids when it loads a dataset.
        self.check_token_ids = False
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tie after both exist; wte was registered first, so it owns the name.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual output projections: each block adds two of them to
        # the residual stream, so 2 * n_layer contributions keep the stream's variance bounded.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters, :func:`model.flops.count_params` of this model's config (the tied
        wte/lm_head tensor counted once; ``non_embedding`` subtracts the position embedding)."""
        return _flops.count_params(self.config, non_embedding)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: ``6 N + 12 L H Q T`` (see :func:`model.flops.flops_per_token`)."""
        return _flops.flops_per_token(self.config)

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float) -> float:
        """Model FLOPs utilisation for a training throughput of ``tokens_per_s`` (fwd + bwd)."""
        return _flops.estimate_mfu(self.config, tokens_per_s, peak_flops)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy if ``targets`` is given.

        idx and targets are int64 ``[B, T]`` with ``T <= block_size``; targets equal to -1 are
        ignored. Returns ``(logits [B, T, V], loss)``; ``loss`` is None without targets.
        ``last_only=True`` (generation) computes logits for the last position only: ``[B, 1, V]``.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be a [batch, time] tensor of token ids, got shape {tuple(idx.shape)}")
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's block_size {self.config.block_size}; "
                f"use data.block_size <= {self.config.block_size} or build the model with a larger "
                "block_size"
            )
        if self.check_token_ids and idx.numel() and not (
            0 <= int(idx.min()) and int(idx.max()) < self.config.vocab_size
        ):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got range "
                f"[{int(idx.min())}, {int(idx.max())}]; the data's tokenizer does not match the model's "
                "vocab_size"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
            return logits, loss
        if last_only:
            return self.lm_head(x[:, [-1], :]), None
        return self.lm_head(x), None

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to each row of ``idx`` ([B, T] int64).

        The context is cropped to the last ``block_size`` tokens. With the same ``generator``
        state the output is identical. Call ``model.eval()`` first if the model has dropout.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}; use e.g. 1.0 or 0.8")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k!r}")
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond, last_only=True)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
