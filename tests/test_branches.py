"""Cooldown branches (engine/branching.py): a branch equals a fresh run of its horizon, bit for
bit; bad branches are refused with what exists; the train.py command line and multirun."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.errors import HarnessError
from engine.run import run
from train_helpers import compose_cfg, read_metrics, run_train_cli, tiny_overrides

# A 40-step WSD parent deciding over its last quarter; horizons 20 and 40 decay from steps 15
# and 30. SophiaG (a Hessian refresh every 5 steps, its own random probes) with dropout, so the
# optimizer state, the Hessian schedule and the RNG state all have to carry over.
WSD = {"schedule": "wsd", "schedule.decay_fraction": 0.25, "model.dropout": 0.1,
       "train.max_steps": 40, "checkpoint.interval": 10}


def _overrides(data: Path, **extra) -> list[str]:
    return tiny_overrides(data, "sophia", **{**WSD, **extra})


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["model"]


TIMING = ("time/elapsed", "throughput", "time/hessian", "memory/peak", "mfu")


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def parent(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("parent")
    run(compose_cfg(_overrides(tiny_data, **{"schedule.horizons": "[20,40]"})), run_dir)
    return run_dir


def test_the_parent_keeps_a_checkpoint_at_each_horizons_decay_start(parent):
    kept = [p.name for p in list_checkpoints(parent / "branch_points")]
    assert kept == ["ckpt_0000015.pt", "ckpt_0000030.pt"]
    # the rotating ones are untouched: keep_last 2 of every 10 steps
    assert [p.name for p in list_checkpoints(parent / "checkpoints")] == [
        "ckpt_0000030.pt", "ckpt_0000040.pt"]


def test_a_branch_equals_a_fresh_run_of_its_horizon(parent, tiny_data, tmp_path):
    branch, fresh = tmp_path / "branch", tmp_path / "fresh"
    summary = run(compose_cfg(_overrides(tiny_data, **{
        "train.max_steps": 20, "checkpoint.branch_from": str(parent)})), branch)
    run(compose_cfg(_overrides(tiny_data, **{"train.max_steps": 20})), fresh)

    a, b = _weights(branch), _weights(fresh)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "branch weights differ from the fresh run's"
    # every metric but the clocks, the parent's inherited rows up to step 15 included
    assert _without_timing(read_metrics(branch)) == _without_timing(read_metrics(fresh))
    assert summary["branch"] == {"from": str(parent), "step": 15}
    saved = json.loads((branch / "summary.json").read_text())
    assert saved["branch"] == {"from": str(parent), "step": 15} and saved["status"] == "done"
    assert saved["val_loss"] == json.loads((fresh / "summary.json").read_text())["val_loss"]


def test_a_branch_into_the_parents_own_horizon_reproduces_the_parent(parent, tiny_data, tmp_path):
    summary = run(compose_cfg(_overrides(tiny_data, **{"checkpoint.branch_from": str(parent)})),
                  tmp_path)
    assert summary["branch"]["step"] == 30
    assert summary["val_loss"] == json.loads((parent / "summary.json").read_text())["val_loss"]


def test_a_missing_branch_point_is_refused_with_the_steps_that_exist(parent, tiny_data, tmp_path):
    cfg = compose_cfg(_overrides(tiny_data, **{"train.max_steps": 24,
                                               "checkpoint.branch_from": str(parent)}))
    with pytest.raises(HarnessError, match=r"no checkpoint at step 18.*steps \[15, 30, 40\]"):
        run(cfg, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # a refused branch leaves nothing behind


def test_a_branch_that_trains_differently_before_its_decay_is_refused(parent, tiny_data, tmp_path):
    cfg = compose_cfg(_overrides(tiny_data, **{"train.max_steps": 20, "optimizer.lr": 1e-3,
                                               "checkpoint.branch_from": str(parent)}))
    with pytest.raises(HarnessError, match=r"optimizer.lr: 0.0006 -> 0.001"):
        run(cfg, tmp_path / "b")
    # A horizon past the parent's, whose decay starts at the parent's last checkpoint (step 40),
    # would continue from weights the parent trained with a decayed lr: the lr traces differ.
    cfg = compose_cfg(_overrides(tiny_data, **{"train.max_steps": 50,
                                               "schedule.decay_fraction": 0.2,
                                               "checkpoint.branch_from": str(parent)}))
    with pytest.raises(HarnessError, match=r"at step 31 the parent's lr multiplier is 0.715395 "
                                           r"and this run's 1\b"):
        run(cfg, tmp_path / "c")


def test_a_branch_may_change_the_decay_itself(parent, tiny_data, tmp_path):
    """Another decay shape and final lr ratio only act from the branch step on: the branch is a
    fresh run of its own settings."""
    decay = {"train.max_steps": 20, "schedule.decay_shape": "cosine", "train.min_lr_ratio": 0.0}
    run(compose_cfg(_overrides(tiny_data, **decay, **{"checkpoint.branch_from": str(parent)})),
        tmp_path / "branch")
    run(compose_cfg(_overrides(tiny_data, **decay)), tmp_path / "fresh")
    a, b = _weights(tmp_path / "branch"), _weights(tmp_path / "fresh")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_branches_need_a_wsd_parent_and_horizons_inside_the_run(tiny_data, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"checkpoint.branch_from": "x"}))
    with pytest.raises(HarnessError, match="cooldown branches need schedule=wsd"):
        run(cfg, tmp_path / "a")
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", schedule="wsd",
                                     **{"schedule.horizons": "[20,50]"}))
    with pytest.raises(HarnessError, match=r"horizons=\[20, 50\] has horizons past this run's "
                                           r"decay end 30"):
        run(cfg, tmp_path / "b")


def test_train_py_branches_with_the_parents_command_line_and_multirun(tiny_data, tmp_path):
    """`python train.py checkpoint.branch_from=PARENT train.max_steps=T1,T2 -m`: each branch
    composes the parent's overrides under its own, and records its parent and branch step."""
    parent = tmp_path / "parent"
    args = tiny_overrides(tiny_data, "adamw", schedule="wsd", **{
        "schedule.decay_fraction": 0.25, "schedule.horizons": "[20,40]", "train.max_steps": 40})
    res = run_train_cli([*args, f"hydra.run.dir={parent}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    sweep = tmp_path / "sweep"
    res = run_train_cli(["-m", "checkpoint.branch_from=parent", "train.max_steps=20,40",
                         f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["branch"] for s in summaries] == [{"from": str(parent), "step": 15},
                                                {"from": str(parent), "step": 30}]
    assert [s["max_steps"] for s in summaries] == [20, 40]
    assert summaries[1]["val_loss"] == json.loads((parent / "summary.json").read_text())["val_loss"]
    overrides = (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "model=gpt2-nano" in overrides and "schedule.horizons" not in overrides
    assert f"checkpoint.branch_from='{parent}'" in overrides
    # without hydra.run.dir a branch lands in outputs/<date>/<time>_branch-<parent dir name>
    res = run_train_cli(["checkpoint.branch_from=parent", "train.max_steps=20"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (branch,) = (tmp_path / "outputs").glob("*/*_branch-parent")
    assert json.loads((branch / "summary.json").read_text())["branch"]["step"] == 15
