"""Two torchrun "nodes" on one machine (two launchers, one c10d rendezvous on localhost): they
train as one process does, and a node whose worker dies mid-run is restarted and resumes."""
from __future__ import annotations

import socket

import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.run import run
from process_helpers import assert_metrics_match, start_train
from train_helpers import compose_cfg, read_metrics, tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(args, tmp_path, *, max_restarts=0, script="train.py", env=None):
    """Both launchers of a 2-node job (1 worker each), joined by rendezvous on localhost; returns
    each node's (exit code, stdout, stderr)."""
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{_free_port()}", f"--rdzv-id=job{_free_port()}",
                f"--max-restarts={max_restarts}"]
    nodes = [start_train(args, tmp_path, script=script, env=env, torchrun=launcher,
                         name=f"node{i}") for i in range(2)]
    return [node.finish() for node in nodes]


EXTRA = {"train.max_steps": 10, "checkpoint.interval": 5, "train.eval_interval": 5,
         "train.log_interval": 1, "optimizer.k": 3}


def test_two_nodes_train_like_one_process(tiny_data, tmp_path):
    args = tiny_overrides(tiny_data, "sophia", **EXTRA)
    run_dir = tmp_path / "nodes"
    for code, out, err in _two_nodes(args + [f"hydra.run.dir={run_dir}"], tmp_path):
        assert code == 0, err[-3000:]
    single = tmp_path / "single"
    run(compose_cfg(args), single)
    assert_metrics_match(run_dir, single)
    ca = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    cb = load_checkpoint(list_checkpoints(single / "checkpoints")[-1])
    assert ca["rank_divergence"] == 0.0
    for name, t in cb["model"].items():
        torch.testing.assert_close(ca["model"][name], t, rtol=1e-4, atol=1e-5)


def test_a_node_whose_worker_dies_is_restarted_and_the_job_resumes(tiny_data, tmp_path):
    """Rank 1's worker dies hard before step 7 (tests/fault_train.py); with --max-restarts=1 both
    nodes restart their workers, which resume from step 5's checkpoint and end with the
    uninterrupted run's loss."""
    args = tiny_overrides(tiny_data, "sophia", **EXTRA)
    run_dir = tmp_path / "nodes"
    results = _two_nodes(args + [f"hydra.run.dir={run_dir}"], tmp_path, max_restarts=1,
                         script="fault_train.py", env={"FAULT_STEP": "7"})
    for code, out, err in results:
        assert code == 0, err[-3000:]
    out = "".join(o for _, o, _ in results)
    assert "resumed from" in out and "ckpt_0000005.pt" in out
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 11))
    single = tmp_path / "single"
    run(compose_cfg(args), single)
    assert rows[-1]["val/loss"] == pytest.approx(read_metrics(single)[-1]["val/loss"], rel=1e-4)
