"""train.py as a user runs it: Hydra composition, sweeps, W&B offline, torchrun DDP, bad input."""
from __future__ import annotations


import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.run import run
from process_helpers import assert_metrics_match
from train_helpers import REPO, compose_cfg, read_metrics, run_train_cli, tiny_overrides

GROUPS = {g: sorted(p.stem for p in (REPO / "configs" / g).glob("*.yaml"))
          for g in ("model", "optimizer", "data")}
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")
                     if not p.stem.endswith("_base"))


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}", "data.source=x.txt"])
    assert cfg[group] is not None
    if group == "optimizer":
        assert cfg.optimizer.name == option.split("-")[0] and cfg.optimizer.lr > 0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    if experiment.startswith("paper-"):
        size, opt = experiment.removesuffix("-fair").split("-")[1:]
        assert cfg.optimizer.name == opt
        assert cfg.model.preset == {"125m": "gpt2-small", "355m": "gpt2-medium",
                                    "770m": "gpt2-large"}[size]
        assert cfg.train.global_batch_tokens == 480 * 1024 and cfg.data.name == "openwebtext"


def test_paper_presets_carry_published_hyperparameters():
    cfg = compose_cfg(["experiment=paper-355m-sophia"])
    assert (cfg.optimizer.lr, cfg.optimizer.rho, cfg.optimizer.weight_decay) == (7e-4, 0.08, 0.2)
    cfg = compose_cfg(["experiment=paper-770m-lion"])
    assert cfg.optimizer.lr == 8e-5 and cfg.model.scale_attn_by_inverse_layer_idx


