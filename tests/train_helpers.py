"""Helpers for the tests: a tiny prepared corpus, config composition, loading a script."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from engine.optimizers import entries

REPO = Path(__file__).resolve().parents[1]
import train  # noqa: E402,F401  (registers the run_name resolver)


def load_script(name: str, module_name: str | None = None):
    """scripts/<name>.py as a fresh module, registered in sys.modules under `module_name` (default
    `name`): dataclasses look their module up there."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def tiny_overrides(data_dir: Path, optimizer: str = "adamw", **extra) -> list[str]:
    """A gpt2-nano run on the byte-tokenized test corpus: 8 sequences of 32 tokens per step."""
    base = {
        "optimizer": optimizer, "model": "gpt2-nano", "model.block_size": 32,
        "data": "prepared", "data.dir": str(data_dir), "device": "cpu",
        "train.max_steps": 30, "train.global_batch_tokens": 256, "train.micro_batch_size": 4,
        "train.warmup_steps": 5, "train.log_interval": 5, "train.eval_interval": 10,
        "train.eval_batches": 2, "checkpoint.interval": 10,
    }
    if entries()[optimizer].hessian:
        base["optimizer.k"] = 5
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_train_cli(args: list[str], cwd: Path, *, torchrun_nproc: int | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` (or under torchrun) as a user would type it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun_nproc}", str(REPO / "train.py"), *args]
    else:
        cmd = [sys.executable, str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
