"""The fitted speed-up across horizons: a power law in tokens per line, and the token ratio at
which two lines reach equal loss.

Exact definition.
- Point: each finished, non-diverged run gives one point ``(D, L)``: ``L`` its last finite
  ``val/loss`` (the metric compared), ``D`` the ``tokens`` metric at that evaluation (the
  training tokens so far, Hessian passes included; the final step's, as the engine evaluates
  there). A run whose last step is below its ``train.max_steps`` is unfinished and left out; a
  diverged run (``engine.instability``) is left out; both are listed with the reason.
- Lines and horizons: a line is the optimizer plus the overrides that differ between the runs,
  leaving out seeds, the horizon keys (``train.max_steps``, ``train.decay_steps``,
  ``checkpoint.branch_from``, ``schedule.horizons``: a cooldown branch of a WSD parent belongs to
  the line of a fresh run of its horizon) and those that do not change the result
  (``engine.resume.is_result_neutral``). A horizon is a value of ``train.max_steps`` (from
  config.yaml, else the override, else the run's last step); the runs of a line at one horizon
  are its seeds: ``D_h`` and ``L_h`` are their means, with min, max and sample std of L kept.
- Fit: for a line with at least 3 horizons, ``L(D) = A * D^(-alpha) + E`` by nonlinear least
  squares (``scipy.optimize.curve_fit``, trust-region reflective) on the per-horizon means,
  unweighted, with ``A >= 0``, ``0 <= alpha <= 10``, ``E >= 0``. It is solved in ``x = D / D_ref``
  (``D_ref``: the line's smallest horizon's D) as ``L = a * x^(-alpha) + E``, so
  ``A = a * D_ref^alpha``; the start is the best of a grid of alphas (0.05 to 3) with (a, E) by
  linear least squares. Residuals ``r_h = L_h - L(D_h)``; ``rms = sqrt(mean(r_h^2))``.
- Good fit (``good``), all of:
  1. at least 4 horizons: 3 parameters through 3 points leave no residual to judge the fit by, so
     a 3-horizon line is fitted (drawn, recorded) but never good;
  2. the fit converged, with ``a > 0``, ``alpha > 0`` and ``alpha`` below its bound (10);
  3. ``rms <= tolerance = max(0.01 nats, noise)``, where ``noise = sqrt(mean_h(std_h^2 / n_h))``
     over the horizons with ``n_h >= 2`` seeds is the typical standard error of a horizon's mean
     loss (0 with one seed per horizon, so the tolerance is then 0.01 nats). For a true power law
     the expected ``rms^2`` is ``noise^2 * (n - 3) / n``, below ``noise^2``; 0.01 nats is about
     the seed-to-seed spread of final losses, finer than one seed can tell.
  When not good, ``reason`` says which condition failed.
- Fitted speed-up, for each ordered pair (A, B) of fitted lines, A != B, at each of B's horizons:
  ``L* = L_B(D_B)`` (B's fitted loss at its horizon's tokens) and
  ``D_A = D_refA * ((L* - E_A) / a_A)^(-1/alpha_A)`` (= ``((L* - E_A) / A_A)^(-1/alpha_A)``), the
  tokens at which A's fit reaches L*; ``ratio = D_A / D_B``: 0.5 reads "A needs half of B's tokens
  for B's loss at that horizon". None when ``L* <= E_A`` (A's fit never gets there). When D_A lies
  beyond A's largest horizon's D (or below its smallest) the ratio is kept and ``extrapolated``
  names that side. When either line's fit is not good there is no ratio, only the reason.
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Sequence

from analysis.runs import Run, line_labels, series
from analysis.units import si_format
from engine.resume import override_key

# Keys that set a run's horizon (its length, its decay, where a cooldown branch starts, which
# branch points a WSD parent keeps): left out of a horizon line's label.
HORIZON_KEYS: frozenset[str] = frozenset({"train.max_steps", "train.decay_steps", "checkpoint.branch_from",
                                          "schedule.horizons"})

MIN_HORIZONS_TO_FIT = 3  # 3 parameters
MIN_HORIZONS_GOOD = 4  # one residual degree of freedom
RMS_FLOOR = 0.01  # nats: the tolerance with one seed, and its least value with several
ALPHA_MAX = 10.0
_ALPHA_GRID = tuple(0.05 * (3.0 / 0.05) ** (i / 39) for i in range(40))  # 0.05 .. 3, log-spaced


def is_horizon_override(override: str) -> bool:
    """Whether `override` sets a horizon key (:data:`HORIZON_KEYS`)."""
    return override_key(override) in HORIZON_KEYS


@dataclass
class Horizon:
    """One line at one horizon (``train.max_steps``): its seeds' final (tokens, loss)."""

    steps: int
    runs: list[Run]
    tokens: list[float]
    losses: list[float]

    @property
    def d(self) -> float:
        return statistics.fmean(self.tokens)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses)

    @property
    def std(self) -> float:
        return statistics.stdev(self.losses) if len(self.losses) > 1 else 0.0

    def record(self) -> dict:
        return {"steps": self.steps, "tokens": self.d, "mean": self.mean, "min": min(self.losses),
                "max": max(self.losses), "std": self.std, "n": len(self.losses),
                "runs": [str(r.path) for r in self.runs]}


