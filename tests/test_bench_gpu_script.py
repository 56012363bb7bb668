"""scripts/bench_gpu.sh: its benchmark commands parse, and it refuses to run without CUDA.

The script only runs on a GPU machine, so the suite checks what can drift on a CPU: every
`python scripts/<bench>.py ...` line in it must be accepted by that script's own argument parser.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from train_helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_gpu.sh"


def _commands() -> list[tuple[str, list[str]]]:
    """(script name, argv) for every benchmark command in bench_gpu.sh."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        match = re.match(r"\s*python scripts/(bench_\w+)\.py (.*)", line)
        if match:
            args = match.group(2).split("|")[0]  # drop the `| tee ...` tail
            args = args.replace('"$out', '"OUT').replace('"$data"', "prepared/stdlib-gpt2")
            found.append((match.group(1), shlex.split(args)))
    return found


def test_every_benchmark_command_in_the_script_parses() -> None:
    commands = _commands()
    names = [name for name, _ in commands]
    assert names == ["bench_optim", "bench_train", "bench_train", "bench_hessian"], names
    for name, argv in commands:
        args = load_script(name).parse_args(argv)  # argparse exits on an unknown or malformed flag
        assert args.device == "cuda", (name, argv)
        assert str(args.json).startswith("OUT/"), (name, args.json)
    small = load_script("bench_train").parse_args(commands[1][1])
    assert small.model == "gpt2-small" and small.compile and small.nanogpt_baseline
    assert small.data == "prepared/stdlib-gpt2"  # GPT-2 tokens, not the byte corpus


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_refuses_without_cuda(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing measured: not even an empty results folder
