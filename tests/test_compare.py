"""scripts/compare.py and its analysis package: speed-up maths on known curves, run discovery,
labels, plots, the scaling view and the CLI."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import plots, scaling, speedup, units
from analysis.runs import Run, collect_runs, load_run, make_labels
from engine.resume import is_result_neutral
from train_helpers import load_script

REPO = Path(__file__).resolve().parents[1]


def _load_compare():
    return load_script("compare")


compare = _load_compare()

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, *, optimizer: str, overrides: list[str], steps: int, loss_at, eval_every: int = 50,
              tokens_per_step: int = 1000, seconds_per_step: float = 0.1, flops_per_token: int = 600,
              with_val: bool = True, sophia: bool = False, model: dict | None = None,
              max_steps: int | None = None) -> Path:
    """A run directory in the engine's format whose loss follows `loss_at(step)` exactly; `model`
    adds a model section (and train.max_steps, default `steps`) to its config.yaml, whose optimizer
    section takes the `optimizer.*` overrides as Hydra resolves them (lr 0.001 by default)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    opt = {"lr": "0.001"} | {o.split("=")[0][len("optimizer."):]: o.split("=")[1] for o in overrides
                             if o.startswith("optimizer.")}
    config = f"optimizer:\n  name: {optimizer}\n" + "".join(f"  {k}: {v}\n" for k, v in opt.items()) + "seed: 1\n"
    if model is not None:
        config += "model:\n" + "".join(f"  {k}: {v}\n" for k, v in model.items())
        config += f"train:\n  max_steps: {max_steps or steps}\n"
    (run_dir / "config.yaml").write_text(config)
    lines = []
    for step in range(0, steps + 1, 10):
        rec = {"step": step, "tokens": step * tokens_per_step, "flops": step * tokens_per_step * flops_per_token,
               "time/elapsed": step * seconds_per_step, "train/loss": loss_at(step) + 0.05,
               "lr": 1e-3 * min(1.0, (step + 1) / 100), "grad/clip_rate": 0.5 * math.exp(-step / 300)}
        if sophia:
            rec["sophia/clip_frac"] = 0.6 + 0.1 * math.sin(step / 50)
            rec["sophia/win_rate"] = 1 - rec["sophia/clip_frac"]
        if with_val and step % eval_every == 0:
            rec["val/loss"] = loss_at(step)
        lines.append(json.dumps(rec))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def linear(rate: float, start: float = 6.0):
    return lambda step: start - rate * step


def pair(rows, a, b):
    (row,) = [r for r in rows if r["a"] == a and r["b"] == b]
    return row


# --------------------------------------------------------------------------- pure maths


def test_steps_to_reach_interpolates_and_reports_not_reached():
    xs, losses = [0, 100, 200, 300], [5.0, 4.0, 3.0, 2.5]
    assert speedup.steps_to_reach(xs, losses, 3.5) == pytest.approx(150.0)
    assert speedup.steps_to_reach(xs, losses, 3.0) == pytest.approx(200.0)
    assert speedup.steps_to_reach(xs, losses, 2.75) == pytest.approx(250.0)
    assert speedup.steps_to_reach(xs, losses, 6.0) == 0.0  # already below at the first point
    assert speedup.steps_to_reach(xs, losses, 2.4) is None  # never extrapolated
    # First crossing wins on a non-monotone curve.
    assert speedup.steps_to_reach([0, 10, 20, 30], [4.0, 2.0, 3.0, 1.0], 2.5) == pytest.approx(7.5)


