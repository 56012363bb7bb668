"""benchmarks/bench_train.py: one tiny round-robin run of AdamW and Sophia, its JSON and table."""
from __future__ import annotations

import importlib

import json

import pytest
import torch

from engine.errors import HarnessError


bench = importlib.import_module("benchmarks.bench_train")

# 2 micro-batches of 4 x 32 tokens per step; k=2 so a 4-step pass holds exactly 2 refreshes.
TINY = ["--model", "gpt2-nano", "--block-size", "32", "--micro-batch-size", "4",
        "--batch-tokens", "256", "--steps", "4", "--k", "2", "--warmup", "2", "--repeats", "1",
        "--threads", "1"]


@pytest.fixture(scope="module")
def result(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    rc = bench.main([*TINY, "--optimizers", "adamw,sophia", "--hessian-micro-batches", "all,1/2",
                     "--data", str(tiny_data), "--json", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # --threads must not leak into the caller
    return json.loads(out.read_text())


def test_json_has_a_row_per_optimizer_with_positive_throughput(result):
    labels = [r["optimizer"] for r in result["rows"]]
    assert labels == ["adamw", "sophia[hess 2/2]", "sophia[hess 1/2]"]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
        # tokens/s and ms/step come from the same clean pass of 4 steps x 256 tokens.
        assert row["tokens_per_s"] == pytest.approx(256 / (row["ms_per_step"] / 1e3), rel=1e-9)
        assert row["mfu"] is None and row["peak_mem_mb"] is None  # CPU: unknown, not invented
        assert row["state_mb"] > 0
    assert result["rows"][0]["ratio_vs_adamw"] == 1.0
    for key in ("device", "device_name", "torch", "date", "command", "settings"):
        assert result[key]
    assert result["torch"] == torch.__version__
    assert result["command"].startswith("python -m benchmarks.bench_train --model gpt2-nano")
    assert result["settings"]["accum_steps"] == 2 and result["settings"]["k"] == 2


def test_breakdown_phases_tile_the_step(result):
    """fwd+bwd, optimizer and Hessian are disjoint intervals of one instrumented step, so their sum
    can never exceed the step; what is left (``other``: zero_grad and Python glue between the
    phases) is microseconds against a millisecond step. 20% leaves room for a scheduler
    preemption landing in a gap on a shared 2-core machine, and still catches a phase that is
    double-counted or missed."""
    for row in result["rows"]:
        phases = row["fwd_bwd_ms"] + row["optim_ms"] + row["hessian_ms"]
        assert phases <= row["step_ms"] * (1 + 1e-9)
        assert phases == pytest.approx(row["step_ms"], rel=0.2)
        assert row["other_ms"] == pytest.approx(row["step_ms"] - phases, abs=1e-9)
        assert row["fwd_bwd_ms"] > 0 and row["optim_ms"] > 0  # the step hooks really fired


def test_hessian_cost_only_for_sophia(result):
    adamw, full, half = result["rows"]
    assert adamw["hessian_ms"] == 0 and adamw["hessian_tokens_per_refresh"] == 0
    assert full["hessian_ms"] > 0 and half["hessian_ms"] > 0
    # bs follows the Hessian batch: all micro-batches = one step's tokens, 1/2 = half of them.
    assert full["hessian_tokens_per_refresh"] == 256 and half["hessian_tokens_per_refresh"] == 128


def test_table_lists_every_row(result):
    table = bench.format_table(result).splitlines()
    assert table[0].startswith("| optimizer | tokens/s | vs adamw | ms/step | fwd+bwd ms")
    assert len(table) == 2 + len(result["rows"])
    assert "| adamw |" in table[2] and "n/a" in table[2]  # MFU on CPU


def test_hessian_micro_batches_spec():
    assert bench.hessian_micro_batches("all", 8) is None
    assert bench.hessian_micro_batches("3", 8) == 3
    assert bench.hessian_micro_batches("1/8", 8) == 1
    assert bench.hessian_micro_batches("0.25", 8) == 2
    assert bench.hessian_micro_batches("1/16", 8) == 1  # never zero micro-batches
    for bad in ("0", "9", "0/1", "1.5", "half"):
        with pytest.raises(HarnessError, match="hessian-micro-batches"):
            bench.hessian_micro_batches(bad, 8)


def test_steps_must_be_a_multiple_of_k(tiny_data, capsys):
    # argparse keeps the last --steps: 3 steps would hold one refresh or two depending on phase.
    rc = bench.main([*TINY, "--steps", "3", "--optimizers", "sophia", "--data", str(tiny_data)])
    assert rc == 2
    assert "not a multiple of --k=2" in capsys.readouterr().err


def test_unknown_optimizer_is_skipped_with_a_note(tiny_data, capsys):
    rc = bench.main([*TINY, "--optimizers", "adamw,nosuch", "--data", str(tiny_data)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "optimizer 'nosuch' skipped" in out and "| adamw |" in out


def test_nanogpt_baseline_row_trains_the_same_model_on_the_same_batches(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main([*TINY, "--optimizers", "adamw", "--nanogpt-baseline",
                     "--data", str(tiny_data), "--json", str(out)])
    assert rc == 0
    rows = {r["optimizer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"adamw", "nanogpt-loop"}
    assert rows["nanogpt-loop"]["tokens_per_s"] > 0 and rows["nanogpt-loop"]["hessian_ms"] == 0
    # Same parameter count and AdamW state (exp_avg + exp_avg_sq per parameter) as the engine's.
    assert rows["nanogpt-loop"]["state_mb"] == pytest.approx(rows["adamw"]["state_mb"])


def test_nanogpt_baseline_needs_adamw(tiny_data):
    assert bench.main([*TINY, "--optimizers", "sophia", "--nanogpt-baseline",
                       "--data", str(tiny_data)]) == 2


def test_a_gpt2_size_on_byte_tokens_is_flagged_as_not_gpt2(tiny_data, capsys):
    # The note comes before any model is built; the over-long block then stops the run cheaply.
    rc = bench.main(["--model", "gpt2-small", "--block-size", "4096", "--optimizers", "adamw",
                     "--data", str(tiny_data)])
    captured = capsys.readouterr()
    assert rc == 2 and "longer than gpt2-small's block size" in captured.err
    assert "throughput and MFU are not GPT-2's" in captured.out
    assert "--tokenizer gpt2" in captured.out
    rc = bench.main([*TINY, "--optimizers", "adamw", "--data", str(tiny_data)])
    assert rc == 0 and "not GPT-2's" not in capsys.readouterr().out  # tiny presets: no note
