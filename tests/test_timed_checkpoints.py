"""checkpoint.every_minutes: a checkpoint whenever that much wall-clock has passed since the last
one, decided by rank 0's clock, without changing what the run computes."""
from __future__ import annotations

import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.errors import HarnessError
from engine.run import run
from engine.trainer import Trainer
from process_helpers import start_train
from train_helpers import compose_cfg, read_metrics, tiny_overrides


def _steps(run_dir):
    return [load_checkpoint(p)["step"] for p in list_checkpoints(run_dir / "checkpoints")]


def _computed(rows):
    """The metrics rows without the timings, which differ between any two runs."""
    timings = {"time/elapsed", "time/hessian", "throughput", "mfu", "memory/peak"}
    return [{k: v for k, v in row.items() if k not in timings} for row in rows]


def test_every_minutes_checkpoints_on_the_clock_and_changes_no_result(tiny_data, tmp_path,
                                                                      monkeypatch,
                                                                      one_torch_thread):
    """A clock that reads one minute per step and every_minutes=3: checkpoints at steps 3, 6, ...
    besides the interval's; the weights and metrics are those of a run without it, and resuming
    with another every_minutes is allowed (checkpoint.* is result-neutral)."""
    real_fit = Trainer.fit

    def fit(self):
        self.clock = lambda: 60.0 * self.step
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    extra = {"checkpoint.interval": 10, "checkpoint.keep_last": 0, "model.dropout": 0.1,
             "train.max_steps": 24}
    timed = tmp_path / "timed"
    run(compose_cfg(tiny_overrides(tiny_data, "adamw", **extra,
                                   **{"checkpoint.every_minutes": 3, "train.stop_at_step": 20})),
        timed)
    assert _steps(timed) == [3, 6, 9, 10, 13, 16, 19, 20]  # the clock restarts at every save
    run(compose_cfg(tiny_overrides(tiny_data, "adamw", **extra,
                                   **{"checkpoint.every_minutes": 0.5})), timed)
    assert _steps(timed)[-3:] == [22, 23, 24]

    plain = tmp_path / "plain"
    run(compose_cfg(tiny_overrides(tiny_data, "adamw", **extra)), plain)
    assert _steps(plain) == [10, 20, 24]
    assert _computed(read_metrics(timed)) == _computed(read_metrics(plain))
    a, b = load_checkpoint(list_checkpoints(timed / "checkpoints")[-1]), \
        load_checkpoint(list_checkpoints(plain / "checkpoints")[-1])
    for name, tensor in b["model"].items():
        assert torch.equal(a["model"][name], tensor), name


@pytest.mark.parametrize("value", [-1, "often", float("inf")])
def test_a_bad_every_minutes_is_refused_in_one_line(value, tiny_data, tmp_path):
    with pytest.raises(HarnessError, match=r"^checkpoint\.every_minutes=.* must be a .*number"):
        run(compose_cfg(tiny_overrides(tiny_data, "adamw", **{"checkpoint.every_minutes": value})),
            tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
def test_rank_0s_clock_decides_for_every_rank(tiny_data, tmp_path):
    """Rank 1's clock says a checkpoint is always due, rank 0's says one is due every 3 steps: the
    ranks save together on rank 0's schedule (one step after its clock says so, the decision
    travelling with the next step), and the run neither hangs nor diverges."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 20, "checkpoint.interval": 0,
                                                "checkpoint.keep_last": 0,
                                                "checkpoint.every_minutes": 3})
    job = start_train(args + [f"hydra.run.dir={run_dir}"], tmp_path, script="hold_train.py",
                      env={"FAKE_CLOCK": "steps", "FAKE_CLOCK_RANK1": "always_due"},
                      torchrun=["--standalone", "--nproc_per_node=2"])
    code, out, err = job.finish()
    assert code == 0, err[-3000:]
    # Rank 0 sees 3 minutes pass at step 3 (saved at 4), then 3 minutes after each save.
    assert _steps(run_dir) == [4, 8, 12, 16, 20]
    assert all(load_checkpoint(p)["rank_divergence"] == 0.0
               for p in list_checkpoints(run_dir / "checkpoints"))
