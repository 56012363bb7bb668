"""The training engine end to end on CPU: every optimizer learns, metrics, resume, faults."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.errors import HarnessError
from engine.optimizers import entries, optimizer_defaults
from engine.run import run
from train_helpers import compose_cfg, read_metrics, tiny_overrides

TRAIN_KEYS = {"step", "tokens", "tokens_hessian", "flops", "time/elapsed", "train/loss", "lr",
              "throughput", "mfu", "grad/norm", "grad/clipped", "grad/clip_rate", "time/hessian",
              "memory/peak"}
SOPHIA_KEYS = {"sophia/clip_frac", "sophia/win_rate", "hessian/l1", "hessian/l2"}


# lrs that learn the tiny corpus in 30 steps (an optimizer not listed trains at its yaml default)
TINY_LR = {"adamw": 3e-3, "lion": 1e-3, "sophia": 1e-3, "sophiah": 1e-3, "muon": 0.02, "soap": 1e-2}


@pytest.mark.parametrize("optimizer", sorted(entries()))
def test_each_optimizer_learns_and_logs_every_metric(optimizer, tiny_data, tmp_path):
    lr = TINY_LR.get(optimizer, optimizer_defaults(optimizer)["lr"])
    cfg = compose_cfg(tiny_overrides(tiny_data, optimizer, **{"optimizer.lr": lr}))
    summary = run(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if "val/loss" in r]

    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in val_rows] == [0, 10, 20, 30]
    # ln(257) = 5.55 at init; the tiny model must have learned byte statistics.
    assert val_rows[0]["val/loss"] > 5.0
    assert val_rows[-1]["val/loss"] < val_rows[0]["val/loss"] - 1.0
    assert summary["val_loss"] == pytest.approx(val_rows[-1]["val/loss"], rel=1e-6)

    for r in train_rows:
        assert TRAIN_KEYS <= r.keys()
        assert 0.0 <= r["grad/clip_rate"] <= 1.0 and r["grad/clipped"] in (0, 1)
        assert r["throughput"] > 0 and r["grad/norm"] > 0 and r["memory/peak"] > 0
        assert r["mfu"] is None  # no known peak FLOP/s for a CPU: null, not a made-up number
    tokens = [r["tokens"] for r in train_rows]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    elapsed = [r["time/elapsed"] for r in train_rows]
    assert elapsed == sorted(elapsed)

    hessian_refreshes = 30 // 5 if entries()[optimizer].hessian else 0
    last = train_rows[-1]
    assert last["tokens_hessian"] == hessian_refreshes * 256
    assert last["tokens"] == 30 * 256 + hessian_refreshes * 256
    flops_per_token = last["flops"] / last["tokens"] if optimizer != "sophiah" else None
    if entries()[optimizer].hessian:
        assert SOPHIA_KEYS <= last.keys()
        assert 0.0 <= last["sophia/clip_frac"] <= 1.0
        assert last["sophia/win_rate"] == pytest.approx(1 - last["sophia/clip_frac"])
        assert last["hessian/l1"] > 0 and last["time/hessian"] > 0
    else:
        assert not (SOPHIA_KEYS & last.keys())  # absent, never written as zeros
        assert last["time/hessian"] == 0
    if optimizer == "muon":
        assert last["optim/update_rms/muon"] > 0 and last["optim/update_rms/adamw"] > 0
    if flops_per_token is not None:
        assert flops_per_token > 0  # train and GNB Hessian tokens cost the same per token
    # The final checkpoint holds Sophia's h under the official key.
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert ckpt["step"] == 30
    if entries()[optimizer].hessian:
        state = next(iter(ckpt["optimizer"]["state"].values()))
        assert state["hessian"].abs().sum() > 0


def _final_weights(run_dir):
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["model"]


@pytest.mark.parametrize("optimizer", ["sophia", "muon"])
def test_resume_is_bit_exact(optimizer, tiny_data, tmp_path):
    """12 steps straight == 6 steps, stop, resume, 6 more (Sophia with k=3; dropout on)."""
    extra = {"train.max_steps": 12, "checkpoint.interval": 6,
             "train.log_interval": 1, "train.eval_interval": 4, "model.dropout": 0.1}
    if optimizer == "sophia":
        extra["optimizer.k"] = 3
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(compose_cfg(tiny_overrides(tiny_data, optimizer, **extra)), straight)
    run(compose_cfg(tiny_overrides(tiny_data, optimizer, **extra, **{"train.stop_at_step": 6})), split)
    assert max(r["step"] for r in read_metrics(split)) == 6
    run(compose_cfg(tiny_overrides(tiny_data, optimizer, **extra)), split)

    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train/loss", "val/loss", "grad/norm", "sophia/clip_frac", "tokens", "flops",
                    "optim/update_rms/muon"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    wa, wb = _final_weights(straight), _final_weights(split)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_prefetching_loader_gives_identical_training(tiny_data, tmp_path):
    extra = {"train.max_steps": 6, "train.log_interval": 1, "train.eval_interval": 3}
    run(compose_cfg(tiny_overrides(tiny_data, "sophia", **extra, **{"train.prefetch": False})),
        tmp_path / "plain")
    run(compose_cfg(tiny_overrides(tiny_data, "sophia", **extra, **{"train.prefetch": True})),
        tmp_path / "prefetch")
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "prefetch")
    assert [r.get("train/loss") for r in a] == [r.get("train/loss") for r in b]
    assert [r.get("val/loss") for r in a] == [r.get("val/loss") for r in b]


def _poison_training_loss(monkeypatch, bad_call, factor=float("nan")):
    """Multiply the training loss of forward call number ``n`` (1-based) by ``factor`` whenever
    ``bad_call(n)`` holds: a simulated numerical blow-up at a chosen micro-step."""
    from model import GPT

    real_forward = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if bad_call(calls["n"]):
                loss = loss * factor
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def test_nonfinite_loss_stops_without_overwriting_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    _poison_training_loss(monkeypatch, lambda n: n > 2 * 12)  # accum 2: from step 13 on
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"checkpoint.interval": 10}))
    with pytest.raises(HarnessError, match="non-finite"):
        run(cfg, tmp_path)
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in found] == ["ckpt_0000010.pt"]
    weights = load_checkpoint(found[0])["model"]
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_rollback_policy_retries_from_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    _poison_training_loss(monkeypatch, lambda n: n == 2 * 13)  # one bad micro-batch at step 13
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"train.on_nonfinite": "rollback"}))
    summary = run(cfg, tmp_path)
    assert summary["step"] == 30 and math.isfinite(summary["val_loss"])
    final = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert final["counters"]["rollbacks"] == 1


def test_skip_policy_skips_the_bad_step(tiny_data, tmp_path, monkeypatch):
    _poison_training_loss(monkeypatch, lambda n: n == 2 * 7, factor=float("inf"))
    cfg = compose_cfg(tiny_overrides(tiny_data, "sophia", **{"train.on_nonfinite": "skip"}))
    summary = run(cfg, tmp_path)
    assert math.isfinite(summary["val_loss"])
    assert read_metrics(tmp_path)[-1]["nonfinite/skipped"] == 1


def test_kill_during_checkpoint_save_leaves_previous_loadable(tiny_data, tmp_path, monkeypatch):
    import data.files as files_mod  # checkpoints are saved with its atomic_write

    real_replace = files_mod.os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("ckpt_0000020.pt"):
            raise KeyboardInterrupt("killed mid-save")  # after the temp file is written
        return real_replace(src, dst)

    monkeypatch.setattr(files_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(tiny_overrides(tiny_data, "sophia")), tmp_path)
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in found] == ["ckpt_0000010.pt"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # the partial file is removed
    assert load_checkpoint(found[0])["step"] == 10
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "train/lo')  # a line cut off by the kill
    # Re-running the same command resumes from step 10 and finishes, with clean metrics.
    monkeypatch.setattr(files_mod.os, "replace", real_replace)
    assert run(compose_cfg(tiny_overrides(tiny_data, "sophia")), tmp_path)["step"] == 30
    steps = [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_corrupt_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir(parents=True)
    (ckdir / "ckpt_0000010.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(HarnessError, match="corrupt or not a checkpoint"):
        run(compose_cfg(tiny_overrides(tiny_data, "adamw")), tmp_path)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_with_a_warning(
        tiny_data, tmp_path, capsys):
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 20}))
    run(cfg, tmp_path)
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert newest.name == "ckpt_0000020.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short
    capsys.readouterr()
    assert run(cfg, tmp_path)["step"] == 20
    out = capsys.readouterr().out
    assert f"WARNING: skipping unreadable checkpoint {newest}" in out
    assert "resumed from" in out and "ckpt_0000010.pt at step 10" in out
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [5, 10, 15, 20]


def test_mismatched_checkpoint_is_refused(tiny_data, tmp_path):
    run(compose_cfg(tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 10})), tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "metrics.jsonl", tmp_path / "config.yaml")}
    with pytest.raises(HarnessError, match="optimizer=adamw, this run uses optimizer=lion"):
        run(compose_cfg(tiny_overrides(tiny_data, "lion")), tmp_path)
    with pytest.raises(HarnessError, match="model differs"):
        run(compose_cfg(tiny_overrides(tiny_data, "adamw", **{"model.n_layer": 3})), tmp_path)
    # A refused resume leaves the run's records untouched.
    assert before == {name: (tmp_path / name).read_bytes() for name in before}


def test_bfloat16_autocast_trains_on_cpu(tiny_data, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_data, "sophia", **{"dtype": "bfloat16",
                                                            "train.max_steps": 20}))
    run(cfg, tmp_path)
    val = [r["val/loss"] for r in read_metrics(tmp_path) if "val/loss" in r]
    assert all(math.isfinite(v) for v in val) and val[-1] < val[0] - 0.5


def test_float16_without_cuda_is_refused(tiny_data, tmp_path):
    with pytest.raises(HarnessError, match="float16 needs a CUDA device"):
        run(compose_cfg(tiny_overrides(tiny_data, "adamw", dtype="float16")), tmp_path)


def test_unknown_wandb_mode_is_refused(tiny_data, tmp_path):
    with pytest.raises(HarnessError, match="choose online, offline or disabled"):
        run(compose_cfg(tiny_overrides(tiny_data, "adamw", **{"wandb.mode": "onlin"})), tmp_path)


def test_local_data_is_keyed_on_its_source_and_a_stale_folder_is_refused(tmp_path, monkeypatch):
    """data=local with A.txt, then B.txt: B gets its own folder (as `python -m data.prepare B.txt`
    names it) and trains on B; B pointed at A's folder is refused, naming both sources."""
    from data.errors import DataError

    monkeypatch.chdir(tmp_path)
    for name, text in (("A", "alpha beta gamma\n\n" * 300), ("B", "one two three four\n\n" * 300)):
        (tmp_path / f"{name}.txt").write_text(text)
    tiny = ["model=gpt2-nano", "model.block_size=16", "train.max_steps=2", "train.eval_interval=0",
            "train.global_batch_tokens=64", "train.micro_batch_size=4", "train.warmup_steps=1",
            "checkpoint.interval=0", "data.tokenizer=byte", "data.val_fraction=0.2", "device=cpu"]
    run(compose_cfg(["data=local", "data.source=A.txt", *tiny]), tmp_path / "runA")
    run(compose_cfg(["data=local", "data.source=B.txt", *tiny]), tmp_path / "runB")
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["A-byte", "B-byte"]
    ids = np.fromfile(tmp_path / "prepared" / "B-byte" / "train.bin", dtype=np.uint16)
    text = bytes(int(i) for i in ids if i < 256)  # the byte tokenizer's ids are the bytes
    assert b"one two" in text and b"alpha" not in text
    with pytest.raises(DataError) as refused:
        run(compose_cfg(["data=local", "data.source=B.txt", "data.dir=prepared/A-byte", *tiny]),
            tmp_path / "runC")
    assert str(tmp_path / "A.txt") in str(refused.value) and str(tmp_path / "B.txt") in str(refused.value)
    assert not (tmp_path / "runC").exists()


