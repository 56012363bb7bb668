"""Tokenizers for the prepared token streams: GPT-2 BPE (tiktoken) and raw UTF-8 bytes.

Both expose the same small interface: ``name``, ``vocab_size``, ``eot``, ``encode(text)`` (no EOT),
``decode(ids)``. ``encode_documents`` is the fast path used by ``data.prepare``: it returns one flat
array with an EOT after every document, already in the on-disk dtype.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from data.errors import DataError


def token_dtype(vocab_size: int) -> np.dtype:
    """On-disk dtype: uint16 while every id fits, else uint32 (docs/data.md#the-prepared-format)."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass(frozen=True)
class TokenizerSpec:
    """What a tokenizer's prepared data must say in meta.json, known without loading it (GPT-2's
    files may be missing where a prepared folder is read)."""

    name: str
    vocab_size: int
    eot: int  # the dtype is token_dtype(vocab_size), as Tokenizer.dtype


TOKENIZER_SPECS = {spec.name: spec for spec in (TokenizerSpec("gpt2", 50257, 50256),
                                                 TokenizerSpec("byte", 257, 256))}
TOKENIZERS = tuple(TOKENIZER_SPECS)


def tokenizer_spec(name: str) -> TokenizerSpec:
    """The vocabulary size and end-of-text id of tokenizer ``name``, without loading it."""
    if name not in TOKENIZER_SPECS:
        raise DataError(f"Unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}.")
    return TOKENIZER_SPECS[name]


class Tokenizer:
    """Common interface; subclasses set ``name``, ``vocab_size`` and ``eot``."""

    name: str
    vocab_size: int
    eot: int

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the end-of-text token."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid byte sequences become U+FFFD instead of raising."""
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=self.dtype)

    def encode_documents(self, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode documents, each followed by EOT. Returns (flat tokens, tokens per document)."""
        parts: list[np.ndarray] = []
        eot = np.array([self.eot], dtype=self.dtype)
        for doc in docs:
            parts.append(self.encode_array(doc))
            parts.append(eot)
        lengths = np.array([len(p) + 1 for p in parts[::2]], dtype=np.int64)
        tokens = np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)
        return tokens, lengths

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"eot={self.eot})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus EOT 256: needs no download, works on any text."""

    name = "byte"
    vocab_size = TOKENIZER_SPECS["byte"].vocab_size  # 257
    eot = TOKENIZER_SPECS["byte"].eot  # 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(self.dtype)

    def decode(self, ids: Iterable[int]) -> str:
        # EOT (and anything else above 255) is not a byte; drop it rather than fail so that a
        # decoded window that spans documents is still readable.
        data = bytes(i for i in (int(t) for t in ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE through tiktoken; ``encode`` uses ``encode_ordinary`` so special tokens in the
    text are treated as plain text, exactly as nanoGPT prepares OpenWebText."""

    name = "gpt2"

    def __init__(self) -> None:
        try:
            import tiktoken
        except ImportError as e:  # pragma: no cover - tiktoken is a core dependency
            raise DataError("The gpt2 tokenizer needs tiktoken: pip install tiktoken.") from e
        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
            raise DataError(
                "Could not load the GPT-2 tokenizer files through tiktoken "
                f"({type(e).__name__}: {e}). tiktoken downloads them once from "
                "openaipublic.blob.core.windows.net and caches them in TIKTOKEN_CACHE_DIR "
                f"(currently {cache}). Without network access, point TIKTOKEN_CACHE_DIR at a "
                "folder that already holds the two cached files, or use --tokenizer byte, which "
                "needs no download."
            ) from e
        spec = TOKENIZER_SPECS["gpt2"]
        if (self._enc.n_vocab, self._enc.eot_token) != (spec.vocab_size, spec.eot):
            raise DataError(
                f"tiktoken's gpt2 encoding has {self._enc.n_vocab} ids and end-of-text id "
                f"{self._enc.eot_token}, expected {spec.vocab_size} and {spec.eot} (GPT-2's): "
                "its cached files in TIKTOKEN_CACHE_DIR are not GPT-2's; delete them so that "
                "tiktoken fetches them again.")
        self.vocab_size, self.eot = spec.vocab_size, spec.eot

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(t) for t in ids], errors="replace")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called ``name`` (one of ``TOKENIZERS``), built once per process."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    raise DataError(f"Unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}.")