def test_smooth_is_a_trailing_moving_average():
    assert speedup.smooth([4.0, 2.0, 6.0, 0.0], 1) == [4.0, 2.0, 6.0, 0.0]
    assert speedup.smooth([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert speedup.smooth([4.0, 2.0, 6.0, 0.0], 3) == pytest.approx([4.0, 3.0, 4.0, 8 / 3])
    with pytest.raises(ValueError, match="window"):
        speedup.smooth([1.0], 0)


def test_speedup_table_on_every_axis():
    # A reaches any loss in half of B's steps but pays 10% more tokens per step (Hessian passes)
    # and 30% more seconds per step: ratios 0.5 (steps), 0.55 (tokens, FLOPs), 0.65 (seconds).
    steps_b = [0, 50, 100, 150, 200]
    loss_b = [6.0 - 0.01 * s for s in steps_b]
    steps_a = [0, 25, 50, 75, 100, 125]
    loss_a = [6.0 - 0.02 * s for s in steps_a]

    def curve(label, steps, loss, tok, sec):
        return speedup.Curve(label, loss, {"steps": steps, "tokens": [s * tok for s in steps],
                                           "flops": [s * tok * 6 for s in steps], "seconds": [s * sec for s in steps]})

    a = curve("A", steps_a, loss_a, 1100, 0.13)
    b = curve("B", steps_b, loss_b, 1000, 0.1)
    rows = speedup.speedup_table([a, b])
    ab, ba = pair(rows, "A", "B"), pair(rows, "B", "A")
    assert ab["target"] == pytest.approx(4.0)
    expected = {"steps": 0.5, "tokens": 0.55, "flops": 0.55, "seconds": 0.65}
    for axis, ratio in expected.items():
        assert ab["axes"][axis]["ratio"] == pytest.approx(ratio), axis
        assert ab["axes"][axis]["note"] is None
    # A ends lower (3.5) than B ever gets: B never reaches it.
    assert ba["target"] == pytest.approx(3.5)
    for axis in expected:
        assert ba["axes"][axis]["ratio"] is None
        assert ba["axes"][axis]["note"] == "not reached by A"
    # A fixed target both reach: ratio of first crossings, interpolated between eval points.
    rows = speedup.speedup_table([a, b], target_loss=4.5)
    assert pair(rows, "A", "B")["axes"]["steps"]["ratio"] == pytest.approx(75 / 150)
    assert pair(rows, "B", "A")["axes"]["steps"]["ratio"] == pytest.approx(2.0)


def test_speedup_table_smoothing_and_missing_axis():
    noisy = speedup.Curve("noisy", [5.0, 4.0, 3.0, 4.0], {"steps": [0, 1, 2, 3], "tokens": None,
                                                          "flops": None, "seconds": None})
    flat = speedup.Curve("flat", [5.0, 4.5, 4.0, 3.5], {"steps": [0, 1, 2, 3], "tokens": [0, 1, 2, 3],
                                                        "flops": None, "seconds": None})
    rows = speedup.speedup_table([noisy, flat], smooth_n=2)
    # Smoothed: noisy [5, 4.5, 3.5, 3.5], flat [5, 4.75, 4.25, 3.75]; flat's final is 3.75.
    nf = pair(rows, "noisy", "flat")
    assert nf["target"] == pytest.approx(3.75)
    assert nf["axes"]["steps"]["a"] == pytest.approx(1.75)
    assert nf["axes"]["steps"]["ratio"] == pytest.approx(1.75 / 3)
    assert nf["axes"]["tokens"]["note"] == "axis missing" and nf["axes"]["tokens"]["ratio"] is None
    assert "axis missing" in speedup.format_table(rows, 2, "val/loss", None)


# --------------------------------------------------------------------------- runs, labels, CLI


def test_labels_keep_only_differing_overrides(tmp_path):
    common = ["model=tiny", "data=shakespeare"]
    runs = []
    for name, opt, extra in [("a", "sophia", ["optimizer.lr=3e-4"]), ("b", "sophia", ["optimizer.lr=6e-4"]),
                             ("c", "adamw", ["optimizer.lr=6e-4"])]:
        write_run(tmp_path / name, optimizer=opt, overrides=[f"optimizer={opt}", *common, *extra], steps=100,
                  loss_at=linear(0.01))
        runs.append(load_run(tmp_path / name))
    assert make_labels(runs) == ["sophia optimizer.lr=3e-4", "sophia optimizer.lr=6e-4",
                                         "adamw optimizer.lr=6e-4"]
    # Identical configurations without a seed are told apart by directory name.
    write_run(tmp_path / "twin", optimizer="sophia", overrides=["optimizer=sophia", *common, "optimizer.lr=6e-4"],
              steps=100, loss_at=linear(0.01))
    twins = [load_run(tmp_path / "b"), load_run(tmp_path / "twin")]
    assert make_labels(twins) == ["sophia [b]", "sophia [twin]"]


def test_seeds_group_into_one_label(tmp_path):
    for i, seed in enumerate([1, 2]):
        write_run(tmp_path / "m" / str(i), optimizer="lion", overrides=["optimizer=lion", f"seed={seed}"],
                  steps=100, loss_at=linear(0.01 + 0.001 * seed))
    write_run(tmp_path / "m" / "2", optimizer="adamw", overrides=["optimizer=adamw", "seed=1"], steps=100,
              loss_at=linear(0.01))
    runs = collect_runs([tmp_path / "m"])
    assert [r.path.name for r in runs] == ["0", "1", "2"]
    assert make_labels(runs) == ["lion", "lion", "adamw"]
    assert make_labels(runs, group_seeds=False) == ["lion seed=1", "lion seed=2", "adamw seed=1"]
    curve = speedup.metric_curve("lion", runs[:2], "val/loss")
    assert curve.loss[-1] == pytest.approx(6.0 - 0.0115 * 100)  # mean of the two seeds


def test_cli_end_to_end(tmp_path):
    """The real command line: a multirun, a plain run and a W&B dir; known 2x speed-up; valid PNGs."""
    multirun = tmp_path / "multirun"
    # B: AdamW, 1000 steps. A: Sophia reaching every loss in half the steps, 1.1x tokens and FLOPs
    # per step, 1.2x seconds per step. C: Lion plateaus above B's final loss.
    write_run(multirun / "0", optimizer="adamw", overrides=["optimizer=adamw", "model=tiny"], steps=1000,
              loss_at=linear(0.003))
    write_run(multirun / "1", optimizer="sophia", overrides=["optimizer=sophia", "model=tiny"], steps=600,
              loss_at=linear(0.006), tokens_per_step=1100, seconds_per_step=0.12, sophia=True)
    lion = write_run(tmp_path / "lion_run", optimizer="lion", overrides=["optimizer=lion", "model=tiny"],
                     steps=1000, loss_at=lambda s: max(linear(0.003)(s), 4.0))
    # The engine's W&B dir inside a run dir resolves to the run's own metrics.jsonl (deduplicated),
    # also through W&B's latest-run symlink.
    (lion / "wandb" / "offline-run-20240101_000000-abc").mkdir(parents=True)
    (lion / "wandb" / "latest-run").symlink_to("offline-run-20240101_000000-abc")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare.py"), str(multirun), str(lion),
         str(lion / "wandb" / "offline-run-20240101_000000-abc"), str(lion / "wandb" / "latest-run"),
         str(lion / "wandb"), "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not reached" in proc.stdout
    report = json.loads((out / "speedup.json").read_text())
    assert sorted(report["runs"]) == ["adamw", "lion", "sophia"]
    rows = report["pairs"]
    assert len(rows) == 6
    sa = pair(rows, "sophia", "adamw")
    assert sa["target"] == pytest.approx(3.0)
    for axis, ratio in {"steps": 0.5, "tokens": 0.55, "flops": 0.55, "seconds": 0.6}.items():
        assert sa["axes"][axis]["ratio"] == pytest.approx(ratio, rel=1e-9), axis
    la = pair(rows, "lion", "adamw")
    assert la["axes"]["steps"]["ratio"] is None and la["axes"]["steps"]["note"] == "not reached by A"
    # Lion's own cost is its first eval at its final loss (step 700), not its last step: the same
    # first-crossing rule as for A. AdamW crosses 4.0 at step 666.67, between its evals.
    assert pair(rows, "adamw", "lion")["axes"]["steps"]["ratio"] == pytest.approx((2000 / 3) / 700)
    for name in ("loss.png", "diagnostics.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000, name


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert compare.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert f"skipping {tmp_path / 'nothing'}: no metrics.jsonl" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert compare.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no metrics" in capsys.readouterr().err

    assert compare.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err

    # A W&B offline run with neither history nor a metrics.jsonl above it is skipped with a warning.
    wb = tmp_path / "bare" / "wandb" / "offline-run-x"
    wb.mkdir(parents=True)
    assert compare.main([str(wb), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "skipping W&B run" in err and "no runs with metrics" in err


def test_no_val_points_still_plots(tmp_path, capsys):
    for name, opt in [("a", "sophia"), ("b", "adamw")]:
        write_run(tmp_path / name, optimizer=opt, overrides=[f"optimizer={opt}"], steps=200,
                  loss_at=linear(0.01), with_val=False)
    # A torn last line (killed mid-write) is tolerated.
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 210, "tra')
    out = tmp_path / "out"
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no val/loss points" in err and "speed-up skipped" in err
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "speedup.json").exists()
    # Training loss is a valid speed-up metric too.
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--metric", "train/loss"]) == 0
    assert json.loads((out / "speedup.json").read_text())["metric"] == "train/loss"


def test_wandb_history_is_read_when_no_metrics_file(tmp_path):
    run = tmp_path / "elsewhere" / "wandb" / "offline-run-20240101_000000-xyz"
    (run / "files").mkdir(parents=True)
    (run / "files" / "config.yaml").write_text("optimizer:\n  value:\n    name: lion\n    lr: 0.0001\n")
    rows = [{"_step": s, "tokens": 100 * s, "val/loss": 5.0 - 0.01 * s} for s in (0, 50, 100)]
    (run / "files" / "wandb-history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (r,) = collect_runs([run])
    assert r.optimizer == "lion"
    curve = speedup.metric_curve("lion", [r], "val/loss")
    assert curve.x["steps"] == [0.0, 50.0, 100.0] and curve.x["tokens"] == [0.0, 5000.0, 10000.0]
    assert curve.x["seconds"] is None  # not in the history: that axis is reported missing


def test_unreadable_runs_are_skipped_and_named(tmp_path, capsys):
    """A failed job's stub (only .hydra/ and an empty train.log) or a metrics.jsonl with no readable
    row, given directly or inside a sweep, is skipped with its path and reason; damaged lines cost
    only themselves (engine/run_dir.py's rule) and are named; the readable runs are compared."""
    good_a = write_run(tmp_path / "a", optimizer="sophia", overrides=["optimizer=sophia"], steps=200,
                       loss_at=linear(0.01))
    good_b = write_run(tmp_path / "b", optimizer="adamw", overrides=["optimizer=adamw"], steps=200,
                       loss_at=linear(0.005))
    stub = tmp_path / "stub"
    (stub / ".hydra").mkdir(parents=True)
    (stub / "train.log").write_text("")
    empty = write_run(tmp_path / "empty", optimizer="lion", overrides=["optimizer=lion"], steps=10, loss_at=linear(0))
    (empty / "metrics.jsonl").write_text("\n")
    garbled = write_run(tmp_path / "garbled", optimizer="lion", overrides=["optimizer=lion"], steps=10,
                        loss_at=linear(0))
    (garbled / "metrics.jsonl").write_bytes(b'{"step": 0, "val/loss": 5.0}\n\x00\xff\xfe garbage\n{"step": 10}\n')
    no_step = write_run(tmp_path / "no_step", optimizer="lion", overrides=["optimizer=lion"], steps=10,
                        loss_at=linear(0))
    (no_step / "metrics.jsonl").write_text('{"step": "zero", "val/loss": 5.0}\n[1, 2]\n')
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", optimizer="muon", overrides=["optimizer=muon"], steps=200, loss_at=linear(0.008))
    (sweep / "1" / ".hydra").mkdir(parents=True)
    (sweep / "1" / "train.log").write_text("")
    (sweep / "2").mkdir()
    (sweep / "2" / "metrics.jsonl").write_text('not json\n{"step": 0}\n')
    (sweep / "multirun.yaml").write_text("hydra: {}\n")

    out = tmp_path / "out"
    bad = [stub, empty, no_step]
    assert compare.main([str(p) for p in [good_a, *bad, garbled, good_b, sweep, tmp_path / "typo"]]
                        + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"skipping {stub}: no metrics.jsonl" in err and "train.log is empty" in err
    assert f"skipping {empty}: {empty / 'metrics.jsonl'} holds no metrics" in err
    assert f"warning: {garbled / 'metrics.jsonl'}: skipped 1 damaged line(s)" in err
    assert f"warning: {no_step / 'metrics.jsonl'}: skipped 2 damaged line(s)" in err and "lines 1, 2" in err
    assert f"skipping {no_step}: {no_step / 'metrics.jsonl'} holds no metrics" in err
    assert f"skipping {sweep / '1'}: no metrics.jsonl" in err
    assert f"warning: {sweep / '2' / 'metrics.jsonl'}: skipped 1 damaged line(s)" in err
    assert f"skipping {tmp_path / 'typo'}: it does not exist" in err
    assert "Traceback" not in err
    # the garbled run keeps its readable rows; sweep job 2 has no val/loss left to compare
    assert sorted(json.loads((out / "speedup.json").read_text())["runs"]) == ["adamw", "lion", "muon", "sophia"]
    assert "no val/loss points in 2" in err
    for name in ("loss.png", "diagnostics.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    # Only when nothing at all is readable is it an error.
    assert compare.main([str(p) for p in [*bad, sweep / "1"]] + ["--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("warning: skipping") == 4 and "error: no runs with metrics" in err


def test_labels_leave_out_overrides_that_do_not_change_the_result(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (lr, mode) in enumerate([("1e-3", "offline"), ("3e-3", "disabled")]):
        write_run(sweep / str(i), optimizer="adamw", steps=100, loss_at=linear(0.01),
                  overrides=["optimizer=adamw", f"optimizer.lr={lr}", f"wandb.mode={mode}",
                             f"hydra.run.dir=outputs/{i}", f"data.dir=/scratch/{i}", f"checkpoint.interval={50 + i}",
                             f"+wandb.group=g{i}", f"device=cuda:{i}"])
    runs = collect_runs([sweep])
    assert make_labels(runs) == ["adamw optimizer.lr=1e-3", "adamw optimizer.lr=3e-3"]
    for o in ["wandb.mode=online", "hydra.sweep.dir=x", "checkpoint.resume=auto", "data.dir=p", "device=cpu",
              "train.log_interval=5", "+wandb.name=x"]:
        assert is_result_neutral(o, placement=True), o
    for o in ["optimizer=sophia", "optimizer.lr=1e-3", "optimizer.rho=0.05", "optimizer.k=10", "model=gpt2-small",
              "seed=2", "data=openwebtext", "train.max_steps=100", "dtype=bfloat16", "model.dropout=0.1"]:
        assert not is_result_neutral(o, placement=True), o


def test_si_format_tick_labels():
    cases = {0: "0", 500: "500", 1000: "1k", 120000: "120k", 1.2e6: "1.2M", 999999: "1M", 7.2e10: "72G",
             3e12: "3T", 0.5: "0.5", 2.5: "2.5", -4e3: "-4k"}
    for value, text in cases.items():
        assert units.si_format(value) == text, value


def _color_pixels(fig, ax, color) -> int:
    """Pixels inside `ax` drawn in `color` (RGB within a small tolerance)."""
    import numpy as np

    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    box = ax.get_window_extent()
    h = img.shape[0]
    crop = img[int(h - box.y1) + 2:int(h - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2]
    target = np.array([round(255 * c) for c in color[:3]])
    return int((np.abs(crop - target).max(axis=-1) <= 10).sum())


def test_figures_are_labelled_readable_and_show_every_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for name, opt, rate in [("a", "adamw", 0.003), ("b", "sophia", 0.006), ("c", "lion", 0.003)]:
        run_dir = write_run(tmp_path / name, optimizer=opt, overrides=[f"optimizer={opt}"], steps=1000,
                            loss_at=linear(rate), tokens_per_step=120_000, seconds_per_step=1.3,
                            sophia=opt == "sophia")
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for r in recs:
            r["grad/clip_rate"] = 1.0  # every run clips every step: three identical curves
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        runs.append(load_run(run_dir))
    # A run with only validation points (a W&B history) has nothing in the diagnostics figure.
    runs.append(Run(tmp_path / "w", [{"step": s, "tokens": 100_000 * s, "val/loss": 6 - 0.002 * s}
                                             for s in (0, 500, 1000)], "muon", []))
    groups = {f"{r.optimizer} run": [r] for r in runs}
    styles = plots.plot_styles(list(groups))
    assert len({(s.linestyle, s.marker) for s in styles.values()}) == len(styles)

    loss = plots.loss_figure(groups, 1, styles)
    diag = plots.diagnostics_figure(groups, styles)
    try:
        for fig in (loss, diag):
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            for ax in fig.axes:
                assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax
                lo, hi = sorted(ax.get_xlim())
                labels = [t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi and t.get_text()]
                assert len(labels) >= 3, ax.get_title()
                for t in labels:  # 100k, 1.2M: never "120000000" or an offset like "1e8"
                    assert re.search(r"\d{4,}", t.get_text()) is None, t
                assert ax.xaxis.get_offset_text().get_text() == "", ax.get_title()
                boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
                assert all(b1.x0 < b2.x0 and b1.x1 <= b2.x0 for b1, b2 in zip(boxes, boxes[1:])), ax.get_title()
            (legend,) = fig.legends
            assert [t.get_text() for t in legend.get_texts()] == list(groups)  # complete, in every figure
            box, fig_box = legend.get_window_extent(renderer), fig.bbox
            assert fig_box.x0 <= box.x0 and box.x1 <= fig_box.x1 and box.y1 <= fig_box.y1, (box, fig_box)
            for ax in fig.axes:
                assert box.y0 >= ax.get_tightbbox(renderer).y1 - 1, ax.get_title()  # does not cover a panel

        by_title = {ax.get_title(): ax for ax in loss.axes}
        assert set(by_title) == {f"{y} vs {x}" for y in ("training loss", "validation loss")
                                 for x in ("steps", "tokens", "FLOPs", "wall-clock time")}
        for ax in loss.axes:
            assert ax.get_ylabel().endswith("loss (nats/token)")
        assert "tokens" in by_title["validation loss vs tokens"].get_xlabel()
        assert "FLOPs" in by_title["validation loss vs FLOPs"].get_xlabel()
        assert "wall-clock (s" in by_title["validation loss vs wall-clock time"].get_xlabel()
        assert "steps" in by_title["validation loss vs steps"].get_xlabel()
        ticks = [t.get_text() for t in by_title["training loss vs tokens"].get_xticklabels() if t.get_text()]
        assert "100M" in ticks or "50M" in ticks, ticks

        # Identical clip-rate curves: every run's colour still shows in the panel.
        clip = next(ax for ax in diag.axes if "clip trigger rate" in ax.get_title())
        for label in list(groups)[:3]:
            assert _color_pixels(diag, clip, styles[label].color) >= 30, label
    finally:
        plt.close(loss)
        plt.close(diag)


# --------------------------------------------------------------------------- scaling view


def _nano(n_layer: int, n_embd: int = 32, **extra) -> dict:
    return {"preset": "gpt2-nano", "n_layer": n_layer, "n_embd": n_embd, "n_head": 2, "vocab_size": "null",
            "bias": "false", **extra}


def test_non_embedding_params_from_config():
    for n_layer, n_embd in [(1, 32), (3, 64), (2, 48)]:
        n = scaling.model_size(_nano(n_layer, n_embd) | {"bias": False, "vocab_size": None})
        assert n == 12 * n_layer * n_embd**2 + (2 * n_layer + 1) * n_embd  # blocks + LayerNorm weights
    # biases: 9d per block in the linears, 2d in its LayerNorms, d in the final LayerNorm
    assert scaling.model_size({"preset": "gpt2-nano", "bias": True}) == (
        12 * 2 * 64**2 + (2 * 2 + 1) * 64 + 2 * 11 * 64 + 64)
    # the model's own count keeps the tied token embedding: the two differ by exactly vocab x n_embd
    from model import GPT, GPTConfig

    gpt = GPT(GPTConfig.from_preset("gpt2-micro", vocab_size=320))
    assert scaling.model_size({"preset": "gpt2-micro", "vocab_size": 320}) == (
        gpt.num_params(non_embedding=True) - 320 * 128)
    # keys that are not GPTConfig fields (the starting weights) leave the count alone
    assert scaling.model_size({"preset": "gpt2-micro", "init_from": "gpt2"}) == (
        gpt.num_params(non_embedding=True) - 320 * 128)
    assert scaling.model_size(None) is None
    assert scaling.model_size({"preset": "no-such-model"}) is None


def test_matching_size_interpolates_in_log_size():
    sizes, losses = [1e4, 1e5, 1e6], [4.0, 3.0, 2.0]
    assert scaling.matching_size(sizes, losses, 2.5)[0] == pytest.approx(math.sqrt(1e5 * 1e6))
    assert scaling.matching_size(sizes, losses, 3.0)[0] == pytest.approx(1e5)
    size, note = scaling.matching_size(sizes, losses, 4.5)
    assert size is None and "already at or below it at its smallest size" in note
    size, note = scaling.matching_size(sizes, losses, 1.5)
    assert size is None and "stays above it up to its largest size, 1M" in note  # no extrapolation
    assert scaling.value_at([0, 10, 20], [5.0, 4.0, 2.0], 15) == pytest.approx(3.0)
    assert scaling.value_at([0, 10], [5.0, 4.0], 11) is None


def _scaling_sweep(root: Path, steps: int = 200) -> dict:
    """B (adamw) at n_layer 1..16, A (sophia) at n_layer 1..4, two seeds each (final losses +-0.01
    around the line). B's loss is 5 - 0.3 ln(N / 1e4); A's loss at size N is B's at 2N, and A spends
    10% more FLOPs per step (Hessian passes). Returns {(optimizer, n_layer): N}."""
    def loss_b(n):
        return 5.0 - 0.3 * math.log(n / 1e4)

    sizes = {}
    for opt, layers, tokens in (("adamw", (1, 2, 4, 8, 16), 1000), ("sophia", (1, 2, 4), 1100)):
        for n_layer in layers:
            n = scaling.model_size(_nano(n_layer) | {"bias": False, "vocab_size": None})
            sizes[opt, n_layer] = n
            final = loss_b(n) if opt == "adamw" else loss_b(2 * n)
            for seed, delta in ((1, -0.01), (2, 0.01)):
                write_run(root / f"{opt}-{n_layer}-{seed}", optimizer=opt, steps=steps, tokens_per_step=tokens,
                          overrides=[f"optimizer={opt}", f"model.n_layer={n_layer}", f"seed={seed}",
                                     "model=gpt2-nano"],
                          loss_at=lambda s, f=final + delta: f + 0.002 * (steps - s), model=_nano(n_layer))
    return sizes


def test_scaling_finds_the_size_at_which_b_matches_a(tmp_path, capsys):
    sizes = _scaling_sweep(tmp_path / "runs")
    out = tmp_path / "out"
    assert compare.main([str(tmp_path / "runs" / d) for d in sorted(p.name for p in (tmp_path / "runs").iterdir())]
                        + ["--out", str(out)]) == 0  # several sizes: the scaling view is automatic
    printed = capsys.readouterr().out
    assert (out / "scaling.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out / "scaling.json").read_text())
    final = [r for r in report["size_matches"]["final"] if r["a"] == "sophia" and r["b"] == "adamw"]
    assert [r["size_a"] for r in final] == [sizes["sophia", n] for n in (1, 2, 4)]
    for r in final:  # Sophia at size N matches AdamW at 2N
        assert r["size_b"] == pytest.approx(2 * r["size_a"], rel=1e-9) and r["ratio"] == pytest.approx(2.0)
        assert f"sophia at {units.si_format(r['size_a'])} params" in printed
    assert f"matches adamw at {units.si_format(2 * sizes['sophia', 1])} params (2.00x)" in printed
    # the other way round AdamW's losses lie above every Sophia size's: nothing to interpolate
    back = [r for r in report["size_matches"]["final"] if r["a"] == "adamw" and r["b"] == "sophia"]
    assert back[0]["size_b"] is None and "already at or below it at its smallest size" in back[0]["note"]
    # seeds: one point per (line, size), mean/min/max/std over the two seeds
    pts = {(p["line"], p["params"]): p for p in report["points"]}
    assert set(pts) == {(opt, n) for (opt, _), n in sizes.items()}
    p = pts["adamw", sizes["adamw", 1]]
    assert len(p["runs"]) == 2 and p["final"]["n"] == 2
    assert p["final"]["max"] - p["final"]["min"] == pytest.approx(0.02)
    assert p["final"]["std"] == pytest.approx(0.02 / math.sqrt(2))
    # matched budget: the size's smallest total FLOPs (AdamW's); Sophia's loss there is read off
    # its curve at step 200 / 1.1, where it is 0.002 * (200 - 200 / 1.1) above its final loss
    q = pts["sophia", sizes["sophia", 2]]
    assert q["budget_flops"] == pytest.approx(200 * 1000 * 600)
    assert q["matched_budget"]["mean"] == pytest.approx(q["final"]["mean"] + 0.002 * (200 - 200 / 1.1))
    assert pts["adamw", sizes["adamw", 2]]["matched_budget"]["mean"] == pytest.approx(
        pts["adamw", sizes["adamw", 2]]["final"]["mean"])


def test_scaling_figure_draws_seed_bands(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    _scaling_sweep(tmp_path)
    points, notes = scaling.scaling_points(collect_runs(sorted(tmp_path.iterdir())))
    assert notes == []
    fig = plots.scaling_figure(points)
    try:
        assert [ax.get_xscale() for ax in fig.axes] == ["log"] * 3
        titles = [ax.get_title() for ax in fig.axes]
        assert any("model size" in t for t in titles) and any("FLOPs" in t for t in titles)
        for ax in fig.axes:
            assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # a band per line
            assert len(ax.get_lines()) == 2
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["adamw", "sophia"]
    finally:
        plt.close(fig)


def test_scaling_needs_two_sizes_and_says_so(tmp_path, capsys):
    for opt in ("adamw", "sophia"):
        write_run(tmp_path / opt, optimizer=opt, overrides=[f"optimizer={opt}"], steps=100, loss_at=linear(0.01),
                  model=_nano(2))
    args = [str(tmp_path / "adamw"), str(tmp_path / "sophia"), "--out", str(tmp_path / "out")]
    assert compare.main(args) == 0  # one size, no flag: no scaling view, no note
    assert "scaling" not in capsys.readouterr().err and not (tmp_path / "out" / "scaling.png").exists()
    assert compare.main(args + ["--scaling"]) == 0
    err = capsys.readouterr().err
    assert "scaling view needs runs of at least two model sizes" in err and "only one model size (24.7k non-embedding" in err
    assert not (tmp_path / "out" / "scaling.json").exists()


def test_scaling_leaves_out_unfinished_and_sizeless_runs(tmp_path, capsys):
    _scaling_sweep(tmp_path / "runs")
    write_run(tmp_path / "runs" / "cut", optimizer="adamw", overrides=["optimizer=adamw", "seed=9"], steps=100,
              loss_at=linear(0.01), model=_nano(3), max_steps=200)
    write_run(tmp_path / "runs" / "bare", optimizer="adamw", overrides=["optimizer=adamw", "seed=8"], steps=100,
              loss_at=linear(0.01))
    out = tmp_path / "out"
    assert compare.main([str(p) for p in sorted((tmp_path / "runs").iterdir())] + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"left out {tmp_path / 'runs' / 'cut'}: unfinished (step 100 of 200)" in err
    assert f"left out {tmp_path / 'runs' / 'bare'}: no model settings" in err
    report = json.loads((out / "scaling.json").read_text())
    assert all("cut" not in r and "bare" not in r for p in report["points"] for r in p["runs"])
    assert compare.main([str(p) for p in sorted((tmp_path / "runs").iterdir())]
                        + ["--out", str(tmp_path / "o2"), "--no-scaling"]) == 0
    assert not (tmp_path / "o2" / "scaling.png").exists()


def test_downstream_accuracies_get_their_own_figure_only_when_logged(tmp_path):
    for name, acc in (("a", 0.30), ("b", 0.35)):
        run = write_run(tmp_path / name, optimizer=name, overrides=[f"optimizer={name}"], steps=100,
                        loss_at=linear(0.01))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            if r["step"] % 50 == 0:
                r["eval/hellaswag_acc"], r["eval/hellaswag_acc_norm"] = acc, acc + 0.02
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert (out / "downstream.png").read_bytes()[:8] == PNG_MAGIC
    groups = {name: [load_run(tmp_path / name)] for name in ("a", "b")}
    fig = plots.downstream_figure(groups)
    axes = fig.axes[:2]
    assert [ax.get_title() for ax in axes] == [t for _, t in plots.DOWNSTREAM_PANELS]
    assert [[line.get_ydata()[-1] for line in ax.get_lines() if line.get_label() in groups]
            for ax in axes] == [[0.30, 0.35], [0.32, 0.37]]
    plain = tmp_path / "plain"
    write_run(plain, optimizer="c", overrides=[], steps=50, loss_at=linear(0.01))
    assert compare.main([str(plain), "--out", str(tmp_path / "o2")]) == 0
    assert not (tmp_path / "o2" / "downstream.png").exists()