@dataclass
class Fit:
    """``L(D) = a * (D / d_ref)^(-alpha) + e`` (``A = a * d_ref^alpha``)."""

    a: float
    alpha: float
    e: float
    d_ref: float

    @property
    def big_a(self) -> float:
        return self.a * self.d_ref ** self.alpha

    def loss(self, d: float) -> float:
        return self.a * (d / self.d_ref) ** (-self.alpha) + self.e

    def tokens_to_reach(self, loss: float) -> float | None:
        """The D at which the fit reaches `loss`; None when ``loss <= E`` (it never does) or the
        fit is flat (a = 0 or alpha = 0)."""
        if loss <= self.e or self.a <= 0 or self.alpha <= 0:
            return None
        return self.d_ref * ((loss - self.e) / self.a) ** (-1.0 / self.alpha)


@dataclass
class Line:
    """A line's horizons (increasing steps) and, with >= 3 of them, its fit and judgement."""

    line: str
    horizons: list[Horizon]
    fit: Fit | None = None
    residuals: list[float] = field(default_factory=list)
    rms: float | None = None
    noise: float | None = None
    tolerance: float | None = None
    good: bool = False
    reason: str | None = None

    def record(self) -> dict:
        f = self.fit
        return {"line": self.line, "horizons": [h.record() for h in self.horizons],
                "A": f.big_a if f else None, "alpha": f.alpha if f else None, "E": f.e if f else None,
                "d_ref": f.d_ref if f else None, "a_ref": f.a if f else None,
                "fitted": [f.loss(h.d) for h in self.horizons] if f else None,
                "residuals": self.residuals or None, "rms": self.rms, "noise": self.noise,
                "tolerance": self.tolerance, "good": self.good, "reason": self.reason}


def _horizon_steps(run: Run) -> int:
    steps = run.setting("train.max_steps")
    return int(steps) if steps is not None else max(
        (r["step"] for r in run.records if isinstance(r.get("step"), int)), default=0)


def horizon_lines(runs: Sequence[Run], metric: str = "val/loss") -> tuple[list[Line], list[dict]]:
    """Group runs into lines of horizons (module docstring) and fit each line with >= 3 horizons.

    Returns the lines (sorted by label) and the runs left out, ``{"path", "reason"}`` each:
    diverged, unfinished, or without `metric` points that carry ``tokens``.
    """
    left_out, usable = [], []
    for run in runs:
        d = run.divergence()
        xs, ys = series(run.records, "tokens", metric)
        last = max((r["step"] for r in run.records if isinstance(r.get("step"), int)), default=0)
        max_steps = run.setting("train.max_steps")
        if d is not None:
            left_out.append({"path": str(run.path), "reason": f"diverged at step {d.step}: {d.reason}"})
        elif not ys:
            left_out.append({"path": str(run.path), "reason": f"no {metric} points with a tokens value"})
        elif max_steps is not None and last < max_steps:
            left_out.append({"path": str(run.path), "reason": f"unfinished (step {last} of {int(max_steps)})"})
        else:
            usable.append((run, xs[-1], ys[-1]))
    by_line: dict[str, dict[int, Horizon]] = {}
    labels = line_labels([run for run, *_ in usable], is_horizon_override)
    for label, (run, d, loss) in zip(labels, usable):
        steps = _horizon_steps(run)
        h = by_line.setdefault(label, {}).setdefault(steps, Horizon(steps, [], [], []))
        h.runs.append(run)
        h.tokens.append(d)
        h.losses.append(loss)
    lines = []
    for label in sorted(by_line):
        line = Line(label, [by_line[label][s] for s in sorted(by_line[label])])
        fit_line(line)
        lines.append(line)
    return lines, left_out