@pytest.mark.slow
def test_multirun_2x2_writes_four_runs_and_wandb_offline(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny_overrides(tiny_data, "sophia", **{"train.max_steps": 4, "train.eval_interval": 0,
                                                 "checkpoint.interval": 0, "wandb.mode": "offline"})
    res = run_train_cli(["-m", *args, "optimizer.lr=1e-3,2e-3", "optimizer.rho=0.03,0.05",
                         f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    seen = set()
    for run_dir in runs:
        rows = read_metrics(run_dir)
        assert rows[-1]["step"] == 4
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        seen.add(tuple(line for line in overrides.splitlines() if "lr=" in line or "rho=" in line))
        offline = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline  # one W&B run per job
    assert len(seen) == 4


@pytest.mark.parametrize("extra,message", [
    (["optimizer=adamw", "optimizer.lr=-1"], "optimizer.lr=-1"),
    (["optimizer=sophia", "optimizer.rho=0"], "rho"),
    (["optimizer=sophia", "optimizer.k=0"], "optimizer.k=0"),
    (["optimizer=lion", "optimizer.betas=[1.5,0.99]"], "beta"),
    (["optimizer=muon", "optimizer.ns_steps=0"], "ns_steps"),
    (["optimizer=muon", "optimizer.momentum=1.0"], "momentum"),
    (["optimizer=muon", "optimizer.adjust_lr_fn=foo"], "match_rms_adamw"),
    (["train.global_batch_tokens=288"], "not a multiple of 4 x 1"),
    (["train.block_size=128"], "longer than the model's block size"),
    (["model.vocab_size=128"], "smaller than the data's vocabulary"),
])
def test_bad_inputs_are_refused_with_a_message(extra, message, tiny_data, tmp_path):
    """The bad inputs a CLI user can hit (docs/runs.md#config-checks-and-errors), checked in-process: the
    error names the value, and the refused run writes nothing."""
    from data.errors import DataError
    from engine.errors import HarnessError

    args = tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 2}) + extra
    with pytest.raises((HarnessError, DataError), match=message.replace(".", r"\.")
                       .replace("[", r"\[")):
        run(compose_cfg(args), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_group_option_and_missing_data_are_refused(tmp_path):
    from hydra.errors import MissingConfigException

    from data.errors import DataError

    with pytest.raises(MissingConfigException) as err:
        compose_cfg(["optimizer=adam"])
    assert "adamw" in str(err.value) and "sophia" in str(err.value)
    with pytest.raises(DataError, match="python -m data.prepare"):
        run(compose_cfg(tiny_overrides(tmp_path / "nowhere", "adamw")), tmp_path / "run")


def test_a_bad_input_exits_2_with_one_paragraph_and_no_traceback(tiny_data, tmp_path):
    args = tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 2}) + ["optimizer.lr=-1"]
    res = run_train_cli(args + [f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "error: optimizer.lr=-1 must be a positive finite number."


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", ["sophia", "muon"])
def test_torchrun_two_ranks_match_one_process(optimizer, tiny_data, tmp_path):
    """2 gloo ranks x 1 micro-batch == 1 process x 2 micro-batches, same global batch."""
    extra = {"train.max_steps": 10, "checkpoint.interval": 0,
             "train.eval_interval": 5, "train.log_interval": 5}
    if optimizer == "sophia":
        extra["optimizer.k"] = 3
    ddp_dir = tmp_path / "ddp"
    res = run_train_cli(tiny_overrides(tiny_data, optimizer, **extra) + [f"hydra.run.dir={ddp_dir}"],
                        cwd=tmp_path, torchrun_nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # one run dir
    assert len(list(ddp_dir.glob("metrics*.jsonl"))) == 1

    single = tmp_path / "single"
    run(compose_cfg(tiny_overrides(tiny_data, optimizer, **extra)), single)
    assert_metrics_match(ddp_dir, single)
    ca = load_checkpoint(list_checkpoints(ddp_dir / "checkpoints")[-1])
    cb = load_checkpoint(list_checkpoints(single / "checkpoints")[-1])
    assert ca["rank_divergence"] == 0.0  # parameters and h identical on both ranks
    muon_atol = _muon_bf16_atol(compose_cfg(tiny_overrides(tiny_data, optimizer, **extra)))
    for name, t in cb["model"].items():
        atol = muon_atol(name, t) if optimizer == "muon" else None
        if atol is None:
            torch.testing.assert_close(ca["model"][name], t, rtol=1e-4, atol=1e-5)
        else:
            diff = (ca["model"][name] - t).abs().max().item()
            assert diff <= atol, (name, diff, atol)
    if optimizer == "sophia":
        ha = [s["hessian"] for s in ca["optimizer"]["state"].values()]
        hb = [s["hessian"] for s in cb["optimizer"]["state"].values()]
        assert len(ha) == len(hb) > 0
        for x, y in zip(ha, hb):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-9)


@pytest.mark.distributed
def test_torchrun_two_ranks_match_one_process_with_gnb_msq(tiny_data, tmp_path):
    """gnb_msq under DDP: each rank squares its own micro-batch's sampled-label gradient (no
    gradient all-reduce) and one all-reduce sums the squares, so 2 gloo ranks x 1 micro-batch give
    the Hessian estimate of 1 process x 2 micro-batches (same rows, same label draws)."""
    extra = {"train.max_steps": 10, "checkpoint.interval": 0, "train.eval_interval": 5,
             "train.log_interval": 5, "optimizer.k": 3, "optimizer.hessian_estimator": "gnb_msq"}
    ddp_dir = tmp_path / "ddp"
    res = run_train_cli(tiny_overrides(tiny_data, "sophia", **extra) + [f"hydra.run.dir={ddp_dir}"],
                        cwd=tmp_path, torchrun_nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    single = tmp_path / "single"
    run(compose_cfg(tiny_overrides(tiny_data, "sophia", **extra)), single)
    assert_metrics_match(ddp_dir, single, keys=("train/loss", "val/loss", "hessian/l1",
                                                "tokens_hessian"))
    ca = load_checkpoint(list_checkpoints(ddp_dir / "checkpoints")[-1])
    cb = load_checkpoint(list_checkpoints(single / "checkpoints")[-1])
    assert ca["rank_divergence"] == 0.0  # parameters and h identical on both ranks
    ha = [s["hessian"] for s in ca["optimizer"]["state"].values()]
    hb = [s["hessian"] for s in cb["optimizer"]["state"].values()]
    assert len(ha) == len(hb) > 0 and all(h.abs().sum() > 0 for h in hb)  # 3 refreshes happened
    for x, y in zip(ha, hb):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-9)
    for name, t in cb["model"].items():
        torch.testing.assert_close(ca["model"][name], t, rtol=1e-4, atol=1e-5)


def _muon_bf16_atol(cfg):
    """Per-parameter bound on how far 1 and 2 processes may drift apart on Muon's side.

    torch.optim.Muon runs Newton-Schulz in bfloat16 (hard-coded), so the float32 rounding
    difference between one all-reduce and a local accumulation can flip a bf16 rounding of the
    orthogonalised update, and which elements flip depends on the CPU's bf16 matmul kernels
    (AMD and Intel differ). Each step moves an element by lr_t * sqrt(max(1, rows/cols)) * O_ij
    with |O_ij| <= ~1.5, and a flip changes O_ij by a few bf16 ulps (2**-8 relative), so the gap
    after T steps is at most ~ 4 * 2**-8 * sum_t lr_t * scale. A real DDP bug (wrong rows on a
    rank, gradients not averaged before Newton-Schulz) changes O by order 1, i.e. the whole
    movement of the matrix, far above this bound. Parameters Muon does not own keep the tight
    float32 tolerance (None).
    """
    import fnmatch

    from engine.build import lr_schedule

    t, schedule = cfg.train, lr_schedule(cfg)
    lr_sum = sum(cfg.optimizer.lr * schedule(s) for s in range(t.max_steps))

    def atol(name, tensor):
        owned = tensor.dim() == 2 and any(fnmatch.fnmatch(name, pat)
                                          for pat in cfg.optimizer.muon_include)
        if not owned:
            return None
        rows, cols = tensor.shape
        return 4 * 2.0 ** -8 * lr_sum * max(1.0, rows / cols) ** 0.5

    return atol


@pytest.mark.distributed
def test_elastic_restart_resumes_from_last_checkpoint(tiny_data, tmp_path):
    """A rank killed mid-run under torchrun --max-restarts=1: the restarted job resumes from the
    last checkpoint of the same run dir and finishes; metrics have no duplicated steps."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_data, "sophia", **{"train.max_steps": 10, "checkpoint.interval": 5,
                                                 "train.log_interval": 1, "train.eval_interval": 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", str(REPO / "tests" / "fault_train.py"), *args,
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FAULT_STEP": "7"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "resumed from" in out and "ckpt_0000005.pt" in out
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, 11))


@pytest.mark.slow
def test_readme_quickstart_as_written_gives_one_sweep_dir_that_compare_reads(tmp_path):
    """The README's quickstart block in a fresh directory with default output dirs (only
    train.max_steps smaller): the corpus is prepared once, the single run and the 4-optimizer
    multirun write where the README says, compare.py reads all four runs, sample.py a run dir."""
    import json
    import subprocess
    import sys

    steps = "train.max_steps=4"
    res = run_train_cli(["experiment=quickstart", "optimizer=sophia", steps], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "prepared" / "stdlib-byte" / "meta.json").exists()
    [single] = list((tmp_path / "outputs").glob("*/*_sophia"))
    summary = json.loads((single / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["step"] == 4 and summary["val_loss"] < summary["train_loss"] + 1
    log = (single / "train.log").read_text()
    assert "step      4/4 (100%)" in log and "python scripts/compare.py" in log

    res = run_train_cli(["-m", "experiment=quickstart", "optimizer=adamw,lion,sophia,muon", steps],
                        cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [sweep] = list((tmp_path / "multirun").glob("*/*_sweep"))  # one sweep dir, not one per job
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    table = (sweep / "summary.md").read_text()
    for i, name in enumerate(("adamw", "lion", "sophia", "muon")):
        assert read_metrics(sweep / str(i))[-1]["step"] == 4
        assert f"optimizer={name}" in table
    assert "| done" in res.stdout  # the closing table of the multirun

    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(sweep)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "skipping" not in res.stderr, res.stderr[-3000:]
    speedup = json.loads((tmp_path / "compare_out" / "speedup.json").read_text())
    assert set(speedup["runs"]) == {"adamw", "lion", "sophia", "muon"}
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), str(sweep / "2"),
                          "--prompt", "def ", "--max-new-tokens", "8"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "experiment=paper-125m-sophia"],
                      return_hydra_config=True)
    assert "SlurmLauncher" in cfg.hydra.launcher._target_
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 8


@pytest.mark.slow
def test_optuna_sweep_minimises_final_val_loss(tiny_data, tmp_path):
    """With the default sweep dir: every trial and the sweeper's result land in one folder (each
    trial used to compute its own timestamped dir, and the sweeper crashed looking for its file)."""
    args = tiny_overrides(tiny_data, "sophia", **{"train.max_steps": 3, "train.eval_interval": 3,
                                                 "checkpoint.interval": 0})
    res = run_train_cli(["-m", "hparams_search=sophia_optuna", *args, "hydra.sweeper.n_trials=2"],
                        cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [sweep] = list((tmp_path / "multirun").glob("*/*_sweep"))
    import yaml

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    finals = [read_metrics(sweep / str(i))[-1]["val/loss"] for i in range(2)]
    assert result["best_value"] == pytest.approx(min(finals), rel=1e-6)


def test_entry_keeps_exit_codes_and_skips_finalization_only_in_multi_rank_workers(monkeypatch):
    """entry() maps main()'s outcome to the exit status; only a worker of a multi-process job
    leaves through os._exit (see train.entry for the abort-at-shutdown it avoids)."""
    import train

    exits: list[int] = []
    monkeypatch.setattr(train.os, "_exit", exits.append)
    for outcome, code in ((None, 0), (SystemExit(2), 2), (SystemExit(None), 0),
                          (SystemExit("message"), 1)):
        def fake_main(outcome=outcome):
            if outcome is not None:
                raise outcome
        monkeypatch.setattr(train, "main", fake_main)
        monkeypatch.delenv("RANK", raising=False)
        with pytest.raises(SystemExit) as stop:
            train.entry()
        assert stop.value.code == code and exits == []
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit):  # os._exit is patched, so entry() goes on to sys.exit
            train.entry()
        assert exits == [code]
        exits.clear()
        monkeypatch.setenv("WORLD_SIZE", "1")  # a single-process torchrun: normal exit
        with pytest.raises(SystemExit):
            train.entry()
        assert exits == []


def test_resume_continues_the_run_as_configured_and_refuses_changes(tiny_data, tmp_path):
    """The README's resume command names only the optimizer and the run dir: the run continues
    with its own settings; a changed setting is refused without touching the run's files, unless
    checkpoint.allow_config_change=true."""
    run_dir = tmp_path / "run"
    first = tiny_overrides(tiny_data, "sophia", **{"train.max_steps": 8, "checkpoint.interval": 4,
                                                  "train.eval_interval": 4, "train.log_interval": 2})
    res = run_train_cli(first + ["train.stop_at_step=4", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_metrics(run_dir)[-1]["step"] == 4

    res = run_train_cli(["optimizer=sophia", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]
    # the run's 256-token batch, not the default 65,536
    assert rows[-1]["tokens"] - rows[-1]["tokens_hessian"] == 8 * 256
    kept = {p: p.read_bytes() for p in [run_dir / "config.yaml", run_dir / "metrics.jsonl",
                                        *sorted((run_dir / ".hydra").iterdir())]}

    res = run_train_cli(["train.max_steps=12", "optimizer.lr=1e-3", f"hydra.run.dir={run_dir}"],
                        cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "train.max_steps: 8 -> 12" in res.stderr and "optimizer.lr: 0.0006 -> 0.001" in res.stderr
    assert "checkpoint.allow_config_change=true" in res.stderr
    assert kept == {p: p.read_bytes() for p in kept}  # a refused resume changes nothing

    res = run_train_cli(["train.max_steps=12", "checkpoint.allow_config_change=true",
                         f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train.max_steps changed from 8 to 12" in res.stdout
    assert read_metrics(run_dir)[-1]["step"] == 12
    assert compose_cfg([]).train.max_steps != 12  # the change came from the override, not a default
    assert "max_steps: 12" in (run_dir / "config.yaml").read_text()
    assert "train.max_steps=12" in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_a_refused_run_outside_the_working_dir_leaves_nothing_and_keeps_what_was_there(tmp_path):
    """hydra.run.dir anywhere: a refused run removes the directories it made (Hydra makes the run
    dir and its missing parents before any check), and only those."""
    work, before = tmp_path / "work", tmp_path / "before"
    work.mkdir()
    before.mkdir()  # empty, but not this run's to remove
    for run_dir in (tmp_path / "elsewhere" / "a" / "run", before / "x" / "run"):
        res = run_train_cli(["optimizer.lr=-1", f"hydra.run.dir={run_dir}"], cwd=work)
        assert res.returncode == 2 and "optimizer.lr=-1" in res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before", "work"]
    assert list(before.iterdir()) == [] and list(work.iterdir()) == []


def test_a_refused_run_leaves_no_trace_and_torchrun_prints_the_error_once(tmp_path):
    res = run_train_cli(["data=local"], cwd=tmp_path)  # default output dirs, as a user runs it
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "data.source is not set" in res.stderr and "data.source=PATH" in res.stderr
    assert list(tmp_path.iterdir()) == []  # no stub outputs/<date>/<time>_adamw left behind

    res = run_train_cli(["experiment=quickstart", "optimizer.lr=-1"], cwd=tmp_path,
                        torchrun_nproc=2)
    assert res.returncode != 0
    assert res.stderr.count("optimizer.lr=-1 must be a positive finite number") == 1
    assert not (tmp_path / "outputs").exists()


# --- config values refused by their spec (engine/schema.py), as a user meets them ---------------

@pytest.mark.parametrize("args,key", [
    (["seed=abc"], "seed"),
    (["compile=no"], "compile"),
    (["train.stop_at_step=-1"], "train.stop_at_step"),
    (["optimizer=sophia", "optimizer.k=0.5"], "optimizer.k"),
])
def test_a_value_of_the_wrong_type_or_range_exits_2_naming_the_key(args, key, tmp_path):
    res = run_train_cli(args, cwd=tmp_path)  # default output dirs, as a user runs it
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), res.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory left behind
