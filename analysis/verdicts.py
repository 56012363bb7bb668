"""Verdicts with error bars: is one group's final loss lower than another's, beyond seed noise?

For every pair of seed groups (runs differing only in ``seed``: :func:`analysis.runs.group_runs`)
that both have at least two non-diverged runs, the final values of the metric (its last finite
point, ``val/loss`` by default, unsmoothed) are compared with Welch's t-test, which does not assume
equal variances (groups at different horizons, ``train.max_steps``, are not paired):

- ``diff = mean_a - mean_b``, ``se = sqrt(var_a / n_a + var_b / n_b)`` (sample variances, n - 1);
- Welch-Satterthwaite degrees of freedom
  ``df = se^4 / ((var_a / n_a)^2 / (n_a - 1) + (var_b / n_b)^2 / (n_b - 1))``;
- ``t = diff / se``, two-sided ``p = 2 * sf_t(|t|, df)``, ``ci95 = diff -+ ppf_t(0.975, df) * se``;
- ``significant``: ``p < 0.05``.

The t distribution is scipy's. When no seed of either group differs from the others (``se = 0``)
the test is undefined: ``p_value`` and ``ci95`` are null and the verdict is not significant.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from analysis.runs import Run

ALPHA = 0.05


@dataclass(frozen=True)
class Welch:
    """Welch's t-test of mean(a) - mean(b); `df`, `t`, `p_value` and `ci95` are None when se = 0."""

    diff: float
    se: float
    df: float | None
    t: float | None
    p_value: float | None
    ci95: tuple[float, float] | None


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Welch:
    """Welch's two-sided t-test and the `confidence` interval of mean(a) - mean(b) (module docstring).

    Raises ValueError unless both samples have at least two values.
    """
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least two values per sample, got {len(a)} and {len(b)}")
    diff = statistics.fmean(a) - statistics.fmean(b)
    wa, wb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(wa + wb)
    if se == 0:
        return Welch(diff, 0.0, None, None, None, None)
    df = (wa + wb) ** 2 / (wa**2 / (len(a) - 1) + wb**2 / (len(b) - 1))
    t = diff / se
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Welch(diff, se, df, t, float(2 * stats.t.sf(abs(t), df)), (diff - half, diff + half))


def final_values(runs: Sequence[Run], metric: str) -> list[float]:
    """Each run's final value of `metric` (runs without one left out)."""
    values = [r.final(metric) for r in runs]
    return [v for v in values if v is not None]


def horizon(runs: Sequence[Run]) -> float | None:
    """The groups' common ``train.max_steps`` (its first run's), or None when unknown."""
    return runs[0].setting("train.max_steps") if runs else None


def verdicts(groups: dict[str, list[Run]], metric: str = "val/loss") -> list[dict]:
    """One verdict per unordered pair of groups (in group order) with >= 2 final values each and
    the same horizon (``train.max_steps``): a 500-step run's loss says nothing against a
    2000-step run's, so groups at different horizons are not paired.

    `groups` must hold only non-diverged runs (:func:`analysis.runs.split_diverged`). Each verdict
    has exactly the keys ``a, b, n_a, n_b, mean_a, mean_b, diff, ci95, p_value, significant``.
    """
    finals = {label: final_values(runs, metric) for label, runs in groups.items()}
    labels = [label for label, values in finals.items() if len(values) >= 2]
    rows = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if horizon(groups[a]) != horizon(groups[b]):
                continue
            w = welch(finals[a], finals[b])
            rows.append({"a": a, "b": b, "n_a": len(finals[a]), "n_b": len(finals[b]),
                         "mean_a": statistics.fmean(finals[a]), "mean_b": statistics.fmean(finals[b]),
                         "diff": w.diff, "ci95": list(w.ci95) if w.ci95 else None, "p_value": w.p_value,
                         "significant": w.p_value is not None and w.p_value < ALPHA})
    return rows


def _name(label: str) -> str:
    """A group label without its "(N seeds)" suffix: the verdict states the seed counts itself."""
    return re.sub(r" \(\d+ seeds\)$", "", label)


def verdict_text(v: dict) -> str:
    """One verdict in plain words: "adamw lower by 0.041 ± 0.012, p = 0.002, 3 vs 3 seeds"."""
    seeds = f"{v['n_a']} vs {v['n_b']} seeds"
    if v["p_value"] is None:
        return f"no test: every seed ended at the same loss ({seeds})"
    if not v["significant"]:
        return f"no significant difference (p = {v['p_value']:.2g}, {seeds})"
    lower = _name(v["a"]) if v["diff"] < 0 else _name(v["b"])
    half = (v["ci95"][1] - v["ci95"][0]) / 2
    places = max(0, 1 - math.floor(math.log10(half)))  # two significant digits of the +-, the diff alike
    return f"{lower} lower by {abs(v['diff']):.{places}f} ± {half:.{places}f}, p = {v['p_value']:.2g}, {seeds}"


def format_verdicts(rows: Sequence[dict], metric: str, groups: dict[str, list[Run]]) -> str:
    """The verdict table, naming the groups too thin for one, or a line saying why there is none.

    `groups` are those :func:`verdicts` was given (non-diverged runs only)."""
    thin = [_name(label) for label, runs in groups.items() if len(final_values(runs, metric)) < 2]
    if not rows:
        return (f"No verdicts on final {metric}: a verdict needs two groups with at least two non-diverged "
                f"seeds each ({len(groups)} group(s) here, {len(thin)} with fewer); rerun with several seeds "
                f"(e.g. seed=1,2,3).")
    lines = [f"Final {metric}, group against group (Welch's t-test over seeds; ± is the 95% interval of the "
             f"difference of the means):"]
    width = max(len(f"{_name(v['a'])} vs {_name(v['b'])}") for v in rows)
    lines += [f"  {_name(v['a']) + ' vs ' + _name(v['b']):<{width}}  {verdict_text(v)}" for v in rows]
    if thin:
        lines.append(f"  (no verdict for {', '.join(thin)}: fewer than two non-diverged seeds)")
    return "\n".join(lines)
