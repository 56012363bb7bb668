"""A run stopped by a signal (SIGTERM, SIGINT, SIGUSR1; SLURM, torchrun, Ctrl-C) finishes its
step, checkpoints, writes its summary with status "preempted", says how to resume and exits with
128 + the signal's number; resuming gives the uninterrupted run's result. A second signal exits at
once; submitit's requeue runs after the checkpoint."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import time

import pytest
import torch

from engine.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from engine.distributed import stop_on_signals
from engine.run import run
from process_helpers import last_logged_step, start_train, wait_for, worker_pid
from train_helpers import REPO, compose_cfg, read_metrics, run_train_cli, tiny_overrides

# Long enough that a signal always lands mid-run; dropout on, so the RNG state must resume too.
LONG = {"train.max_steps": 120, "train.log_interval": 1, "train.eval_interval": 20,
        "checkpoint.interval": 50, "model.dropout": 0.1}


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _signal_at_random_step(job, run_dir, signum, send=None):
    """Send ``signum`` once the run has logged a random step; returns that step."""
    target = random.randint(3, 40)
    wait_for(lambda: last_logged_step(run_dir) >= target or job.proc.poll() is not None,
             what=f"step {target}")
    (send or job.proc.send_signal)(signum)
    return target


def test_sigterm_at_a_random_step_checkpoints_and_resumes_bit_exact(tiny_data, tmp_path,
                                                                     one_torch_thread):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_data, "adamw", **LONG)
    job = start_train(args + [f"hydra.run.dir={run_dir}"], tmp_path)
    target = _signal_at_random_step(job, run_dir, signal.SIGTERM)
    code, out, err = job.finish()
    assert code == 143, (target, err[-3000:])
    assert "Traceback" not in err

    summary = _summary(run_dir)
    step = summary["step"]
    assert summary["status"] == "preempted" and target <= step < 120, (target, summary)
    assert load_checkpoint(checkpoint_path(run_dir / "checkpoints", step))["step"] == step
    assert last_logged_step(run_dir) == step  # log_interval 1: every step up to the stop, no more
    [line] = [ln for ln in out.splitlines() if ln.startswith("preempted by SIGTERM")]
    assert f"at step {step}/120" in line and f"hydra.run.dir={run_dir}" in line
    assert "[exit 143]" in line

    # The command the line gives resumes; the result is the uninterrupted run's, bit for bit.
    res = run_train_cli([f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"ckpt_{step:07d}.pt at step {step}" in res.stdout
    assert _summary(run_dir)["status"] == "done"
    straight = tmp_path / "straight"
    run(compose_cfg(args), straight)
    a, b = read_metrics(run_dir), read_metrics(straight)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train/loss", "val/loss", "grad/norm", "tokens"):
            assert ra.get(key) == rb.get(key), (step, ra["step"], key)
    wa = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    wb = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1])
    assert wa["step"] == wb["step"] == 120
    for name, tensor in wb["model"].items():
        assert torch.equal(wa["model"][name], tensor), (step, name)


def test_a_repeated_signal_is_one_request_and_a_later_second_one_exits_at_once(tiny_data,
                                                                              tmp_path):
    """The same signal twice within a second (torchrun forwarding what a worker also received) is
    one request: SIGUSR1 stops with a checkpoint, exit 138. A second signal later (a user's second
    Ctrl-C) exits at once, without a checkpoint, a summary or a traceback: exit 130."""
    args = tiny_overrides(tiny_data, "adamw", **LONG)
    hold = tmp_path / "go"
    env = {"HOLD_AT_STEP": "7", "HOLD_FILE": str(hold)}
    job = start_train(args + [f"hydra.run.dir={tmp_path / 'once'}"], tmp_path,
                      script="hold_train.py", env=env, name="once")
    wait_for(lambda: (tmp_path / "go.reached").exists() or job.proc.poll() is not None)
    job.proc.send_signal(signal.SIGUSR1)
    job.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.2)
    hold.touch()
    code, out, err = job.finish()
    assert code == 138 and "Traceback" not in err, err[-3000:]
    assert "received again" not in err
    assert _summary(tmp_path / "once")["status"] == "preempted"
    assert [p.name for p in list_checkpoints(tmp_path / "once" / "checkpoints")] == \
        ["ckpt_0000008.pt"]  # step 7 was under way when the signal came: it completes first

    hold.unlink()
    (tmp_path / "go.reached").unlink()
    job = start_train(args + [f"hydra.run.dir={tmp_path / 'twice'}"], tmp_path,
                      script="hold_train.py", env=env, name="twice")
    wait_for(lambda: (tmp_path / "go.reached").exists() or job.proc.poll() is not None)
    job.proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    job.proc.send_signal(signal.SIGINT)
    code, out, err = job.finish(timeout=30)  # the run is still held: only the signal ends it
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert "SIGINT received again: exiting now, without a checkpoint" in err
    assert not list_checkpoints(tmp_path / "twice" / "checkpoints")
    assert not (tmp_path / "twice" / "summary.json").exists()


def test_sigint_before_training_exits_130_in_one_line_and_leaves_no_run_dir(tiny_data, tmp_path):
    hold = tmp_path / "go"
    run_dir = tmp_path / "elsewhere" / "run"
    job = start_train(tiny_overrides(tiny_data, "adamw") + [f"hydra.run.dir={run_dir}"],
                      tmp_path, script="hold_train.py", env={"HOLD_BEFORE_TRAINING": str(hold)})
    wait_for(lambda: (tmp_path / "go.reached").exists() or job.proc.poll() is not None)
    job.proc.send_signal(signal.SIGINT)
    code, out, err = job.finish(timeout=60)
    assert code == 130, err[-3000:]
    assert err.strip() == "interrupted before training started; nothing to save"
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_exactly(tiny_data, tmp_path):
    """Only rank 1 receives SIGTERM (a signal need not reach every rank at the same step): the
    ranks agree on one step, checkpoint it, and both exit 143. The same torchrun command then
    resumes, and ends exactly where two ranks without the signal do."""
    extra = {**LONG, "train.max_steps": 80}
    args = tiny_overrides(tiny_data, "adamw", **extra)
    torchrun = ["--standalone", "--nproc_per_node=2"]
    run_dir = tmp_path / "run"
    job = start_train(args + [f"hydra.run.dir={run_dir}"], tmp_path, torchrun=torchrun)
    target = _signal_at_random_step(
        job, run_dir, signal.SIGTERM, send=lambda signum: os.kill(worker_pid(job.proc.pid, 1),
                                                                 signum))
    code, out, err = job.finish()
    assert code != 0  # torchrun reports its workers' non-zero exits as a failure
    assert err.count("exitcode  : 143") == 2, (target, err[-3000:])
    summary = _summary(run_dir)
    step = summary["step"]
    assert summary["status"] == "preempted" and target <= step < 80, (target, summary)
    assert load_checkpoint(checkpoint_path(run_dir / "checkpoints", step))["rank_divergence"] == 0
    assert out.count("preempted by SIGTERM") == 1

    res = run_train_cli(args + [f"hydra.run.dir={run_dir}"], cwd=tmp_path, torchrun_nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at step {step}" in res.stdout
    straight = tmp_path / "straight"
    res = run_train_cli(args + [f"hydra.run.dir={straight}"], cwd=tmp_path, torchrun_nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_metrics(run_dir), read_metrics(straight)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r.get("val/loss") for r in a] == [r.get("val/loss") for r in b], step
    ca = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    cb = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1])
    for name, t in cb["model"].items():
        assert torch.equal(ca["model"][name], t), (step, name)


@pytest.mark.distributed
def test_sigterm_to_the_whole_torchrun_job_stops_it_once(tiny_data, tmp_path):
    """SIGTERM to every process (SLURM signalling a job step): torchrun forwards it to workers
    that already have it, which is still one request: one checkpoint, one line, exits 143."""
    run_dir = tmp_path / "run"
    extra = {k: v for k, v in LONG.items() if k != "model.dropout"}
    job = start_train(tiny_overrides(tiny_data, "adamw", **extra) + [f"hydra.run.dir={run_dir}"],
                      tmp_path, torchrun=["--standalone", "--nproc_per_node=2"])
    _signal_at_random_step(job, run_dir, signal.SIGTERM, send=job.signal_all)
    code, out, err = job.finish()
    assert code != 0 and "received again" not in err, err[-3000:]
    summary = _summary(run_dir)
    assert summary["status"] == "preempted"
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"ckpt_{summary['step']:07d}.pt"
    [line] = [ln for ln in out.splitlines() if ln.startswith("preempted by SIGTERM")]
    assert line.endswith("[exit 143]")


def test_the_handler_that_was_there_runs_after_the_checkpoint(monkeypatch):
    """Under submitit, its preemption signal (SIGUSR2) also stops the run, and submitit's own
    handler (which requeues the job) is run by hand_over(), once the checkpoint is written."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)

    before = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with stop_on_signals() as request:
            signal.raise_signal(signal.SIGUSR2)
            assert request.signum == signal.SIGUSR2 and calls == []
            request.hand_over()
            assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_the_slurm_launcher_resubmits_the_same_job_and_may_requeue():
    """submitit requeues a job whose callable has checkpoint(): the launcher's returns the same
    call (sweep overrides, job number); the slurm config allows requeues after a time limit and
    signals early enough to checkpoint."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    launcher = SlurmLauncher()
    args = (["optimizer=sophia", "optimizer.lr=3e-4"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    again = launcher.checkpoint(*args)
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function is launcher and again.args == args and again.kwargs == {}
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.signal_delay_s >= 120


@pytest.mark.slow
def test_submitit_requeues_a_preempted_job_and_it_resumes(tiny_data, tmp_path):
    """End to end with submitit's local executor, which emulates SLURM's requeue: SIGUSR2 to the
    job at a random step; the job checkpoints, requeues itself, resumes and finishes."""
    sweep = tmp_path / "sweep"
    run_dir = sweep / "0"
    args = tiny_overrides(tiny_data, "adamw", **LONG)
    job = start_train(["-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", *args],
                      tmp_path)
    target = _signal_at_random_step(
        job, run_dir, signal.SIGUSR2,  # to the task: the run dir's lock names it
        send=lambda signum: os.kill(int((run_dir / ".lock").read_text().split("pid ")[1]),
                                    signum))
    code, out, err = job.finish()
    assert code == 0, err[-3000:]
    log = (run_dir / "train.log").read_text()
    step = int(re.search(r"preempted by SIGUSR2 at step (\d+)/120", log).group(1))
    assert step >= target
    assert f"resumed from {run_dir / 'checkpoints' / f'ckpt_{step:07d}.pt'} at step {step}" in log
    assert _summary(run_dir)["status"] == "done"
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, 121))
