"""Shared test setup: offline everything, small thread counts, paths to ../shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    path = SHARED / "corpora" / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"test corpus {path} not found (it lives in ../shared/corpora)")
    return path


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