def test_summary_is_strict_json_when_a_run_stops_between_evaluations(tiny_data, tmp_path, capsys):
    """train.stop_at_step=7 with evals every 10 steps: no final val loss is `null`, never NaN."""
    import json

    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"train.stop_at_step": 7,
                                                           "train.eval_at_start": False}))
    returned = run(cfg, tmp_path)
    text = (tmp_path / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["val_loss"] is None and summary["best_val_loss"] is None
    assert summary["step"] == 7 and summary["max_steps"] == 30 and returned == summary
    assert summary["tokens"] == 7 * 256 and summary["checkpoint"].endswith("ckpt_0000007.pt")
    assert "steps       7/30" in capsys.readouterr().out  # the printed end-of-run block


@pytest.mark.parametrize("optimizer", ["sophia", "sophiah"])
def test_hessian_warm_start_estimates_h_before_the_first_step(optimizer, tiny_data, tmp_path):
    """optimizer.hessian_warm_start=true: one refresh before step 0, on batches of its own."""
    extra = {"train.max_steps": 2, "train.eval_interval": 0, "checkpoint.interval": 0,
             "optimizer.k": 10}
    cold = run(compose_cfg(tiny_overrides(tiny_data, optimizer, **extra)), tmp_path / "cold")
    warm = run(compose_cfg(tiny_overrides(tiny_data, optimizer, **extra)
                           + ["optimizer.hessian_warm_start=true"]), tmp_path / "warm")
    assert cold["tokens_hessian"] == 0 and warm["tokens_hessian"] > 0  # k=10: no refresh in 2 steps
    h = [s["hessian"] for s in load_checkpoint(list_checkpoints(tmp_path / "warm" / "checkpoints")[-1])
         ["optimizer"]["state"].values()]
    assert all(t.abs().sum() > 0 for t in h)
    assert warm["train_loss"] != cold["train_loss"]  # the estimate shaped the first steps


def test_a_fresh_start_after_an_attempt_without_checkpoint_starts_the_metrics_anew(
        tiny_data, tmp_path, monkeypatch, capsys):
    """An attempt killed before its first checkpoint leaves metrics no checkpoint can continue:
    the next start begins metrics.jsonl anew, so the file never holds two histories."""
    from engine.trainer import Trainer

    real_step = Trainer.train_step

    def killed_at_7(self, step):
        if step == 7:
            raise KeyboardInterrupt("killed before the first checkpoint")
        return real_step(self, step)

    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 20}))
    monkeypatch.setattr(Trainer, "train_step", killed_at_7)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 5]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()
    run(cfg, tmp_path)
    steps = [r["step"] for r in read_metrics(tmp_path)]  # every line as written
    assert steps == [0, 5, 10, 15, 20]  # one history, not [0, 5, 0, 5, 10, ...]
    assert f"{tmp_path / 'metrics.jsonl'} holds the metrics of an earlier attempt" in \
        capsys.readouterr().out


def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused(tiny_data, tmp_path):
    run(compose_cfg(tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 10})), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(HarnessError, match=r"holds checkpoints of an earlier run \(newest "
                                           r"ckpt_0000010\.pt\); starting afresh"):
        run(compose_cfg(tiny_overrides(tiny_data, "adamw", **{"train.max_steps": 10,
                                                             "checkpoint.resume": "null"})),
            tmp_path)
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
