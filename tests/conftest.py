"""Shared test setup: offline everything, small thread counts, the fixtures in tests/fixtures."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# What tiktoken_ext.openai_public downloads for "gpt2", with the sha256 it checks each file against.
GPT2_FILES = {
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def gpt2_tiktoken_cache(cache_dir: Path) -> Path:
    """Fill ``cache_dir`` the way tiktoken would after downloading GPT-2's two files: each
    under the sha1 of its URL. A file whose sha256 differs would make tiktoken download it
    again, so that is an error here instead of a network access."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, (url, sha256) in GPT2_FILES.items():
        data = (FIXTURES / "gpt2" / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise pytest.UsageError(f"{FIXTURES / 'gpt2' / name} is not the file tiktoken expects "
                                    f"(sha256 {sha256}); restore it from git")
        (cache_dir / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    return cache_dir


def pytest_configure(config):
    # Set before any test module is imported, and inherited by the subprocesses tests start;
    # it replaces any TIKTOKEN_CACHE_DIR of the caller, whose folder may lack the files.
    cache_dir = Path(tempfile.mkdtemp(prefix="sophia-bench-tiktoken-"))
    config._tiktoken_cache = (cache_dir, os.environ.get("TIKTOKEN_CACHE_DIR"))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(gpt2_tiktoken_cache(cache_dir))


def pytest_unconfigure(config):
    cache_dir, before = getattr(config, "_tiktoken_cache", (None, None))
    if cache_dir is None:
        return
    shutil.rmtree(cache_dir, ignore_errors=True)
    if before is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return FIXTURES / "tinyshakespeare.txt"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, shakespeare_path) -> Path:
    """tinyshakespeare, byte-tokenized, one document per paragraph, 10% of them for validation."""
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare-byte"
    prepare(str(shakespeare_path), out, tokenizer="byte", val_fraction=0.1, seed=0,
            split_blank_lines=True, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run faster on one thread than on two that contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
