"""The end-of-run summary (summary.json, the console block) and the multirun table."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from engine.run_dir import read_metrics
from engine.summary import format_summary, summarize_run, write_summary
from engine.sweep_callback import RunTable, read_overrides

ALL_KEYS = {"run_dir", "optimizer", "model", "status", "step", "max_steps", "val_loss",
            "val_loss_step", "best_val_loss", "best_val_loss_step", "train_loss", "tokens",
            "tokens_hessian", "flops", "elapsed_s", "throughput", "memory_peak_bytes",
            "diverged", "loss_spikes", "branch", "checkpoint", "next_commands"}


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def write_run(run_dir: Path, rows: list[dict], *, optimizer="sophia", max_steps=40,
              stop_at_step=None, checkpoints=(), overrides=None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"optimizer": {"name": optimizer, "lr": 6e-4}, "model": {"preset": "gpt2-nano"},
           "train": {"max_steps": max_steps, "stop_at_step": stop_at_step}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step in checkpoints:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / f"ckpt_{step:07d}.pt").write_bytes(b"")
    if overrides is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return run_dir


def train_row(step: int, loss: float, **extra) -> dict:
    return {"step": step, "tokens": 1000 * step, "tokens_hessian": 100 * step,
            "flops": 1e9 * step, "time/elapsed": 0.5 * step, "train/loss": loss, "lr": 1e-3,
            "memory/peak": 1000 + step, **extra}


def normal_rows(last_step: int = 40, eval_every: int = 20) -> list[dict]:
    rows = [{"step": 0, "tokens": 0, "tokens_hessian": 0, "flops": 0.0, "time/elapsed": 0.0,
             "val/loss": 5.0}]
    for step in range(10, last_step + 1, 10):
        extra = {"val/loss": 4.0 - step / 100} if step % eval_every == 0 else {}
        rows.append(train_row(step, 4.5 - step / 100, **extra))
    return rows


def test_finished_run(tmp_path):
    run = write_run(tmp_path / "run", normal_rows(), checkpoints=(20, 40))
    s = summarize_run(run)
    assert set(s) == ALL_KEYS
    assert s["status"] == "done" and s["step"] == 40 and s["max_steps"] == 40
    assert s["val_loss"] == pytest.approx(3.6) and s["val_loss_step"] == 40
    assert s["best_val_loss"] == pytest.approx(3.6) and s["best_val_loss_step"] == 40
    assert s["train_loss"] == pytest.approx(4.1)
    assert (s["tokens"], s["tokens_hessian"], s["flops"]) == (40000, 4000, 4e10)
    assert s["elapsed_s"] == 20.0 and s["throughput"] == pytest.approx(2000.0)
    assert s["memory_peak_bytes"] == 1040
    assert (s["optimizer"], s["model"], s["run_dir"]) == ("sophia", "gpt2-nano", str(run))
    ckpt = run / "checkpoints" / "ckpt_0000040.pt"
    assert s["checkpoint"] == str(ckpt)
    assert s["next_commands"] == [f"python scripts/compare.py {run}",
                                  f"python scripts/sample.py {run}"]
    assert s["diverged"] is None and s["loss_spikes"] == []


def test_instability_is_recorded_in_the_summary(tmp_path):
    rows = normal_rows(last_step=200, eval_every=100)
    rows[15]["train/loss"] *= 2  # step 150: far above the median of the ten points before it
    rows[-1]["val/loss"] = 5.5  # the final val loss ends above the step-0 one (5.0)
    s = summarize_run(write_run(tmp_path / "run", rows, max_steps=200, checkpoints=(200,)))
    assert s["loss_spikes"] == [150]
    assert s["diverged"]["step"] == 200 and "above the first" in s["diverged"]["reason"]
    block = format_summary(s)
    assert "DIVERGED: final val/loss 5.5" in block and "1 loss spike (steps 150)" in block
    rows = normal_rows()
    rows[2]["train/loss"] = "nan"
    s = summarize_run(write_run(tmp_path / "nan", rows, checkpoints=(40,)))
    assert s["diverged"] == {"step": 20, "reason": "non-finite train/loss (nan) at step 20"}


def test_stopped_early_between_evals(tmp_path):
    # stop_at_step=30 with evals every 20: the last val is at 20, the checkpoint at 30 and the last
    # log line at 30. Today's summary.json would hold NaN here when no eval ran in the invocation.
    run = write_run(tmp_path / "run", normal_rows(last_step=30), max_steps=40, stop_at_step=30,
                    checkpoints=(30,))
    s = summarize_run(run)
    assert s["status"] == "stopped" and s["step"] == 30
    assert s["val_loss"] == pytest.approx(3.8) and s["val_loss_step"] == 20
    path = write_summary(run, s)
    assert strict_json(path.read_text()) == s
    assert not list(run.glob(".summary.json*"))  # no temp file left behind


def test_checkpoint_past_the_last_log_line_counts_as_steps_done(tmp_path):
    run = write_run(tmp_path / "run", normal_rows(last_step=30), stop_at_step=35,
                    checkpoints=(35,))
    assert summarize_run(run)["step"] == 35


def test_no_val_at_all_is_null_and_strict_json(tmp_path):
    rows = [train_row(10, 4.4), train_row(20, 4.3)]
    run = write_run(tmp_path / "run", rows, max_steps=100)
    s = summarize_run(run)
    assert s["val_loss"] is None and s["val_loss_step"] is None
    assert s["best_val_loss"] is None and s["best_val_loss_step"] is None
    assert s["status"] == "incomplete" and s["checkpoint"] is None
    assert s["next_commands"] == [f"python scripts/compare.py {run}"]  # nothing to sample from
    assert strict_json(write_summary(run, s).read_text())["val_loss"] is None


def test_nan_strings_become_null_and_best_skips_them(tmp_path):
    rows = normal_rows()
    rows[2]["val/loss"] = "nan"  # step 20
    rows[-1].update({"train/loss": "nan", "val/loss": "inf", "time/elapsed": "nan"})  # step 40
    run = write_run(tmp_path / "run", rows)
    s = summarize_run(run)
    assert s["val_loss"] is None and s["val_loss_step"] == 40  # the last eval, and it diverged
    assert s["best_val_loss"] == pytest.approx(5.0) and s["best_val_loss_step"] == 0
    assert s["train_loss"] is None and s["elapsed_s"] is None and s["throughput"] is None
    text = write_summary(run, s).read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict_json(text)


def test_write_summary_nulls_nonfinite_values_a_caller_added(tmp_path):
    path = write_summary(tmp_path, {"val_loss": math.nan, "extra": [math.inf, 1.0], "step": 3})
    assert strict_json(path.read_text()) == {"val_loss": None, "extra": [None, 1.0], "step": 3}


def test_rolled_back_rows_and_a_torn_last_line_are_dropped(tmp_path):
    rows = normal_rows()
    rows.insert(3, train_row(30, 1.0, **{"val/loss": 0.5}))  # an abandoned branch at step 30...
    rows.insert(4, train_row(40, float("nan")))
    run = write_run(tmp_path / "run", rows)  # ...re-run from step 30 after a rollback to 20
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "train/lo')
    kept = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in kept] == [0, 10, 20, 30, 40]
    s = summarize_run(run)
    assert s["best_val_loss"] == pytest.approx(3.6) and s["train_loss"] == pytest.approx(4.1)


def test_empty_or_missing_run_dir(tmp_path):
    s = summarize_run(tmp_path / "nothing")
    assert s["status"] == "no metrics" and s["step"] is None and s["optimizer"] is None
    strict_json(json.dumps(s, allow_nan=False))
    format_summary(s)  # must not raise on an all-null summary


def test_format_summary_is_short_and_aligned(tmp_path):
    run = write_run(tmp_path / "run", normal_rows(last_step=30), stop_at_step=30,
                    checkpoints=(30,))
    text = format_summary(summarize_run(run))
    lines = text.splitlines()
    assert len(lines) <= 12
    for expected in ("sophia on gpt2-nano", "30/40 [stopped]", "3.8000 at step 20",
                     "30.00k (Hessian 3.00k), 3.00e+10 FLOPs", "15s training", "2,000 tok/s",
                     "ckpt_0000030.pt", "python scripts/sample.py"):
        assert expected in text
    column = 2 + len("checkpoint") + 2  # the longest label
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines)


# ------------------------------------------------------------------------- multirun table
def sweep_config(sweep_dir: Path):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})


def table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0].split("|")[1].strip() == "job" and set(lines[1]) <= {"|", "-"}
    assert len({len(line) for line in lines}) == 1  # padded: aligned in a terminal too
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_run_table_lists_every_job(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", normal_rows(), checkpoints=(40,),
              overrides=["optimizer=sophia", "optimizer.lr=1e-3", "wandb.mode=offline",
                         "hydra.launcher.n_jobs=2", "data.dir=/data/owt", "seed=1"])
    write_run(sweep / "1", normal_rows(last_step=20), overrides=["optimizer.lr=3e-3", "seed=1"])
    (sweep / "2" / ".hydra").mkdir(parents=True)  # died before its first metrics line
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=1e-2\n- seed=1\n")
    (sweep / "10").mkdir()  # sorted as a number, after 2
    (sweep / "10" / "metrics.jsonl").mkdir()  # not readable as a file
    (sweep / "notes").mkdir()  # not a job

    RunTable().on_multirun_end(sweep_config(sweep))

    table = (sweep / "summary.md").read_text()
    assert table in capsys.readouterr().out
    assert table.startswith("All jobs: `seed=1`\n")  # shared overrides once, not in every row
    rows = table_rows(table)
    assert rows == [
        ["0", "optimizer=sophia optimizer.lr=1e-3", "3.6000", "3.6000", "40/40", "20s", "done"],
        ["1", "optimizer.lr=3e-3", "3.8000", "3.8000", "20/40", "10s", "failed"],
        ["2", "optimizer.lr=1e-2", "-", "-", "-", "-", "no metrics"],
        ["10", "?", "-", "-", "-", "-", "no metrics"],
    ]


def test_an_unreadable_job_costs_its_row_only(tmp_path, monkeypatch, capsys):
    import engine.sweep_callback as sweep_callback

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        write_run(sweep / job, normal_rows(), overrides=[f"seed={job}"])

    def summarize(run_dir):
        if run_dir.name == "0":
            raise PermissionError(run_dir)
        return summarize_run(run_dir)

    monkeypatch.setattr(sweep_callback, "summarize_run", summarize)
    RunTable().on_multirun_end(sweep_config(sweep))
    rows = table_rows((sweep / "summary.md").read_text())
    assert rows[0][1:] == ["seed=0", "-", "-", "-", "-", "unreadable (PermissionError)"]
    assert rows[1][-1] == "done"


def test_run_table_marks_jobs_hydra_reported_failed(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus

    sweep = tmp_path / "sweep"
    write_run(sweep / "0", normal_rows(), overrides=["seed=1"])
    job_cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(sweep / "0")},
                                          "mode": "MULTIRUN", "sweep": {"dir": "elsewhere"}}})
    table = RunTable(print_fn=lambda *a, **k: None)
    ret = JobReturn()
    ret.status = JobStatus.FAILED
    table.on_job_end(job_cfg, job_return=ret)
    assert "failed" in (sweep / "summary.md").read_text()  # refreshed after each job
    # The dir the jobs used wins over re-resolving hydra.sweep.dir.
    table.on_multirun_end(sweep_config(tmp_path / "elsewhere"))
    assert (sweep / "summary.md").exists() and not (tmp_path / "elsewhere").exists()


def test_run_table_never_crashes_the_sweep(tmp_path, capsys):
    RunTable().on_multirun_end(sweep_config(tmp_path / "missing"))
    RunTable().on_multirun_end(OmegaConf.create({}))
    captured = capsys.readouterr()
    assert "no job dirs" in captured.out and "could not summarise" in captured.err


def test_read_overrides_drops_hydra_wandb_and_paths(tmp_path):
    write_run(tmp_path, [], overrides=["+hydra.job.env_set.X=1", "hydra/launcher=slurm",
                                       "~wandb.entity", "checkpoint.resume=../run/ckpt.pt",
                                       "data=openwebtext", "++optimizer.rho=0.05"])
    assert read_overrides(tmp_path) == ["data=openwebtext", "++optimizer.rho=0.05"]
    assert read_overrides(tmp_path / "absent") is None


def test_read_overrides_drops_every_result_neutral_override(tmp_path):
    write_run(tmp_path, [], overrides=["checkpoint.interval=50", "train.log_interval=1",
                                       "device=cuda:1", "eval.hellaswag_limit=10", "seed=2",
                                       "train.max_steps=400"])
    assert read_overrides(tmp_path) == ["seed=2", "train.max_steps=400"]
