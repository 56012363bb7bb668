"""Tokenizers: byte round trips, GPT-2 parity with tiktoken, dtype rule, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from data import DataError, get_tokenizer
from data.tokenizers import TOKENIZERS, token_dtype, tokenizer_spec

SAMPLES = [
    "",
    "plain ascii",
    "naïve café — ünïcödé",
    "日本語のテキストと中文",
    "emoji 🤖🚀👩‍👩‍👧 and flags 🇫🇷",
    "combining e\u0301 and zero\u200bwidth",
    "tabs\tand\nnewlines\r\n",
    "<|endoftext|> is just text here",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = get_tokenizer("byte")
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_attributes_and_documents():
    tok = get_tokenizer("byte")
    assert (tok.name, tok.vocab_size, tok.eot, tok.dtype) == ("byte", 257, 256, np.uint16)
    tokens, lengths = tok.encode_documents(["ab", "é"])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [97, 98, 256, 0xC3, 0xA9, 256]
    assert lengths.tolist() == [3, 3]
    # EOT is dropped and broken UTF-8 becomes U+FFFD instead of raising.
    assert tok.decode([104, 105, 256, 0xC3]) == "hi\ufffd"


def test_gpt2_matches_tiktoken():
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    tok = get_tokenizer("gpt2")
    assert (tok.name, tok.vocab_size, tok.eot) == ("gpt2", 50257, 50256)
    for text in SAMPLES:
        assert tok.encode(text) == enc.encode_ordinary(text)
        assert tok.decode(tok.encode(text)) == text
    # Special-token text is ordinary text: encode_ordinary never emits EOT.
    assert tok.eot not in tok.encode("<|endoftext|>")
    tokens, lengths = tok.encode_documents(["Hello world", "Bye"])
    expected = enc.encode_ordinary("Hello world") + [50256] + enc.encode_ordinary("Bye") + [50256]
    assert tokens.tolist() == expected
    assert lengths.sum() == len(expected)


def test_token_dtype_rule():
    assert token_dtype(257) == np.uint16
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(100277) == np.uint32


def test_unknown_tokenizer():
    with pytest.raises(DataError, match="Unknown tokenizer 'bpe'.*gpt2, byte"):
        get_tokenizer("bpe")
    with pytest.raises(DataError, match="Unknown tokenizer 'bpe'.*gpt2, byte"):
        tokenizer_spec("bpe")


@pytest.mark.parametrize("name", TOKENIZERS)
def test_specs_are_what_the_loaded_tokenizers_say(name):
    """meta.json is checked against these without loading the tokenizer's files."""
    tok, spec = get_tokenizer(name), tokenizer_spec(name)
    assert (spec.name, spec.vocab_size, spec.eot) == (tok.name, tok.vocab_size, tok.eot)


def test_missing_tiktoken_files_names_cache_dir(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    get_tokenizer.cache_clear()
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    try:
        with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR.*--tokenizer byte"):
            get_tokenizer("gpt2")
    finally:
        get_tokenizer.cache_clear()
