"""Verdicts with error bars (analysis/verdicts.py), the speed-up's seed range (analysis/speedup.py) and
diverged runs in compare.py: Welch's test on samples whose p-value, interval and degrees of freedom
are known, and synthetic runs written the way tests/test_compare.py writes them."""
from __future__ import annotations

import json
import math

import pytest
from test_compare import PNG_MAGIC, compare, linear, write_run

from analysis import plots, speedup
from analysis.runs import collect_runs, group_runs, split_diverged
from analysis.verdicts import verdict_text, verdicts, welch

VERDICT_KEYS = {"a", "b", "n_a", "n_b", "mean_a", "mean_b", "diff", "ci95", "p_value", "significant"}


def test_welch_on_two_groups_of_known_means_and_spread():
    # means 3.01 and 3.11, sample variance 1e-4 each: se = sqrt(2e-4 / 3), t = -0.1 / se = -12.247,
    # df = 4 exactly; for 4 df the t CDF has a closed form, P(|T| < t) = sin(a) (1 + cos(a)^2 / 2)
    # with a = atan(t / 2), which gives p = 2.552167e-4; t_0.975(4) = 2.7764451 (tables).
    w = welch([3.00, 3.01, 3.02], [3.10, 3.11, 3.12])
    se = math.sqrt(2e-4 / 3)
    a = math.atan(0.1 / se / 2)
    assert w.diff == pytest.approx(-0.10) and w.se == pytest.approx(se) and w.t == pytest.approx(-12.2474487)
    assert w.df == pytest.approx(4.0)
    assert w.p_value == pytest.approx(1 - math.sin(a) * (1 + math.cos(a) ** 2 / 2), rel=1e-9)
    assert w.p_value == pytest.approx(2.552167494e-4, rel=1e-8)
    assert w.ci95 == pytest.approx((-0.10 - 2.7764451052 * se, -0.10 + 2.7764451052 * se))
    assert w.ci95 == pytest.approx((-0.1226695794, -0.0773304206))


def test_welch_no_difference():
    # [3.00, 3.02, 3.04] vs [3.01, 3.03, 3.05]: diff -0.01, t = -0.6124, df = 4, p = 0.5734
    w = welch([3.00, 3.02, 3.04], [3.01, 3.03, 3.05])
    assert w.diff == pytest.approx(-0.01) and w.df == pytest.approx(4.0)
    assert w.p_value == pytest.approx(0.5733922538, rel=1e-8)
    assert w.ci95 == pytest.approx((-0.0553391587, 0.0353391587))
    assert w.ci95[0] < 0 < w.ci95[1]


def test_welch_unequal_variances_uses_welch_satterthwaite_df():
    # var_a = 0.1 over 5, var_b = 1e-4 over 3: df = (0.02 + 3.33e-5)^2 / (0.02^2 / 4 + (3.33e-5)^2 / 2)
    # = 4.01332, not the pooled test's 6 (which would give p = 0.0178 instead of 0.0125)
    a, b = [1.0, 1.2, 1.4, 1.6, 1.8], [2.0, 2.01, 2.02]
    w = welch(a, b)
    assert w.df == pytest.approx(4.013322148, rel=1e-9)
    assert w.diff == pytest.approx(-0.61) and w.t == pytest.approx(-4.309761393)
    assert w.p_value == pytest.approx(0.01245789902, rel=1e-8)
    assert w.ci95 == pytest.approx((-1.0024617783, -0.2175382217))
    with pytest.raises(ValueError, match="at least two"):
        welch([1.0], b)
    same = welch([3.0, 3.0], [3.1, 3.1])  # no spread at all: no test
    assert same.p_value is None and same.ci95 is None and same.diff == pytest.approx(-0.1)


def _seed_group(root, opt: str, finals, steps: int = 100, first_seed: int = 1):
    """Runs of `opt`, one per final val loss, seeds first_seed, first_seed + 1, ...: each falls
    linearly by 0.002/step to its final loss."""
    for i, final in enumerate(finals):
        seed = first_seed + i
        write_run(root / f"{opt}-{seed}", optimizer=opt, overrides=[f"optimizer={opt}", f"seed={seed}"],
                  steps=steps, loss_at=lambda s, f=final: f + 0.002 * (steps - s))


