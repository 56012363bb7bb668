"""engine/checkpoint.py: the atomic keep-last-N save, and load_trained, the one loader of a
trained model and its tokenizer for the tools (sample, evaluate, export), with one error class for
every refusal."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from data.tokenizers import get_tokenizer
from engine.checkpoint import (CheckpointError, CheckpointWriteError, TrainedModel,
                               list_checkpoints, load_checkpoint, load_trained, save_checkpoint)
from engine.errors import HarnessError
from model import GPT, GPTConfig

BYTE = get_tokenizer("byte")


def write_run(run_dir: Path, data_meta: dict | None = None, **changes) -> Path:
    """A run dir with one checkpoint of a tiny byte-level GPT; ``changes`` edit the state."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=BYTE.vocab_size, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    state = {"step": 12, "model": model.state_dict(), "model_config": config.to_dict(),
             "optimizer": {}, "optimizer_name": "adamw",
             "data_meta": {"tokenizer": "byte", "vocab_size": 257} if data_meta is None else data_meta,
             **changes}
    save_checkpoint(state, run_dir / "checkpoints", 12, keep_last=0)
    return run_dir


def test_a_run_dir_loads_as_model_tokenizer_and_facts(tmp_path):
    trained = load_trained(write_run(tmp_path / "run"), "cpu")
    assert isinstance(trained, TrainedModel)
    assert trained.path == tmp_path / "run" / "checkpoints" / "ckpt_0000012.pt"
    assert trained.step == 12 and trained.optimizer_name == "adamw"
    assert trained.config.n_embd == 16 and trained.model.config == trained.config
    assert not trained.model.training
    assert trained.tokenizer.name == "byte" and trained.tokenizer_name == "byte"
    assert trained.data_meta == {"tokenizer": "byte", "vocab_size": 257}
    # the checkpoint file itself works the same; the tokenizer may be left unloaded
    bare = load_trained(trained.path, tokenizer=None, load_tokenizer=False)
    assert bare.tokenizer is None and bare.tokenizer_name == "byte"


@pytest.mark.parametrize("make,needle", [
    (lambda d: d, "no checkpoint in"),
    (lambda d: d / "missing.pt", "does not exist"),
    (lambda d: (d / "junk.pt").write_text("x") and d / "junk.pt",
     "is not a checkpoint this tool can read (not a torch.save archive)"),
    (lambda d: torch.save({"weight": torch.zeros(1)}, d / "bare.pt") or d / "bare.pt",
     "lacks format, step, model, optimizer, model_config"),
    (lambda d: write_run(d / "r", model_config={"n_layer": 0}), "model_config cannot build a GPT"),
    (lambda d: write_run(d / "r", model={}), "weights do not match its model_config"),
    (lambda d: write_run(d / "r", data_meta={}), "does not record its tokenizer"),
    (lambda d: write_run(d / "r", data_meta={"tokenizer": "gpt2"}), "has 50257 tokens"),
    (lambda d: write_run(d / "r", data_meta={"tokenizer": "klingon"}), "Unknown tokenizer"),
])
def test_every_refusal_is_one_error_class(tmp_path, make, needle):
    with pytest.raises(CheckpointError, match=re.escape(needle)) as err:
        load_trained(make(tmp_path), "cpu")
    assert isinstance(err.value, HarnessError)  # printed by the tools as `error: ...`, exit 2


def test_a_requested_tokenizer_must_be_the_trained_one(tmp_path):
    run = write_run(tmp_path / "run")
    assert load_trained(run, tokenizer="byte").tokenizer.name == "byte"
    with pytest.raises(CheckpointError, match="tokenizer mismatch.*'byte'"):
        load_trained(run, tokenizer="gpt2")
    # a checkpoint that records none takes the requested one
    bare = write_run(tmp_path / "bare", data_meta={})
    assert load_trained(bare, tokenizer="byte").tokenizer.name == "byte"


def test_save_is_atomic_prunes_and_clears_temp_files_of_a_killed_save(tmp_path, monkeypatch):
    state = {"step": 0, "model": {}, "model_config": {}, "optimizer": {}}
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(state, ckpts, 1, keep_last=2)
    leftover = ckpts / ".ckpt_0000002.pt.k1ll3d.tmp"  # what a save killed hard leaves
    leftover.write_bytes(b"partial")
    for step in (2, 3):
        save_checkpoint({**state, "step": step}, ckpts, step, keep_last=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_0000002.pt", "ckpt_0000003.pt"]
    assert load_checkpoint(list_checkpoints(ckpts)[-1])["step"] == 3

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError) as failed:
        save_checkpoint(state, ckpts, 4, keep_last=2)
    assert failed.value.status == "failed: disk full"
    message = str(failed.value)
    assert message.startswith("disk full: checkpoint ckpt_0000004.pt needs about ")
    assert f" MiB in {ckpts}, " in message and "resume from ckpt_0000003.pt" in message
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_0000002.pt", "ckpt_0000003.pt"]
