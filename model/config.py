"""GPT-2 model configuration and named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The four GPT-2 sizes of Radford et al. 2019 (as in nanoGPT) plus two tiny presets that train in
# seconds on a laptop CPU. Only the shape lives here; vocab_size and block_size keep the
# GPTConfig defaults (50304, 1024) unless the preset or the caller overrides them.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768),  # ~124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # ~350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # ~774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # ~1.56B
    # ~30M with GPT-2's vocabulary (10.6M outside the embeddings): a single-GPU study in minutes.
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),
    # Tiny CPU presets. With the byte tokenizer (vocab 257) nano has ~0.12M parameters.
    "gpt2-nano": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "gpt2-micro": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
}


@dataclass
class GPTConfig:
    """Shape and regularisation of a nanoGPT-style GPT-2.

    vocab_size defaults to 50304: GPT-2's 50257 padded up to a multiple of 64, which makes the
    output matmul faster on GPUs. The extra rows are never targets, so they only cost memory.
    """

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False
    scale_attn_by_inverse_layer_idx: bool = False

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            # bool is an int subclass; True as a layer count is certainly a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"GPTConfig.{name} must be a positive integer, got {value!r}; "
                    f"set model.{name} to a value >= 1"
                )
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_embd as a multiple of n_head (e.g. n_embd={self.n_head * 64})"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(
                f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}; "
                "pre-training normally uses 0.0"
            )
        self.dropout = float(self.dropout)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """Build the config of a named preset, e.g. ``from_preset("gpt2-nano", vocab_size=257)``.

        Raises ValueError for an unknown preset (listing the choices) or an unknown field.
        """
        if name not in PRESETS:
            choices = ", ".join(sorted(PRESETS))
            raise ValueError(f"unknown model preset {name!r}; choose one of: {choices}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown GPTConfig field(s) {unknown} in overrides for preset {name!r}; "
                f"valid fields: {', '.join(sorted(fields))}"
            )
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (what checkpoints store as ``model_config``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; valid: {sorted(fields)}")
        return cls(**d)
