"""Resuming keeps a run's own settings: how the saved command line and a new one combine, and
which differences are refused."""
from __future__ import annotations

import pytest

from engine.errors import HarnessError
from engine.resume import check_resume_config, config_changes, is_result_neutral, merge_overrides


def test_new_overrides_replace_saved_ones_of_the_same_key_in_place():
    saved = ["experiment=quickstart", "optimizer=sophia", "optimizer.lr=1e-3"]
    assert merge_overrides(saved, ["optimizer=sophia"]) == saved
    assert merge_overrides(saved, ["+optimizer.lr=2e-3", "seed=2"]) == \
        ["experiment=quickstart", "optimizer=sophia", "+optimizer.lr=2e-3", "seed=2"]


def test_settings_of_one_invocation_are_not_carried_over():
    saved = ["optimizer=adamw", "train.stop_at_step=5", "checkpoint.resume=a/b.pt",
             "checkpoint.interval=2"]
    assert merge_overrides(saved, []) == ["optimizer=adamw", "checkpoint.interval=2"]
    assert merge_overrides(saved, ["train.stop_at_step=9"]) == \
        ["optimizer=adamw", "train.stop_at_step=9", "checkpoint.interval=2"]


def test_identity_changes_are_listed_and_operational_ones_are_free():
    saved = {"train": {"max_steps": 400, "stop_at_step": 200, "log_interval": 10},
             "optimizer": {"name": "sophia", "lr": 6e-4}, "wandb": {"mode": "disabled"}}
    current = {"train": {"max_steps": 2000, "stop_at_step": None, "log_interval": 1},
               "optimizer": {"name": "sophia", "lr": 6e-4, "rho": 0.1},
               "wandb": {"mode": "online"}}
    assert config_changes(saved, current) == [("optimizer.rho", "<unset>", 0.1),
                                              ("train.max_steps", 400, 2000)]
    with pytest.raises(HarnessError) as refused:
        check_resume_config(saved, current, allow=False, source="ckpt.pt")
    assert "train.max_steps: 400 -> 2000" in str(refused.value)
    assert "checkpoint.allow_config_change=true" in str(refused.value)
    assert len(check_resume_config(saved, current, allow=True, source="ckpt.pt")) == 2
    assert check_resume_config(saved, saved, allow=False, source="ckpt.pt") == []


def test_one_definition_of_result_neutral_keys():
    for key in ("train.stop_at_step", "train.peak_flops", "compile", "checkpoint.keep_last",
                "checkpoint", "wandb.mode", "+wandb.group=g", "~wandb.entity", "eval.hellaswag_limit",
                "hydra.run.dir=x", "hydra/launcher=slurm", "hparams_search=sophia_optuna"):
        assert is_result_neutral(key), key
    for key in ("optimizer.lr", "optimizer=sophia", "seed=2", "train.max_steps", "model.n_layer",
                "data.source", "dtype", "evaluation.x", "train.log_interval_extra"):
        assert not is_result_neutral(key), key
    # where a run lives: left out of labels, refused on resume
    for key in ("device=cuda:1", "data.dir=/scratch/x"):
        assert is_result_neutral(key, placement=True) and not is_result_neutral(key), key
    saved = {"device": "cpu", "data": {"dir": "a"}, "train": {"peak_flops": None}}
    current = {"device": "cuda", "data": {"dir": "b"}, "train": {"peak_flops": 1e15}}
    assert config_changes(saved, current) == [("data.dir", "a", "b"), ("device", "cpu", "cuda")]