def test_cli_writes_verdicts_and_says_them_in_words(tmp_path, capsys):
    _seed_group(tmp_path / "runs", "adamw", [3.00, 3.01, 3.02])
    _seed_group(tmp_path / "runs", "sophia", [3.10, 3.11, 3.12])
    _seed_group(tmp_path / "runs", "lion", [3.00, 3.02, 3.04])
    _seed_group(tmp_path / "runs", "muon", [3.01, 3.03, 3.05])
    out = tmp_path / "out"
    assert compare.main([str(p) for p in sorted((tmp_path / "runs").iterdir())] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "speedup.json").read_text())
    rows = {(v["a"], v["b"]): v for v in report["verdicts"]}
    assert len(rows) == 6  # every unordered pair of the four groups
    for v in rows.values():
        assert set(v) == VERDICT_KEYS
    v = rows["adamw (3 seeds)", "sophia (3 seeds)"]
    assert (v["n_a"], v["n_b"]) == (3, 3)
    assert v["mean_a"] == pytest.approx(3.01) and v["mean_b"] == pytest.approx(3.11)
    assert v["diff"] == pytest.approx(-0.10) and v["p_value"] == pytest.approx(2.552167494e-4, rel=1e-6)
    assert v["ci95"] == pytest.approx([-0.1226695794, -0.0773304206]) and v["significant"] is True
    assert "adamw lower by 0.100 ± 0.023, p = 0.00026, 3 vs 3 seeds" in printed
    v = rows["lion (3 seeds)", "muon (3 seeds)"]
    assert v["significant"] is False and v["p_value"] == pytest.approx(0.5733922538, rel=1e-6)
    assert "no significant difference (p = 0.57, 3 vs 3 seeds)" in printed
    # the speed-up gets its seed range: each group's seeds fall at the same rate, so every
    # pairing's ratio lies between the mean curves' extremes
    pair = next(r for r in report["pairs"] if r["a"] == "adamw (3 seeds)" and r["b"] == "sophia (3 seeds)")
    assert pair["seeds"]["steps"]["pairings"] == 9 and pair["seeds"]["steps"]["reached"] == 9
    lo, hi = pair["seeds"]["steps"]["range"]
    assert lo <= pair["axes"]["steps"]["ratio"] <= hi
    assert "Seed range of the speed-up" in printed


def test_one_seed_per_group_writes_no_verdict_and_says_so(tmp_path, capsys):
    _seed_group(tmp_path / "runs", "adamw", [3.0])
    _seed_group(tmp_path / "runs", "sophia", [3.1])
    out = tmp_path / "out"
    assert compare.main([str(p) for p in sorted((tmp_path / "runs").iterdir())] + ["--out", str(out)]) == 0
    assert "No verdicts on final val/loss" in capsys.readouterr().out
    report = json.loads((out / "speedup.json").read_text())
    assert report["verdicts"] == [] and all("seeds" not in r for r in report["pairs"])
    assert not (out / "lr_sensitivity.png").exists()  # one lr per optimizer: skipped silently


def test_verdict_text_names_the_lower_group():
    base = {"a": "adamw (3 seeds)", "b": "lion (3 seeds)", "n_a": 3, "n_b": 2}
    assert verdict_text(base | {"diff": 0.041, "ci95": [0.029, 0.053], "p_value": 0.002, "significant": True}) == (
        "lion lower by 0.041 ± 0.012, p = 0.002, 3 vs 2 seeds")
    assert verdict_text(base | {"diff": 0.01, "ci95": [-0.02, 0.04], "p_value": 0.41, "significant": False}) == (
        "no significant difference (p = 0.41, 3 vs 2 seeds)")


def test_seed_range_of_the_speedup_over_seed_pairings():
    # Linear curves 6 - r * step over 0..200: A seed with rate ra reaches B seed's final loss
    # (6 - 200 rb) at 200 rb / ra, B at 200, so each pairing's ratio is rb / ra.
    def curve(label, rate):
        steps = list(range(0, 201, 10))
        return speedup.Curve(label, [6.0 - rate * s for s in steps],
                             {"steps": steps, "tokens": [1000 * s for s in steps], "flops": None, "seconds": None})

    a = [curve("a1", 0.02), curve("a2", 0.025)]
    b = [curve("b1", 0.01), curve("b2", 0.0125)]
    r = speedup.seed_ranges(a, b)
    assert r["steps"]["range"] == pytest.approx([0.4, 0.625])  # 0.01/0.025 .. 0.0125/0.02
    assert (r["steps"]["reached"], r["steps"]["pairings"]) == (4, 4)
    assert r["tokens"]["range"] == pytest.approx([0.4, 0.625]) and r["flops"]["range"] is None
    # a seed that never gets there is counted apart, not folded into the range
    r = speedup.seed_ranges(a + [curve("a3", 0.005)], b)
    assert r["steps"]["range"] == pytest.approx([0.4, 0.625])
    assert (r["steps"]["reached"], r["steps"]["pairings"]) == (4, 6)


