"""The scaling view: final and matched-budget loss against model size, and the size at which one
optimizer's line matches another's loss.

Exact definition.
- Size N: non-embedding parameters, every parameter but the token and position embeddings
  (12 n_layer n_embd^2 plus LayerNorms and biases), from the run's `config.yaml` model section
  (:func:`model_size`, i.e. :func:`model.flops.scaling_params`).
- Lines: one per optimizer (plus any overrides that differ between runs other than seeds, model
  size overrides `model=`, `model.*=` and `experiment=`, and those that do not change the result).
  The runs of a line at one size are its seeds: drawn as the mean with a min/max band, recorded
  with mean, min, max and std.
- Budget: a size's budget is the smallest total training FLOPs (the `flops` metric: Hessian passes
  included) of any run of that size, and each run's val loss there is interpolated linearly
  between its evaluations.
- Size matches, for each ordered pair of lines (A, B) and each size N of A, for both the final and
  the matched-budget loss: the size at which B's mean loss, interpolated linearly in log N, equals
  A's loss at N (first crossing), and its ratio to N. "A at 10M matches B at 20M (2.00x)" means B
  needs twice the parameters for A's loss. None when B is already at or below it at its smallest
  size or never reaches it: nothing is extrapolated.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

from analysis.runs import Run, line_labels, series
from analysis.speedup import steps_to_reach
from analysis.units import si_format
from engine.resume import override_key
from model.config import GPTConfig
from model.flops import scaling_params

# Overrides that choose the model's size (or an experiment preset, which fixes the size together
# with the optimizer): left out of a scaling line's label, so one optimizer's runs at all sizes
# form one line.
SIZE_OVERRIDE_KEYS: frozenset[str] = frozenset({"model", "experiment"})


def is_size_override(override: str) -> bool:
    """Whether `override` sets the model (`model=...`, `model.*=...`) or an experiment preset."""
    key = override_key(override)
    return key in SIZE_OVERRIDE_KEYS or key.startswith("model.")


def model_size(model_cfg: dict | None) -> int | None:
    """The model size N of a run's `model` config section (preset plus non-null fields):
    :func:`model.flops.scaling_params`, every parameter but the token and position embeddings.
    Keys that are not GPTConfig fields (init_from: the starting weights) and the vocabulary (it
    only sizes the embeddings) leave it alone. None when the section is missing or invalid."""
    if not isinstance(model_cfg, dict):
        return None
    settings = {k: v for k, v in model_cfg.items() if v is not None and k != "vocab_size"}
    preset = settings.pop("preset", None)
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    fields = {k: v for k, v in settings.items() if k in known}
    try:
        cfg = GPTConfig.from_preset(preset, **fields) if preset else GPTConfig(**fields)
    except (TypeError, ValueError):
        return None
    return scaling_params(cfg)


def value_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """The piecewise-linear curve (xs, ys) at `x` (xs non-decreasing); None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1 = xs[i - 1], xs[i]
            return ys[i] if x1 == x0 else ys[i - 1] + (x - x0) * (ys[i] - ys[i - 1]) / (x1 - x0)
    return ys[-1]


def matching_size(sizes: Sequence[float], losses: Sequence[float], target: float) -> tuple[float | None, str | None]:
    """The size at which a line (losses at increasing sizes) reaches `target`, interpolated
    linearly in log size: the first crossing, as in `steps_to_reach`. Returns (size, None), or
    (None, reason) when it is already at or below the target at its smallest size or never
    reaches it (nothing is extrapolated)."""
    if not sizes:
        return None, "has no sizes"
    if losses[0] <= target:
        return None, f"is already at or below it at its smallest size, {si_format(sizes[0])}"
    x = steps_to_reach([math.log(n) for n in sizes], losses, target)
    if x is None:
        return None, f"stays above it up to its largest size, {si_format(sizes[-1])}"
    return math.exp(x), None


@dataclass
class ScalingPoint:
    """One line (optimizer) at one model size: the statistics over its runs (seeds)."""

    line: str
    params: int
    runs: list[Run]
    final: list[float]  # final val loss of each run
    flops: list[float]  # total training FLOPs of each run (Hessian passes included)
    budget: float | None = None  # the size's matched FLOPs budget
    at_budget: list[float] = field(default_factory=list)  # each run's val loss at that budget

    @staticmethod
    def stats(values: Sequence[float]) -> dict | None:
        if not values:
            return None
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return {"mean": mean, "min": min(values), "max": max(values), "std": std, "n": len(values)}


