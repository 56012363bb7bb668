"""benchmarks/gpu_check.{sh,py}, the GPU evidence pack: its plan fits the window and every command in
it is accepted by what it runs; it refuses cleanly without CUDA.

The pack only runs on a GPU machine, so the suite checks what can drift on a CPU: each phase's
command line parses with the script's own argument parser, or composes with Hydra and passes the
engine's config check, and the time caps add up to the 8 minutes the pack promises.
"""
from __future__ import annotations

import importlib

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config_check import check_config
from train_helpers import REPO, compose_cfg, load_script

gpu_check = importlib.import_module("benchmarks.gpu_check")


def _sweep(overrides: list[str]) -> list[list[str]]:
    """A multirun's override list -> one override list per job (comma lists expanded)."""
    jobs: list[list[str]] = [[]]
    for o in overrides:
        key, _, value = o.partition("=")
        values = value.split(",") if "," in value and not value.startswith("[") else [value]
        jobs = [job + [f"{key}={v}"] for job in jobs for v in values]
    return jobs


def test_dry_run_prints_every_phase_within_the_budget():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    phases = gpu_check.phases()
    for phase in phases:
        assert f"{phase.name}: cap {phase.cap_s} s" in done.stdout
    total = gpu_check.SETUP_S + sum(p.cap_s for p in phases)
    assert total <= gpu_check.BUDGET_S == 480  # 8 minutes, setup included
    assert f"total of the caps: {total} s" in done.stdout
    names = [p.name for p in phases]
    assert names == sorted(names) and phases[-1].optional  # most important evidence first


def test_every_command_of_the_plan_parses():
    seen = set()
    for phase in gpu_check.phases():
        for cmd in phase.commands:
            assert cmd[0] == "python", cmd
            if cmd[1:3] == ["-m", "pytest"]:
                assert ["-m", "gpu"] == cmd[4:6]
                seen.add("pytest")
            elif cmd[1] == "train.py":
                overrides = [o for o in cmd[3:] if not o.startswith("hydra.")]
                assert cmd[2] == "-m"
                for job in _sweep(overrides):
                    cfg = compose_cfg(job)
                    check_config(cfg)  # no unknown key, nothing unset
                    assert cfg.device == "cuda" and cfg.dtype == "bfloat16"
                seen.add("train")
            else:
                # a benchmark module (python -m benchmarks.NAME) or a user script (scripts/NAME.py)
                module = cmd[1] == "-m"
                name = cmd[2].split(".")[-1] if module else Path(cmd[1]).stem
                script = importlib.import_module(cmd[2]) if module else load_script(name)
                flags = cmd[3:] if module else cmd[2:]
                if hasattr(script, "parse_args"):
                    args = script.parse_args(flags)  # argparse exits on a bad flag
                    assert args.device == "cuda"
                else:  # a script that parses inside main(): its --help must list every flag
                    done = subprocess.run([sys.executable, *cmd[1:3 if module else 2], "--help"],
                                          capture_output=True, text=True, timeout=60, cwd=REPO)
                    assert all(f in done.stdout for f in flags if f.startswith("--")), cmd
                seen.add(name)
    assert seen == {"pytest", "train", "bench_optim", "bench_train", "compare"}


def test_the_smoke_covers_every_optimizer_with_compile_and_a_hessian_refresh():
    smoke = next(p for p in gpu_check.phases() if "smoke" in p.name).commands[0]
    optimizers = next(o for o in smoke if o.startswith("optimizer=")).split("=")[1].split(",")
    assert sorted(optimizers) == sorted(p.stem for p in (REPO / "configs" / "optimizer").glob("*.yaml")
                                        if "-" not in p.stem)  # adamw-nanogpt is adamw
    cfg = compose_cfg([o for o in smoke[3:] if o.startswith(("model", "train", "compile"))])
    assert cfg.compile and cfg.model.preset == "gpt2-small"
    assert cfg.train.max_steps >= compose_cfg(["optimizer=sophia"]).optimizer.k  # h is refreshed


def test_summary_judges_the_targets_from_the_benchmarks_json():
    results = {
        "2 optimizer step": {"bench_optim": {"models": [{"name": "gpt2-small", "rows": [
            {"optimizer": "adamw", "path": "fused", "ms_per_step": 10.0, "host_ms_per_step": 2.0},
            {"optimizer": "sophia", "path": "fused", "ms_per_step": 8.5,
             "host_ms_per_step": 8.33},
            {"optimizer": "lion", "path": "fused", "ms_per_step": 9.5},
            {"optimizer": "adamw", "path": "fused-twin", "ms_per_step": 10.3},
            {"optimizer": "floor", "path": "4R/3W", "ms_per_step": 9.0},
            {"optimizer": "floor", "path": "4R/2W", "ms_per_step": 7.8}]}]}},
        "3 training throughput": {"bench_train": {"settings": {"accum_steps": 10}, "rows": [
            {"optimizer": "adamw", "name": "adamw", "ratio_vs_adamw": 1.0,
             "hessian_micro_batches": None},
            {"optimizer": "sophia[hess 10/10]", "name": "sophia", "ratio_vs_adamw": 0.91,
             "hessian_micro_batches": 10},
            {"optimizer": "sophia[hess 1/10]", "name": "sophia", "ratio_vs_adamw": 0.94,
             "hessian_micro_batches": 1}]}},
    }
    lines = gpu_check.judge(results)
    assert "fused sophia step = 0.85x torch fused AdamW (target <= 0.9x: met)" in lines[0]
    assert "fused lion step = 0.95x" in lines[1] and "NOT met" in lines[1]
    assert "host share of each fused step's time: adamw 0.20, sophia 0.98 (" in lines[2]
    assert "identical torch fused AdamW took 1.03x the first" in lines[3]
    assert "floor of Sophia's access pattern = 0.87x AdamW's" in lines[4]
    assert "sophia[hess 10/10] = 0.910x AdamW tokens/s (target >= 0.9x: met)" in lines[5]
    assert "sophia[hess 1/10] = 0.940x AdamW tokens/s (target >= 0.95x: NOT met)" in lines[6]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_refuses_without_cuda_and_leaves_no_results_folder(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    for cmd in (["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                [sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path / "out")]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "no CUDA device" in done.stderr
        assert not (tmp_path / "out").exists()
