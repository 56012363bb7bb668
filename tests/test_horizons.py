"""The fitted speed-up across horizons (analysis/horizons.py, compare.py's horizons.json and
horizons.png) on synthetic runs whose final losses follow a known power law in tokens."""
from __future__ import annotations

import json
import math

import pytest
from test_compare import PNG_MAGIC, compare, write_run

from analysis import horizons, plots
from analysis.horizons import Fit
from analysis.runs import collect_runs

TOKENS_PER_STEP = 1000
A, ALPHA, E = 50.0, 0.3, 1.5  # adamw's law in raw tokens: L(D) = 50 * D^-0.3 + 1.5
HORIZONS = (100, 200, 400, 800)  # steps; D = 1e5 .. 8e5 tokens


def law(d: float, scale: float = 1.0) -> float:
    """adamw's loss at D tokens; `scale` = 2: a line that reaches every loss with half the tokens."""
    return A * (scale * d) ** (-ALPHA) + E


def _run(root, opt: str, steps: int, final: float | None, seed: int = 1, branch: bool = False, extra=()):
    """A finished run of `steps` steps whose val loss falls linearly to `final` (None: it rises
    above its start, i.e. diverges); `branch`: a cooldown branch of a WSD parent."""
    overrides = [f"optimizer={opt}", f"train.max_steps={steps}", f"seed={seed}", *extra]
    if branch:
        overrides.append(f"checkpoint.branch_from={root}/{opt}-parent")
    run = write_run(root / f"{opt}-{steps}-{seed}-{'-'.join(extra)}", optimizer=opt, overrides=overrides, steps=steps,
                    tokens_per_step=TOKENS_PER_STEP,
                    loss_at=(lambda s: 3.5 + 0.002 * s) if final is None else (lambda s: final + 0.001 * (steps - s)))
    config = run / "config.yaml"
    config.write_text(config.read_text() + f"train:\n  max_steps: {steps}\n"
                      + (f"checkpoint:\n  branch_from: {root}/{opt}-parent\n" if branch else ""))
    return run


def _sweep(root):
    """adamw: 4 horizons x 2 seeds (+-0.002 around the law; horizons 200 and 400 are cooldown
    branches) and one diverged seed at 800; sophia: 4 horizons reaching every loss with half the
    tokens; muon: 3 horizons on sophia's law; lion: 4 horizons off any power law (a zigzag);
    adafactor: 2 horizons."""
    for steps in HORIZONS:
        for seed, delta in ((1, -0.002), (2, 0.002)):
            _run(root, "adamw", steps, law(steps * TOKENS_PER_STEP) + delta, seed, branch=steps in (200, 400))
        _run(root, "sophia", steps, law(steps * TOKENS_PER_STEP, 2.0))
        _run(root, "lion", steps, law(steps * TOKENS_PER_STEP) + (0.03 if steps in (100, 400) else -0.03))
    _run(root, "adamw", 800, None, seed=3)
    for steps in HORIZONS[:3]:
        _run(root, "muon", steps, law(steps * TOKENS_PER_STEP, 2.0))
    for steps in HORIZONS[:2]:
        _run(root, "adafactor", steps, law(steps * TOKENS_PER_STEP))
    return sorted(root.iterdir())


def _lines(paths):
    lines, left_out = horizons.horizon_lines(collect_runs(paths))
    return {line.line: line for line in lines}, left_out


def test_fit_recovers_the_law_and_seeds_average(tmp_path):
    lines, _ = _lines(_sweep(tmp_path))
    assert sorted(lines) == ["adafactor", "adamw", "lion", "muon", "sophia"]  # branches, horizons: one line
    adamw = lines["adamw"]
    assert [h.steps for h in adamw.horizons] == list(HORIZONS)
    h = adamw.horizons[0]
    assert h.d == 100 * TOKENS_PER_STEP and h.mean == pytest.approx(law(1e5), abs=1e-12)
    rec = h.record()
    assert (rec["n"], rec["min"], rec["max"]) == (2, pytest.approx(law(1e5) - 0.002), pytest.approx(law(1e5) + 0.002))
    assert rec["std"] == pytest.approx(0.004 / math.sqrt(2))
    f = adamw.fit
    assert (f.big_a, f.alpha, f.e) == (pytest.approx(A, rel=1e-6), pytest.approx(ALPHA, rel=1e-6),
                                       pytest.approx(E, rel=1e-6))
    assert f.d_ref == 1e5 and f.a == pytest.approx(A * 1e5 ** -ALPHA, rel=1e-6)
    assert adamw.rms < 1e-8 and max(abs(r) for r in adamw.residuals) < 1e-8
    assert adamw.good and adamw.reason is None
    # noise: every horizon has std 0.004/sqrt(2) over 2 seeds, so the standard error is 0.002
    assert adamw.noise == pytest.approx(0.002) and adamw.tolerance == pytest.approx(0.01)
    s = lines["sophia"].fit
    assert s.big_a == pytest.approx(A * 2 ** -ALPHA, rel=1e-6) and s.alpha == pytest.approx(ALPHA, rel=1e-6)
    assert s.e == pytest.approx(E, rel=1e-6) and lines["sophia"].good