def scaling_points(runs: Sequence[Run], metric: str = "val/loss") -> tuple[list[ScalingPoint], list[str]]:
    """Group runs into (line, size) points; returns the points and notes on the runs left out.

    A line is the optimizer plus the overrides that differ between the runs, leaving out seeds,
    size overrides (`is_size_override`) and those that do not change the result; the runs of a
    line at one size are its repeats (seeds). The matched budget of a size is the smallest total
    FLOPs among all runs of that size, and each run's loss there is read off its `metric` curve
    against FLOPs (linear interpolation between evaluations).
    """
    notes, usable = [], []
    for run in runs:
        n = model_size((run.config or {}).get("model"))
        xs, ys = series(run.records, "flops", metric)
        train = (run.config or {}).get("train")
        max_steps = train.get("max_steps") if isinstance(train, dict) else None
        last = max(r["step"] for r in run.records)
        if n is None:
            notes.append(f"{run.path}: no model settings in its config.yaml, so no model size")
        elif not ys:
            notes.append(f"{run.path}: no {metric} points with a flops value")
        elif isinstance(max_steps, int) and last < max_steps:
            # a final loss only compares with other final losses once the run has finished
            notes.append(f"{run.path}: unfinished (step {last} of {max_steps})")
        else:
            usable.append((run, n, xs, ys))
    points: dict[tuple[str, int], ScalingPoint] = {}
    curves = {}
    lines = line_labels([run for run, *_ in usable], is_size_override)
    for line, (run, n, xs, ys) in zip(lines, usable):
        pt = points.setdefault((line, n), ScalingPoint(line, n, [], [], []))
        pt.runs.append(run)
        pt.final.append(ys[-1])
        pt.flops.append(xs[-1])
        curves[id(run)] = (xs, ys)
    for n in {n for _, n in points}:
        at_size = [pt for (_, m), pt in points.items() if m == n]
        budget = min(f for pt in at_size for f in pt.flops)
        for pt in at_size:
            pt.budget = budget
            pt.at_budget = [v for v in (value_at(*curves[id(r)], budget) for r in pt.runs) if v is not None]
    return sorted(points.values(), key=lambda p: (p.line, p.params)), notes


SCALING_METRICS = {"final": "final validation loss", "matched_budget": "validation loss at matched FLOPs"}


def _line_values(points: Sequence[ScalingPoint], line: str, metric: str) -> tuple[list[float], list[float]]:
    pts = [p for p in points if p.line == line and (p.final if metric == "final" else p.at_budget)]
    vals = [ScalingPoint.stats(p.final if metric == "final" else p.at_budget)["mean"] for p in pts]
    return [float(p.params) for p in pts], vals


def size_matches(points: Sequence[ScalingPoint], metric: str = "final") -> list[dict]:
    """For each ordered pair of lines (A, B) and each size N of A: the size at which B's loss
    (mean over seeds, interpolated linearly in log size) equals A's loss at N.

    `ratio` = that size / N: 2.0 reads "A at size N matches B at twice the size". None, with a
    `note`, when B's line does not cross A's loss within the sizes run.
    """
    lines = sorted({p.line for p in points})
    rows = []
    for a in lines:
        sizes_a, losses_a = _line_values(points, a, metric)
        for b in lines:
            if a == b:
                continue
            sizes_b, losses_b = _line_values(points, b, metric)
            for n, loss in zip(sizes_a, losses_a):
                size, note = matching_size(sizes_b, losses_b, loss)
                rows.append({"a": a, "b": b, "size_a": n, "loss_a": loss, "size_b": size,
                             "ratio": None if size is None else size / n,
                             "note": None if note is None else f"{b} {note}"})
    return rows


def format_size_matches(rows: Sequence[dict], metric: str) -> str:
    lines = [f"Model size at which B matches A's {SCALING_METRICS[metric]} (B's line interpolated in log "
             f"size; ratio > 1: B needs a larger model):"]
    for r in rows:
        head = f"  {r['a']} at {si_format(r['size_a'])} params ({r['loss_a']:.4f})"
        if r["size_b"] is None:
            lines.append(f"{head}: no match ({r['note']})")
        else:
            lines.append(f"{head} matches {r['b']} at {si_format(r['size_b'])} params ({r['ratio']:.2f}x)")
    return "\n".join(lines)


def scaling_report(points: Sequence[ScalingPoint]) -> dict:
    """scaling.json: every point's statistics and run paths, and the size matches per metric."""
    return {
        "definition": (
            "params: non-embedding parameters (all but the token and position embeddings), from each run's "
            "config.yaml; final: each run's last val/loss; flops: its total training FLOPs, Hessian passes "
            "included; matched_budget: its val/loss at the size's budget, the smallest total FLOPs of any run of "
            "that size (linear interpolation between evaluations); mean/min/max/std over a line's runs (seeds) at "
            "one size. size_matches: for each size N of line A, the size at which line B's mean loss (linear in "
            "log size) equals A's, and its ratio to N; null when B does not cross it within its sizes"),
        "points": [{"line": p.line, "params": p.params, "runs": [str(r.path) for r in p.runs],
                    "final": ScalingPoint.stats(p.final), "flops": ScalingPoint.stats(p.flops),
                    "budget_flops": p.budget, "matched_budget": ScalingPoint.stats(p.at_budget)}
                   for p in points],
        "size_matches": {m: size_matches(points, m) for m in SCALING_METRICS},
    }
