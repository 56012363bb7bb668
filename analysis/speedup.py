"""Speed-up at matched loss: what one run's cost to reach another's loss is, on four cost axes.

Exact definition. For each run (or seed group) take the points that carry the metric (default
``val/loss``), in step order. A seed group's curve is the pointwise mean of its members' curves,
aligned by evaluation index and truncated to the shortest member.

1. Smoothing: ``s_i = mean(l_j for j in [max(0, i - N + 1), i])``, a trailing moving average over
   the last N evaluation points (:func:`smooth`; N = 1 is no smoothing).
2. Target: B's final smoothed loss ``s_last(B)``, or a fixed target loss for every pair.
3. Cost to reach a target on axis x (steps, tokens, flops, seconds), :func:`steps_to_reach`: the
   first x at which the piecewise-linear interpolation of the points ``(x_i, s_i)`` reaches the
   target, i.e. ``x_0`` if ``s_0 <= target``, else for the first i with ``s_i <= target``
   ``x_{i-1} + (target - s_{i-1}) * (x_i - x_{i-1}) / (s_i - s_{i-1})``; None if no point reaches
   it. Nothing is extrapolated beyond the first or the last point.
4. ``ratio(A, B) = cost_A(target) / cost_B(target)`` for every ordered pair A != B. B's own cost
   uses the same rule, so for a monotone curve it is B's last evaluation point. A twice as fast as
   B reads 0.5. If A (or, with a fixed target, B) never reaches the target the ratio is null and
   the table says "not reached"; a zero denominator or a missing axis also gives null, with a
   reason.
5. Seed range, when A or B has several seeds: steps 1-4 for every pairing of one of A's seeds with
   one of B's (B's own final smoothed loss as the target), and the min and max of those ratios
   (:func:`seed_ranges`). It shows how far the speed-up moves with the seeds drawn, with no
   assumption about its distribution; pairings where A never reaches the target are counted apart.

Diverged runs (``engine.instability``) are left out of the groups before any of this.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from analysis.runs import Run

AXES: dict[str, str] = {"steps": "step", "tokens": "tokens", "flops": "flops", "seconds": "time/elapsed"}


def smooth(values: Sequence[float], n: int) -> list[float]:
    """Trailing moving average over the last `n` points (`n=1` returns the values unchanged)."""
    if n < 1:
        raise ValueError(f"smoothing window must be >= 1, got {n}; use 1 for no smoothing")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def steps_to_reach(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """First x at which the piecewise-linear curve (xs, losses) reaches `loss <= target`.

    Returns None when no point reaches the target (nothing is extrapolated). `xs` must be
    non-decreasing and aligned with `losses`.
    """
    if len(xs) != len(losses):
        raise ValueError(f"xs and losses differ in length ({len(xs)} vs {len(losses)})")
    for i, (x, loss) in enumerate(zip(xs, losses)):
        if loss <= target:
            if i == 0:
                return float(x)
            x0, l0 = xs[i - 1], losses[i - 1]
            # l0 > target >= loss, so the denominator is strictly negative.
            return float(x0 + (target - l0) * (x - x0) / (loss - l0))
    return None


@dataclass
class Curve:
    """One run's (or seed group's) metric curve, with x values on every available cost axis.

    `x[axis]` is None when that axis is missing from some of the curve's points.
    """

    label: str
    loss: list[float]
    x: dict[str, list[float] | None] = field(default_factory=dict)


def speedup_table(curves: Sequence[Curve], smooth_n: int = 1, target_loss: float | None = None) -> list[dict]:
    """Cost ratios at matched loss for every ordered pair (A, B), A != B (the module docstring).

    Returns one dict per pair: `{"a", "b", "target", "axes": {axis: {"a", "b", "ratio", "note"}}}`
    where `a`/`b` are the costs (None if not reached), `ratio = a / b` or None, and `note` is None
    or a short reason ("not reached by A", "not reached by B", "axis missing", "B's cost is 0").
    Curves without points are skipped.
    """
    rows = []
    for a in curves:
        for b in curves:
            if a is not b and a.loss and b.loss:
                target, axes = _pair(a, b, smooth_n, target_loss)
                rows.append({"a": a.label, "b": b.label, "target": target, "axes": axes})
    return rows


def _pair(a: Curve, b: Curve, smooth_n: int, target_loss: float | None) -> tuple[float, dict[str, dict]]:
    """The target and, per axis, A's and B's cost to reach it, their ratio and a note (why None)."""
    sa, sb = smooth(a.loss, smooth_n), smooth(b.loss, smooth_n)
    target = sb[-1] if target_loss is None else float(target_loss)
    axes = {}
    for axis in AXES:
        xa, xb = a.x.get(axis), b.x.get(axis)
        if xa is None or xb is None:
            axes[axis] = {"a": None, "b": None, "ratio": None, "note": "axis missing"}
            continue
        ca, cb = steps_to_reach(xa, sa, target), steps_to_reach(xb, sb, target)
        ratio, note = None, None
        if ca is None:
            note = "not reached by A"
        elif cb is None:
            note = "not reached by B"
        elif cb == 0:
            note = "B's cost is 0"
        else:
            ratio = ca / cb
        axes[axis] = {"a": ca, "b": cb, "ratio": ratio, "note": note}
    return target, axes


def seed_ranges(seeds_a: Sequence[Curve], seeds_b: Sequence[Curve], smooth_n: int = 1,
                target_loss: float | None = None) -> dict[str, dict]:
    """The speed-up's spread over seeds: per axis, the min and max of the ratio over every pairing
    of one of A's seed curves with one of B's (each pairing's target is that B seed's own final
    smoothed loss, or `target_loss`).

    Returns ``{axis: {"range": [lo, hi] or None, "reached": k, "pairings": n}}``: `reached` counts
    the pairings with a ratio; the range is over those (None when none has one).
    """
    ratios: dict[str, list[float]] = {axis: [] for axis in AXES}
    pairings = 0
    for a in seeds_a:
        for b in seeds_b:
            if not (a.loss and b.loss):
                continue
            pairings += 1
            for axis, cell in _pair(a, b, smooth_n, target_loss)[1].items():
                if cell["ratio"] is not None:
                    ratios[axis].append(cell["ratio"])
    return {axis: {"range": [min(r), max(r)] if r else None, "reached": len(r), "pairings": pairings}
            for axis, r in ratios.items()}


def format_table(rows: Sequence[dict], smooth_n: int, metric: str, target_loss: float | None) -> str:
    """Human-readable speed-up table (ratios < 1 mean A is cheaper than B)."""
    target_desc = f"{target_loss:g}" if target_loss is not None else f"B's final smoothed {metric}"
    lines = [
        f"Speed-up at matched {metric}: cost for A to reach {target_desc} / B's own cost "
        f"(moving average over {smooth_n} eval point(s); < 1 means A is faster).",
    ]
    if not rows:
        return lines[0] + "\n(fewer than two runs with points: nothing to compare)"

    def ratio(r: dict, ax: str) -> str:
        cell = r["axes"][ax]
        return f"{cell['ratio']:.3f}" if cell["ratio"] is not None else cell["note"]

    return "\n".join(lines + _pair_lines(rows, ratio, 16, with_target=True))


def _pair_lines(rows: Sequence[dict], cell_text, width: int, with_target: bool) -> list[str]:
    """Header, rule and a line per pair: A, B, the target (`with_target`), then `cell_text(row, axis)`
    for each axis, right-aligned in `width` characters."""
    wa = max(len("A"), *(len(r["a"]) for r in rows))
    wb = max(len("B"), *(len(r["b"]) for r in rows))
    header = f"{'A':<{wa}}  {'B':<{wb}}" + (f"  {'target':>8}" if with_target else "") + "".join(
        f"  {ax:>{width}}" for ax in AXES)
    lines = [header, "-" * len(header)]
    for r in rows:
        target = f"  {r['target']:>8.4f}" if with_target else ""
        cells = "".join(f"  {cell_text(r, ax):>{width}}" for ax in AXES)
        lines.append(f"{r['a']:<{wa}}  {r['b']:<{wb}}{target}{cells}")
    return lines


def metric_curve(label: str, runs: Sequence[Run], metric: str) -> Curve:
    """The metric's curve on every cost axis; several runs (seeds) are averaged by eval index."""
    per_run = []
    for run in runs:
        pts = [r for r in sorted(run.records, key=lambda r: r.get("step", 0))
               if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        dedup = {r.get("step"): r for r in pts}  # a step logged twice keeps its last line
        per_run.append(list(dedup.values()))
    n = min(len(p) for p in per_run) if per_run else 0
    loss = [sum(p[i][metric] for p in per_run) / len(per_run) for i in range(n)]
    x: dict[str, list[float] | None] = {}
    for axis, key in AXES.items():
        if all(isinstance(p[i].get(key), (int, float)) for p in per_run for i in range(n)):
            x[axis] = [sum(p[i][key] for p in per_run) / len(per_run) for i in range(n)]
        else:
            x[axis] = None
    return Curve(label, loss, x)


DEFINITION = ("ratio = cost for A to reach the target / cost for B to reach it, first crossing of "
              "the linearly interpolated smoothed curve; target = B's final smoothed loss unless "
              "target_loss is set; null when not reached")


def speedup_report(curves: Sequence[Curve], groups: dict[str, list[Run]], metric: str, smooth_n: int,
                   target_loss: float | None) -> dict:
    """speedup.json: the definition, the settings, each curve's runs and final loss, and every
    pair of :func:`speedup_table`; a pair of groups with several seeds also gets ``"seeds"``, the
    :func:`seed_ranges` of its ratio. `groups` must hold only non-diverged runs."""
    pairs = speedup_table(curves, smooth_n, target_loss)
    seed_curves = {c.label: [metric_curve(c.label, [r], metric) for r in groups[c.label]] for c in curves}
    for row in pairs:
        if len(groups[row["a"]]) > 1 or len(groups[row["b"]]) > 1:
            row["seeds"] = seed_ranges(seed_curves[row["a"]], seed_curves[row["b"]], smooth_n, target_loss)
    return {
        "definition": DEFINITION,
        "metric": metric,
        "smooth": smooth_n,
        "target_loss": target_loss,
        "runs": {c.label: {"paths": [str(r.path) for r in groups[c.label]], "points": len(c.loss),
                           "final": c.loss[-1], "final_smoothed": smooth(c.loss, smooth_n)[-1]}
                 for c in curves},
        "pairs": pairs,
    }


def format_seed_ranges(rows: Sequence[dict]) -> str | None:
    """The seed range of each pair's ratio (:func:`seed_ranges`) as a table, or None when no pair
    has several seeds."""
    rows = [r for r in rows if "seeds" in r]
    if not rows:
        return None
    lines = ["Seed range of the speed-up: min-max of the ratio over every pairing of A's seeds with B's "
             "(k/n: pairings that reached the target, when not all did)."]

    def spread(r: dict, ax: str) -> str:
        cell = r["seeds"][ax]
        if cell["range"]:
            text = f"{cell['range'][0]:.3f}-{cell['range'][1]:.3f}"
        else:
            text = "axis missing" if r["axes"][ax]["note"] == "axis missing" else "not reached"
        if 0 < cell["reached"] < cell["pairings"]:
            text += f" ({cell['reached']}/{cell['pairings']})"
        return text

    return "\n".join(lines + _pair_lines(rows, spread, 20, with_target=False))
