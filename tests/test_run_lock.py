"""One writer per run directory: a second run into a directory in use is refused in one line
naming the holder, without touching the first run; a run killed with -9 leaves no stale lock."""
from __future__ import annotations

import os
import signal
import socket

import pytest

from engine.errors import HarnessError
from engine.run import LOCK_FILE, RunLock
from process_helpers import start_train, wait_for
from train_helpers import read_metrics, run_train_cli, tiny_overrides


def test_the_lock_is_exclusive_names_its_holder_and_leaves_nothing(tmp_path):
    run_dir = tmp_path / "new" / "run"
    first, second = RunLock(run_dir), RunLock(run_dir)
    first.acquire()
    holder = f"host {socket.gethostname()}, pid {os.getpid()}"
    assert (run_dir / LOCK_FILE).read_text().strip() == holder
    with pytest.raises(HarnessError) as refused:
        second.acquire()
    assert str(refused.value).startswith(f"{run_dir} is in use by another run ({holder});")
    first.release()
    assert not (tmp_path / "new").exists()  # the lock file and the dirs it made are gone
    second.acquire()
    second.release()
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_into_a_busy_dir_is_refused_and_the_first_finishes(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 20})
    first = start_train(args + [f"hydra.run.dir={run_dir}"], tmp_path, script="hold_train.py",
                        env={"HOLD_AT_STEP": "5", "HOLD_FILE": str(tmp_path / "go")})
    wait_for(lambda: (tmp_path / "go.reached").exists() or first.proc.poll() is not None)
    kept = {p: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "train.log",
                                        run_dir / "metrics.jsonl", run_dir / ".hydra" /
                                        "overrides.yaml")}

    second = run_train_cli(args + ["train.log_interval=1", f"hydra.run.dir={run_dir}"],
                           cwd=tmp_path)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip() == (
        f"error: {run_dir} is in use by another run (host {socket.gethostname()}, pid "
        f"{first.proc.pid}); one run writes to a run directory at a time. Wait for it to end (or "
        f"stop it), or pass another hydra.run.dir.")
    assert kept == {p: p.read_bytes() for p in kept}  # nothing of the first run was touched

    (tmp_path / "go").touch()
    code, out, err = first.finish()
    assert code == 0, err[-3000:]
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == [5, 10, 15, 20]
    assert "in use" not in (run_dir / "train.log").read_text()
    assert not (run_dir / LOCK_FILE).exists()


def test_a_run_killed_with_sigkill_leaves_no_stale_lock(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 20}) + \
        [f"hydra.run.dir={run_dir}"]
    first = start_train(args, tmp_path, script="hold_train.py",
                        env={"HOLD_AT_STEP": "12", "HOLD_FILE": str(tmp_path / "never")})
    wait_for(lambda: (tmp_path / "never.reached").exists() or first.proc.poll() is not None)
    first.signal_all(signal.SIGKILL)
    assert first.finish()[0] == -signal.SIGKILL
    assert (run_dir / LOCK_FILE).exists()  # the file stays; the kernel has dropped the lock

    res = run_train_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ckpt_0000010.pt at step 10" in res.stdout
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [5, 10, 15, 20]
