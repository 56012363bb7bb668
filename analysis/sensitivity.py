"""Learning-rate sensitivity: final loss against ``optimizer.lr``, per optimizer.

Runs are grouped into configurations (runs differing only in ``seed``, :func:`analysis.runs.group_runs`)
and the configurations by optimizer and ``optimizer.lr`` (from each run's config.yaml, else its
override). An optimizer enters only if its runs span at least two lrs. At each lr:

- a configuration's loss is the mean of the final metric (its last finite value, ``val/loss`` by
  default) over its non-diverged seeds, with their sample standard deviation as the error bar;
- when other settings vary too (``optimizer.rho``, ``optimizer.k``, the warmup, ...), the point is
  the configuration with the lowest mean: the lr's loss once the rest is tuned;
- ``diverged`` counts that configuration's diverged runs; if every run at that lr diverged there is
  no mean and ``diverged`` counts them all (the figure draws an x at the top of the axis).

Per optimizer: the best lr (the lowest mean), its loss, and the range of swept lrs around it whose
loss stays within 1% of the best (``loss <= best * 1.01``), walking outwards from the best lr over
neighbouring swept lrs until one is worse or diverged. Its width is ``log10(hi / lo)`` in decades
(0: no neighbouring swept lr is within 1%, so the true width is below the grid's spacing there); no
interpolation between swept lrs. ``at_edge`` says the range reaches the end of the sweep, so the
true range may be wider.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from analysis.runs import Run, group_runs
from analysis.verdicts import final_values

WITHIN = 0.01  # "flat" means within 1% of the best loss: about the seed-to-seed spread of final losses


@dataclass
class LrPoint:
    """One optimizer's result at one lr (module docstring); `mean`/`std` are None if all diverged."""

    lr: float
    mean: float | None
    std: float | None
    n: int  # non-diverged seeds behind the mean
    diverged: int
    config: str  # the label of the configuration chosen at this lr


def lr_points(runs: Sequence[Run], metric: str = "val/loss") -> dict[str, list[LrPoint]]:
    """Per optimizer (with >= 2 lrs), its points in increasing lr; {} when no optimizer qualifies."""
    by_opt: dict[str, dict[float, list[tuple[str, list[Run]]]]] = {}
    for label, members in group_runs(runs, group_seeds=True).items():
        lr = members[0].setting("optimizer.lr")
        if lr is not None:
            by_opt.setdefault(members[0].optimizer, {}).setdefault(lr, []).append((label, members))
    points: dict[str, list[LrPoint]] = {}
    for opt, by_lr in by_opt.items():
        if len(by_lr) < 2:
            continue
        points[opt] = [_point(lr, configs, metric) for lr, configs in sorted(by_lr.items())]
    return points


def _point(lr: float, configs: list[tuple[str, list[Run]]], metric: str) -> LrPoint:
    best: LrPoint | None = None
    for label, members in configs:
        healthy = [r for r in members if r.divergence() is None]
        values = final_values(healthy, metric)
        if not values:
            continue
        mean = statistics.fmean(values)
        if best is None or mean < best.mean:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            best = LrPoint(lr, mean, std, len(values), len(members) - len(healthy), label)
    if best is None:
        return LrPoint(lr, None, None, 0, sum(len(m) for _, m in configs), " / ".join(lab for lab, _ in configs))
    return best


def lr_table(points: dict[str, list[LrPoint]]) -> list[dict]:
    """Per optimizer: best lr and loss, the within-1% range, its width in decades (module docstring)."""
    rows = []
    for opt, pts in points.items():
        ok = [i for i, p in enumerate(pts) if p.mean is not None]
        if not ok:
            rows.append({"optimizer": opt, "best_lr": None, "best_loss": None, "within_1pct": None,
                         "width_decades": None, "at_edge": None, "seeds": 0, "diverged_at_best": None,
                         "lrs": len(pts)})
            continue
        b = min(ok, key=lambda i: pts[i].mean)
        limit = pts[b].mean * (1 + WITHIN)
        lo = hi = b
        while lo > 0 and pts[lo - 1].mean is not None and pts[lo - 1].mean <= limit:
            lo -= 1
        while hi < len(pts) - 1 and pts[hi + 1].mean is not None and pts[hi + 1].mean <= limit:
            hi += 1
        rows.append({"optimizer": opt, "best_lr": pts[b].lr, "best_loss": pts[b].mean,
                     "within_1pct": [pts[lo].lr, pts[hi].lr], "width_decades": math.log10(pts[hi].lr / pts[lo].lr),
                     "at_edge": lo == 0 or hi == len(pts) - 1, "seeds": pts[b].n,
                     "diverged_at_best": pts[b].diverged, "lrs": len(pts)})
    return rows


def lr_report(points: dict[str, list[LrPoint]]) -> dict:
    """speedup.json's ``"lr_sensitivity"``: the rule, the table and every point."""
    return {"within": WITHIN, "width": "log10(hi / lo) of the swept lrs within 1% of the best loss",
            "table": lr_table(points),
            "points": {opt: [vars(p) for p in pts] for opt, pts in points.items()}}


def format_lr_table(rows: Sequence[dict], metric: str) -> str:
    """The lr-sensitivity table as printed."""
    lines = [f"lr sensitivity (final {metric}, mean over non-diverged seeds; width: lrs within 1% of the "
             f"best, in decades; + : the range reaches the sweep's end):"]
    w = max(len("optimizer"), *(len(r["optimizer"]) for r in rows))
    header = f"{'optimizer':<{w}}  {'best lr':>9}  {'best loss':>9}  {'within 1%':>19}  {'width':>6}  seeds"
    lines += [header, "-" * len(header)]
    for r in rows:
        if r["best_lr"] is None:
            lines.append(f"{r['optimizer']:<{w}}  every run diverged at all {r['lrs']} lrs")
            continue
        span = f"{r['within_1pct'][0]:.3g}-{r['within_1pct'][1]:.3g}"
        seeds = f"{r['seeds']}" + (f" ({r['diverged_at_best']} diverged)" if r["diverged_at_best"] else "")
        lines.append(f"{r['optimizer']:<{w}}  {r['best_lr']:>9.3g}  {r['best_loss']:>9.4f}  {span:>19}  "
                     f"{r['width_decades']:>5.2f}{'+' if r['at_edge'] else ' '}  {seeds}")
    return "\n".join(lines)