def fit_power_law(d: Sequence[float], loss: Sequence[float]) -> tuple[Fit, str | None]:
    """Least-squares ``loss = a * (d / d_ref)^(-alpha) + e`` (module docstring); returns the fit
    and None, or the best start found and why the fit failed."""
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit

    d_ref = float(min(d))
    x = np.asarray(d, dtype=float) / d_ref
    y = np.asarray(loss, dtype=float)

    def model(x, a, alpha, e):
        return a * x ** (-alpha) + e

    best = None
    for alpha in _ALPHA_GRID:
        basis = x ** (-alpha)
        (a, e), *_ = np.linalg.lstsq(np.column_stack([basis, np.ones_like(x)]), y, rcond=None)
        if e < 0:  # E >= 0: refit a alone
            a, e = max(0.0, float(basis @ y / (basis @ basis))), 0.0
        elif a < 0:  # a >= 0: flat at the mean
            a, e = 0.0, float(y.mean())
        sse = float(((model(x, a, alpha, e) - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, float(a), alpha, float(e))
    _, a0, alpha0, e0 = best
    start = Fit(a0, alpha0, e0, d_ref)
    span = float(y.max() - y.min()) or 1.0
    p0 = (max(a0, 1e-6 * span), alpha0, max(e0, 1e-6 * span))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # no covariance with 3 points: not used
            (a, alpha, e), _ = curve_fit(model, x, y, p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, ALPHA_MAX, np.inf]),
                                         method="trf", ftol=1e-14, xtol=1e-14, gtol=1e-14, max_nfev=20000)
    except (RuntimeError, ValueError) as exc:
        return start, f"the least-squares fit did not converge ({exc})"
    return Fit(float(a), float(alpha), float(e), d_ref), None


def fit_line(line: Line) -> Line:
    """Fit `line` when it has >= 3 horizons and judge the fit (module docstring); in place."""
    n = len(line.horizons)
    if n < MIN_HORIZONS_TO_FIT:
        line.reason = f"{n} horizon(s); a fit needs at least {MIN_HORIZONS_TO_FIT} (3 parameters)"
        return line
    d = [h.d for h in line.horizons]
    loss = [h.mean for h in line.horizons]
    fit, failed = fit_power_law(d, loss)
    line.fit = fit
    line.residuals = [m - fit.loss(x) for x, m in zip(d, loss)]
    line.rms = math.sqrt(statistics.fmean(r * r for r in line.residuals))
    seeded = [h.std ** 2 / len(h.losses) for h in line.horizons if len(h.losses) >= 2]
    line.noise = math.sqrt(statistics.fmean(seeded)) if seeded else 0.0
    line.tolerance = max(RMS_FLOOR, line.noise)
    line.good, line.reason = judge(n, line.rms, line.tolerance, fit, failed)
    return line


def judge(n_horizons: int, rms: float, tolerance: float, fit: Fit, failed: str | None = None) -> tuple[bool, str | None]:
    """The good-fit rule (module docstring): (True, None) or (False, the first condition that fails)."""
    if n_horizons < MIN_HORIZONS_GOOD:
        return False, (f"only {n_horizons} horizons: 3 parameters pass through 3 points exactly, leaving no "
                       f"residual to judge the fit by; add a horizon (at least {MIN_HORIZONS_GOOD})")
    if failed:
        return False, failed
    if fit.a <= 0 or fit.alpha <= 0:
        return False, "the fitted loss does not fall with D (A = 0 or alpha = 0): no power law to read a ratio from"
    if fit.alpha >= ALPHA_MAX * (1 - 1e-9):
        return False, f"alpha reached its bound ({ALPHA_MAX:g}): the loss drops faster than a power law"
    if rms > tolerance:
        return False, (f"rms residual {rms:.4f} above the tolerance {tolerance:.4f} (max(0.01, standard error "
                       f"of a horizon's mean)): the losses do not follow A * D^-alpha + E")
    return True, None