def test_diverged_run_is_left_out_and_named(tmp_path):
    lines, left_out = _lines(_sweep(tmp_path))
    top = lines["adamw"].horizons[-1]
    assert top.steps == 800 and len(top.runs) == 2 and top.mean == pytest.approx(law(8e5), abs=1e-12)
    (gone,) = left_out
    assert gone["path"].endswith("adamw-800-3-") and gone["reason"].startswith("diverged at step")


def test_not_a_power_law_is_not_good(tmp_path):
    lines, _ = _lines(_sweep(tmp_path))
    lion = lines["lion"]
    assert lion.fit is not None and not lion.good
    assert lion.rms > horizons.RMS_FLOOR and lion.tolerance == horizons.RMS_FLOOR  # one seed: 0.01 nats
    assert "rms residual" in lion.reason and "above the tolerance" in lion.reason


def test_seed_noise_widens_the_tolerance(tmp_path):
    """The same zigzag means as lion's, but with seeds +-0.1 apart: within the noise, so good."""
    for steps in HORIZONS:
        for seed, delta in ((1, -0.1), (2, 0.1)):
            zig = 0.03 if steps in (100, 400) else -0.03
            _run(tmp_path, "lion", steps, law(steps * TOKENS_PER_STEP) + zig + delta, seed)
    (lion,), _ = horizons.horizon_lines(collect_runs(sorted(tmp_path.iterdir())))
    assert lion.noise == pytest.approx(0.1) and lion.tolerance == pytest.approx(0.1)
    assert horizons.RMS_FLOOR < lion.rms < 0.1 and lion.good


def test_three_horizons_fit_exactly_but_are_never_good(tmp_path):
    lines, _ = _lines(_sweep(tmp_path))
    muon = lines["muon"]
    assert len(muon.horizons) == 3 and muon.fit.alpha == pytest.approx(ALPHA, rel=1e-6)
    assert muon.rms < 1e-8 and not muon.good and muon.reason.startswith("only 3 horizons")
    ada = lines["adafactor"]
    assert ada.fit is None and not ada.good and "at least 3" in ada.reason


def test_judge_rule_boundaries():
    fit = Fit(1.0, 0.3, 1.5, 1e5)
    assert horizons.judge(4, 0.01, 0.01, fit) == (True, None)
    assert horizons.judge(4, 0.0101, 0.01, fit)[0] is False
    assert horizons.judge(3, 0.0, 0.01, fit)[0] is False
    assert "does not fall" in horizons.judge(4, 0.0, 0.01, Fit(0.0, 0.3, 1.5, 1e5))[1]
    assert "bound" in horizons.judge(4, 0.0, 0.01, Fit(1.0, horizons.ALPHA_MAX, 1.5, 1e5))[1]
    assert horizons.judge(4, 0.0, 0.01, fit, "did not converge") == (False, "did not converge")


def test_tokens_to_reach_inverts_the_law():
    fit = Fit(A * 1e5 ** -ALPHA, ALPHA, E, 1e5)
    assert fit.big_a == pytest.approx(A)
    for d in (3e4, 1e5, 7.7e5, 1e8):
        assert fit.loss(d) == pytest.approx(law(d), rel=1e-12)
        assert fit.tokens_to_reach(law(d)) == pytest.approx(d, rel=1e-9)
    assert fit.tokens_to_reach(E) is None and fit.tokens_to_reach(E - 0.1) is None


