"""lr sensitivity (analysis/sensitivity.py, compare.py's lr_sensitivity.png and table) on synthetic
sweeps over optimizer.lr (and optimizer.rho) with known final losses."""
from __future__ import annotations

import json
import math

import pytest
from test_compare import PNG_MAGIC, compare, write_run

from analysis import plots, sensitivity
from analysis.runs import collect_runs

STEPS = 100


def _run(root, opt: str, lr: float, seed: int, final: float | None, rho: float | None = None, nan: bool = False):
    """A run falling linearly to `final`; `final=None`: its loss rises above its start (diverged);
    `nan`: its last val loss is NaN (diverged)."""
    overrides = [f"optimizer={opt}", f"optimizer.lr={lr}", f"seed={seed}"] + ([f"optimizer.rho={rho}"] if rho else [])
    run = write_run(root / f"{opt}-{lr}-{rho}-{seed}", optimizer=opt, overrides=overrides, steps=STEPS,
                    loss_at=(lambda s: 3.5 + 0.002 * s) if final is None else (lambda s: final + 0.002 * (STEPS - s)))
    if nan:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[-1]["val/loss"] = "nan"
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sweep(root):
    # adamw: 4 lrs x 2 seeds (+-0.01 around 3.50, 3.32, 3.30; every run at 3e-3 NaN)
    for lr, final in ((1e-4, 3.50), (3e-4, 3.32), (1e-3, 3.30), (3e-3, None)):
        for seed, delta in ((1, -0.01), (2, 0.01)):
            _run(root, "adamw", lr, seed, None if final is None else final + delta, nan=final is None)
    # sophia: 2 lrs x 2 rhos x 2 seeds; at 1e-3 rho 0.05 is best (3.20) though one of its seeds diverged
    for lr, rho, finals in ((1e-4, 0.03, (3.60, 3.60)), (1e-4, 0.05, (3.44, 3.46)), (1e-3, 0.03, (3.50, 3.50)),
                            (1e-3, 0.05, (3.20, None))):
        for seed, final in enumerate(finals, start=1):
            _run(root, "sophia", lr, seed, final, rho=rho)
    # lion: one lr only, so no line and no row
    _run(root, "lion", 1e-4, 1, 3.4)
    return sorted(root.iterdir())


def test_best_lr_and_the_width_of_the_flat_range(tmp_path):
    points = sensitivity.lr_points(collect_runs(_sweep(tmp_path)))
    assert list(points) == ["adamw", "sophia"]
    adamw = points["adamw"]
    assert [p.lr for p in adamw] == [1e-4, 3e-4, 1e-3, 3e-3]
    assert [p.mean for p in adamw[:3]] == pytest.approx([3.50, 3.32, 3.30])
    assert adamw[0].std == pytest.approx(0.02 / math.sqrt(2)) and adamw[0].n == 2
    assert adamw[3].mean is None and adamw[3].diverged == 2  # the x at the top
    sophia = points["sophia"]
    assert sophia[0].mean == pytest.approx(3.45) and "optimizer.rho=0.05" in sophia[0].config  # tuned rho
    assert (sophia[1].mean, sophia[1].n, sophia[1].diverged) == (pytest.approx(3.20), 1, 1)

    rows = {r["optimizer"]: r for r in sensitivity.lr_table(points)}
    a = rows["adamw"]
    assert a["best_lr"] == 1e-3 and a["best_loss"] == pytest.approx(3.30)
    # within 1%: loss <= 3.333, so 3e-4 (3.32) is in, 1e-4 (3.50) out, 3e-3 diverged
    assert a["within_1pct"] == [3e-4, 1e-3] and a["width_decades"] == pytest.approx(math.log10(1e-3 / 3e-4))
    assert a["at_edge"] is False and a["seeds"] == 2 and a["diverged_at_best"] == 0
    s = rows["sophia"]
    assert s["best_lr"] == 1e-3 and s["width_decades"] == 0.0 and s["at_edge"] is True
    assert s["diverged_at_best"] == 1

    printed = sensitivity.format_lr_table(list(rows.values()), "val/loss")
    assert "adamw" in printed and "0.0003-0.001" in printed and " 0.52 " in printed and "(1 diverged)" in printed


def test_figure_and_cli(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = _sweep(tmp_path / "runs")
    fig = plots.lr_sensitivity_figure(sensitivity.lr_points(collect_runs(paths)))
    try:
        (ax,) = fig.axes
        assert ax.get_xscale() == "log" and "learning rate" in ax.get_xlabel() and "loss" in ax.get_ylabel()
        crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
        assert sorted(x for line in crosses for x in line.get_xdata()) == [1e-3, 3e-3]
        assert all(list(line.get_ydata()) == [0.97] for line in crosses)  # the top of the axis
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["adamw", "sophia", "diverged at this lr"]
    finally:
        plt.close(fig)

    out = tmp_path / "out"
    assert compare.main([str(p) for p in paths] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "lr_sensitivity.png").read_bytes()[:8] == PNG_MAGIC
    assert "lr sensitivity" in printed
    table = json.loads((out / "speedup.json").read_text())["lr_sensitivity"]["table"]
    assert [(r["optimizer"], r["best_lr"]) for r in table] == [("adamw", 1e-3), ("sophia", 1e-3)]
