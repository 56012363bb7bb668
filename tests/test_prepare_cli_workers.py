"""`python -m data.prepare ... --workers N` as a user runs it: the worker processes are spawned
from a __main__ that is data/prepare.py itself, and must still find the encoding function."""
from __future__ import annotations

import os
import subprocess
import sys

from train_helpers import REPO


def test_the_cli_with_several_workers_writes_what_one_worker_writes(tmp_path, shakespeare_path):
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        done = subprocess.run(
            [sys.executable, "-m", "data.prepare", str(shakespeare_path), "--tokenizer", "byte",
             "--out", str(out), "--workers", str(workers), "--no-progress"],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
            text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outs[workers] = [(out / f"{split}.bin").read_bytes() for split in ("train", "val")]
    assert outs[1] == outs[2] and len(outs[1][0]) > 0