def _rewrite(run_dir, edit):
    """Apply `edit(rows) -> rows` to a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edit(rows)))


def test_diverged_runs_are_left_out_of_the_mean_and_listed(tmp_path, capsys):
    runs = tmp_path / "runs"
    _seed_group(runs, "adamw", [3.00, 3.02])
    _seed_group(runs, "sophia", [3.10, 3.12])
    # adamw seed 3: its train loss turns NaN at step 60 and the run stops there (written "nan")
    write_run(runs / "adamw-3", optimizer="adamw", overrides=["optimizer=adamw", "seed=3"], steps=100,
              loss_at=linear(0.002, start=3.2))
    _rewrite(runs / "adamw-3", lambda rows: [r | ({"train/loss": "nan"} if r["step"] == 60 else {})
                                             for r in rows if r["step"] <= 60])
    # sophia seed 3: ends above its step-0 val loss, finite throughout
    write_run(runs / "sophia-3", optimizer="sophia", overrides=["optimizer=sophia", "seed=3"], steps=100,
              loss_at=lambda s: 3.5 - 0.004 * s if s <= 50 else 3.3 + 0.006 * (s - 50))
    out = tmp_path / "out"
    assert compare.main([str(p) for p in sorted(runs.iterdir())] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "speedup.json").read_text())
    (v,) = report["verdicts"]
    assert (v["n_a"], v["n_b"]) == (2, 2)  # three seeds each, one diverged each
    assert v["mean_a"] == pytest.approx(3.01) and v["mean_b"] == pytest.approx(3.11)
    assert report["runs"]["adamw (3 seeds)"]["final"] == pytest.approx(3.01)  # the curve's mean, too
    assert sorted(report["runs"]["adamw (3 seeds)"]["paths"]) == [str(runs / "adamw-1"), str(runs / "adamw-2")]
    diverged = {d["path"]: d for d in report["diverged"]}
    assert set(diverged) == {str(runs / "adamw-3"), str(runs / "sophia-3")}
    assert diverged[str(runs / "adamw-3")]["step"] == 60
    assert "non-finite train/loss" in diverged[str(runs / "adamw-3")]["reason"]
    assert diverged[str(runs / "sophia-3")]["step"] == 100  # val 3.5 at 0, 3.3 at 50, 3.6 at 100
    assert "Diverged runs" in printed and "diverged at step 60" in printed and str(runs / "sophia-3") in printed
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC

    # drawn apart: a dotted line and an x in the group's colour, in every loss panel that has points
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    healthy, gone = split_diverged(group_runs(collect_runs(sorted(runs.iterdir()))))
    assert [len(m) for m in healthy.values()] == [2, 2] and len(gone) == 2
    fig = plots.loss_figure(healthy, 1, diverged=gone)
    try:
        for ax in fig.axes:
            xs = [line for line in ax.get_lines() if line.get_marker() == "x"]
            assert len(xs) == 2, ax.get_title()
            top = ax.get_ylim()[1]
            assert all(line.get_ydata()[0] <= top for line in xs)  # held inside the panel
        (legend,) = fig.legends
        assert any("diverged" in t.get_text() for t in legend.get_texts())
    finally:
        plt.close(fig)


def test_a_group_whose_runs_all_diverged_has_no_mean(tmp_path, capsys):
    runs = tmp_path / "runs"
    _seed_group(runs, "adamw", [3.00, 3.02])
    _seed_group(runs, "sophia", [3.10, 3.12])
    for seed in (1, 2):
        write_run(runs / f"lion-{seed}", optimizer="lion", overrides=["optimizer=lion", f"seed={seed}"], steps=100,
                  loss_at=lambda s: 3.0 + 0.01 * s)
    out = tmp_path / "out"
    assert compare.main([str(p) for p in sorted(runs.iterdir())] + ["--out", str(out)]) == 0
    assert "every run of lion (2 seeds) diverged" in capsys.readouterr().err
    report = json.loads((out / "speedup.json").read_text())
    assert sorted(report["runs"]) == ["adamw (2 seeds)", "sophia (2 seeds)"]
    assert [(v["a"], v["b"]) for v in report["verdicts"]] == [("adamw (2 seeds)", "sophia (2 seeds)")]
    assert len(report["diverged"]) == 2
    assert verdicts(split_diverged(group_runs(collect_runs(sorted(runs.iterdir()))))[0]) == report["verdicts"]


class _Finished:
    """A run as verdicts() reads it: its final loss and its horizon."""

    def __init__(self, loss: float, max_steps: int):
        self.loss, self.max_steps = loss, max_steps

    def final(self, metric: str) -> float:
        return self.loss

    def setting(self, dotted: str) -> float | None:
        return self.max_steps if dotted == "train.max_steps" else None


def test_verdicts_pair_groups_at_the_same_horizon_only():
    groups = {f"{opt} train.max_steps={t}": [_Finished(base + t * 1e-4 + d, t) for d in (0.0, 0.01, 0.02)]
              for opt, base in (("adamw", 1.0), ("sophia", 1.1)) for t in (500, 1000)}
    pairs = {(v["a"], v["b"]) for v in verdicts(groups)}
    assert pairs == {("adamw train.max_steps=500", "sophia train.max_steps=500"),
                     ("adamw train.max_steps=1000", "sophia train.max_steps=1000")}