def test_fitted_ratio_is_one_half(tmp_path):
    lines, _ = _lines(_sweep(tmp_path))
    rows = horizons.fitted_ratios(list(lines.values()))
    (sa,) = [r for r in rows if r["a"] == "sophia" and r["b"] == "adamw"]
    assert sa["good"] and [c["steps_b"] for c in sa["at"]] == list(HORIZONS)
    for cell in sa["at"]:
        assert cell["ratio"] == pytest.approx(0.5, rel=1e-6)
        assert cell["tokens_a"] == pytest.approx(cell["tokens_b"] / 2, rel=1e-6)
        assert cell["loss"] == pytest.approx(law(cell["tokens_b"]), rel=1e-9)
    # sophia needs 5e4 tokens for adamw's 100-step loss: below its own smallest horizon (1e5)
    assert "below sophia's smallest horizon (100 steps)" in sa["at"][0]["extrapolated"]
    assert [c["extrapolated"] for c in sa["at"][1:]] == [None, None, None]
    (as_,) = [r for r in rows if r["a"] == "adamw" and r["b"] == "sophia"]
    assert [c["ratio"] for c in as_["at"]] == pytest.approx([2.0] * 4, rel=1e-6)
    assert "beyond adamw's largest horizon (800 steps)" in as_["at"][-1]["extrapolated"]
    assert as_["at"][0]["extrapolated"] is None
    # a fit that is not good gives no ratio, only the reason
    (ml,) = [r for r in rows if r["a"] == "muon" and r["b"] == "adamw"]
    assert not ml["good"] and ml["at"] == [] and "fit of muon not good: only 3 horizons" in ml["reason"]
    (la,) = [r for r in rows if r["a"] == "lion" and r["b"] == "adamw"]
    assert la["at"] == [] and "fit of lion not good: rms residual" in la["reason"]
    assert not any(r["a"] == "adafactor" or r["b"] == "adafactor" for r in rows)  # no fit, no pairs


def test_a_line_whose_floor_is_above_the_target_never_reaches_it():
    hi = horizons.Line("hi", [horizons.Horizon(s, [], [s * 1e3], [law(s * 1e3) + 2.0]) for s in HORIZONS])  # E = 3.5
    # lo's losses stay below 3.1 at every horizon: under hi's floor
    lo = horizons.Line("lo", [horizons.Horizon(s, [], [s * 1e3], [law(s * 1e3)]) for s in HORIZONS])
    for line in (hi, lo):
        horizons.fit_line(line)
        assert line.good
    (row,) = [r for r in horizons.fitted_ratios([hi, lo]) if r["a"] == "hi"]
    assert all(c["ratio"] is None and "never reaches it" in c["note"] for c in row["at"])


def test_figure_and_cli(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = _sweep(tmp_path / "runs")
    lines, _ = horizons.horizon_lines(collect_runs(paths))
    fig = plots.horizons_figure(lines)
    try:
        (ax,) = fig.axes
        assert ax.get_xscale() == "log" and "tokens" in ax.get_xlabel() and "loss" in ax.get_ylabel()
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 4  # adamw, lion, muon, sophia: fitted; adafactor: points only
        assert len(ax.containers) == 5  # one errorbar set per line
        (legend,) = fig.legends
        texts = [t.get_text() for t in legend.get_texts()]
        assert texts[0].startswith("adafactor: no fit") and "(fit not good)" in texts[2]
    finally:
        plt.close(fig)

    out = tmp_path / "out"
    assert compare.main([str(p) for p in paths] + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert (out / "horizons.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out / "horizons.json").read_text())
    by_line = {line["line"]: line for line in report["lines"]}
    assert by_line["adamw"]["alpha"] == pytest.approx(ALPHA, rel=1e-6) and by_line["adamw"]["good"] is True
    assert by_line["adamw"]["A"] == pytest.approx(A, rel=1e-6) and by_line["adamw"]["E"] == pytest.approx(E, rel=1e-6)
    assert by_line["muon"]["good"] is False and by_line["muon"]["reason"].startswith("only 3 horizons")
    assert [h["steps"] for h in by_line["adamw"]["horizons"]] == list(HORIZONS)
    assert len(report["left_out"]) == 1 and "diverged" in report["left_out"][0]["reason"]
    assert "sophia needs 0.50x adamw's tokens at adamw's 400-step loss" in captured.out
    assert "lion: 4 horizons" in captured.out and "fit not good: rms residual" in captured.out
    assert "note: horizons: left out" in captured.err
    fitted = json.loads((out / "speedup.json").read_text())["fitted"]
    assert fitted["file"] == "horizons.json" and fitted["pairs"] == report["pairs"]
    for name in ("loss.png", "diagnostics.png"):  # the other outputs are still there
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_no_horizons_file_without_three_horizons(tmp_path):
    paths = [_run(tmp_path / "runs", "adamw", s, law(s * TOKENS_PER_STEP)) for s in HORIZONS[:2]]
    out = tmp_path / "out"
    assert compare.main([str(p) for p in paths] + ["--out", str(out)]) == 0
    assert not (out / "horizons.json").exists() and not (out / "horizons.png").exists()
    assert "fitted" not in json.loads((out / "speedup.json").read_text())