def fitted_ratios(lines: Sequence[Line]) -> list[dict]:
    """For each ordered pair (A, B) of fitted lines, A != B: the token ratio at equal loss at each of
    B's horizons (module docstring). A pair with a fit that is not good has ``at: []`` and a reason."""
    fitted = [line for line in lines if line.fit is not None]
    rows = []
    for a in fitted:
        for b in fitted:
            if a is b:
                continue
            row = {"a": a.line, "b": b.line, "good": a.good and b.good, "reason": None, "rms_a": a.rms,
                   "rms_b": b.rms, "at": []}
            if not a.good or not b.good:
                row["reason"] = "; ".join(f"fit of {x.line} not good: {x.reason}" for x in (a, b) if not x.good)
                rows.append(row)
                continue
            lo, hi = a.horizons[0].d, a.horizons[-1].d
            for h in b.horizons:
                target = b.fit.loss(h.d)
                d_a = a.fit.tokens_to_reach(target)
                cell = {"steps_b": h.steps, "tokens_b": h.d, "loss": target, "mean_b": h.mean, "tokens_a": d_a,
                        "ratio": None if d_a is None else d_a / h.d, "extrapolated": None, "note": None}
                if d_a is None:
                    cell["note"] = f"{a.line}'s fit never reaches it (E = {a.fit.e:.4f})"
                elif d_a > hi * (1 + 1e-9):
                    cell["extrapolated"] = f"beyond {a.line}'s largest horizon ({a.horizons[-1].steps} steps)"
                elif d_a < lo * (1 - 1e-9):
                    cell["extrapolated"] = f"below {a.line}'s smallest horizon ({a.horizons[0].steps} steps)"
                row["at"].append(cell)
            rows.append(row)
    return rows


DEFINITION = (
    "Per line (optimizer plus differing overrides except seeds and horizon keys), each horizon "
    "(train.max_steps) gives D = tokens at the final val/loss (Hessian passes included) and L = that loss, "
    "means over non-diverged finished seeds. Fit L(D) = A * D^-alpha + E by least squares on the means "
    "(A, alpha, E >= 0; alpha <= 10), with >= 3 horizons. good: >= 4 horizons, a converged fit with a > 0 and "
    "0 < alpha < 10, and rms residual <= max(0.01, noise), noise = sqrt(mean over horizons with >= 2 seeds of "
    "std^2 / n). ratio at B's horizon: D_A / D_B, D_A = ((L_B(D_B) - E_A) / A_A)^(-1/alpha_A), the tokens at "
    "which A's fit reaches B's fitted loss there; null when that loss <= E_A; extrapolated names a D_A outside "
    "A's horizons; no ratio unless both fits are good.")


def horizons_report(lines: Sequence[Line], left_out: Sequence[dict], metric: str = "val/loss") -> dict:
    """horizons.json: the definition, the rule's constants, every line with its fit, every pair's
    ratios, and the runs left out."""
    return {"definition": DEFINITION, "metric": metric,
            "rule": {"min_horizons_to_fit": MIN_HORIZONS_TO_FIT, "min_horizons_good": MIN_HORIZONS_GOOD,
                     "rms_floor": RMS_FLOOR, "alpha_max": ALPHA_MAX},
            "lines": [line.record() for line in lines],
            "pairs": fitted_ratios(lines),
            "left_out": list(left_out)}


def _law(line: Line) -> str:
    f = line.fit
    return f"L = {f.a:.4g} * (D/{si_format(f.d_ref)})^-{f.alpha:.3f} + {f.e:.4f}"


def format_horizons(report: dict, lines: Sequence[Line]) -> str:
    """The printed summary: each fitted line's law and judgement, then each pair's ratios in words."""
    out = [f"Fitted speed-up across horizons ({report['metric']} = A * D^-alpha + E per line, D = training tokens "
           f"incl. Hessian passes; ratio < 1: A needs fewer tokens for B's loss):"]
    for line in lines:
        if line.fit is None:
            if len(line.horizons) > 1:
                out.append(f"  {line.line}: no fit ({line.reason})")
            continue
        span = f"{len(line.horizons)} horizons ({line.horizons[0].steps}-{line.horizons[-1].steps} steps)"
        verdict = f"good (rms {line.rms:.4f})" if line.good else f"fit not good: {line.reason}"
        out.append(f"  {line.line}: {span}, {_law(line)}; {verdict}")
    for row in report["pairs"]:
        for cell in row["at"]:
            where = f"at {row['b']}'s {cell['steps_b']}-step loss ({cell['loss']:.4f})"
            if cell["ratio"] is None:
                out.append(f"  {row['a']} never reaches {row['b']}'s {cell['steps_b']}-step loss: {cell['note']}")
                continue
            extra = f"; extrapolated {cell['extrapolated']}" if cell["extrapolated"] else ""
            out.append(f"  {row['a']} needs {cell['ratio']:.2f}x {row['b']}'s tokens {where} "
                       f"(fit rms {row['rms_a']:.4f}, {row['rms_b']:.4f}{extra})")
    bad = [line.line for line in lines if line.fit is not None and not line.good]
    if bad:
        out.append(f"  no ratio with {', '.join(bad)}: fit not good (above; horizons.json has each pair's reason)")
    return "\n".join(out)
