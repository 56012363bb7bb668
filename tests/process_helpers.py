"""Runs started in the background, to be signalled, killed or raced while they train."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from train_helpers import REPO, read_metrics


@dataclass
class Launched:
    """A ``train.py`` (or torchrun) process group started by :func:`start_train`."""

    proc: subprocess.Popen
    out: Path
    err: Path

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        """Wait for the process; its exit code, stdout and stderr."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        return code, self.out.read_text(), self.err.read_text()

    def signal_all(self, signum: int) -> None:
        """``signum`` to every process of the run, launcher and workers, as SLURM signals every
        process of a job step (torchrun's workers have process groups of their own, so a
        terminal's Ctrl-C reaches only torchrun, which forwards it)."""
        workers = descendants(self.proc.pid)
        os.killpg(self.proc.pid, signum)
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def start_train(args: list[str], cwd: Path, *, script: str = "train.py", env: dict | None = None,
                torchrun: list[str] | None = None, name: str = "run") -> Launched:
    """``python SCRIPT ARGS`` (SCRIPT: train.py or a file in tests/), or under
    ``torchrun TORCHRUN...``, in its own process group, output into files beside ``cwd``."""
    path = REPO / script if script == "train.py" else REPO / "tests" / script
    cmd = [sys.executable, str(path), *args]
    if torchrun is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun, str(path), *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    out, err = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=fo, stderr=fe,
                                start_new_session=True)
    return Launched(proc, out, err)


def wait_for(condition: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    """Poll ``condition`` until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what or condition}")
        time.sleep(0.01)


def last_logged_step(run_dir: Path) -> int:
    """The step of the last complete line of ``metrics.jsonl`` (-1 when none)."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().split("\n")[:-1]
    except FileNotFoundError:
        return -1
    return json.loads(lines[-1])["step"] if lines else -1


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (from /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """The pids of every process below ``pid``."""
    below = children(pid)
    return below + [d for child in below for d in descendants(child)]


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (read from /proc), or None."""
    for child in children(launcher_pid):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return child
    return None


def assert_metrics_match(run_dir: Path, other: Path,
                         keys: tuple[str, ...] = ("train/loss", "val/loss")) -> None:
    """Two runs (N ranks and one process, say) logged the same steps and token counts, and
    ``keys`` equal to float rounding."""
    a, b = read_metrics(run_dir), read_metrics(other)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)
        assert ra["tokens"] == rb["tokens"], ra["step"]
