"""Toy problems: how GD, Adam, Lion and Sophia cope with one sharp and one flat direction.

    python scripts/toy.py                       # both problems: tables + figures under results/toy/
    python scripts/toy.py --problem quadratic   # one problem only
    python scripts/toy.py --schedule cosine     # every optimizer gets a cosine-decayed lr
    python scripts/toy.py --quick               # small version (used by the test suite)

The loss is always the quadratic with one sharp and one flat direction,

    f(x, y) = 0.5 * (kappa * x^2 + y^2),     condition number kappa,

and the two problems differ only in where the optimizers start:

- `heterogeneous` (default; the case Section 2 / Figure 2 of the Sophia paper argues about) starts
  at (x0 / kappa, y0): the sharp coordinate is kappa times closer to its minimum than the flat one,
  so both gradients have the same size (kappa * x0 / kappa = x0 ~ y0) although the distances to the
  optimum differ by kappa. The gradient magnitude does not track the distance, so a sign-like step
  that moves every coordinate by ~lr is wrong in both directions at once (too big for the sharp
  coordinate, too small for the far flat one), while Newton's step g / h is right in both.
- `quadratic` starts at (x0, y0) for every kappa: equal distances, so the sharp coordinate's
  gradient is kappa times larger. On this axis-aligned problem Adam's per-coordinate
  normalisation undoes the diagonal rescaling, so Adam is almost kappa-independent too.

The two problems coincide at kappa = 1. The paper's own Figure 2 example (as we recall it, a
non-convex sharp 1-D term plus a flat 1-D quadratic; its exact formula is not checked here) also
shows plain Newton failing on the non-convexity; that part is about Newton, not Adam, and is not
reproduced here.

(a) `trajectories.png` draws the paths of GD, Adam, Lion, SophiaG and SophiaH on the contours of
each problem; (b) `steps_vs_condition.png` and the printed tables give the steps each optimizer
needs to bring f below an absolute target (default 1e-6) as kappa goes from 1 to 1e4.

Protocol (printed with every table): each optimizer's lr is tuned per problem and per kappa over a
fixed grid of the same density for every optimizer (about two points per decade, spanning the
range where that optimizer's best lies; GD's grid is c / kappa, c in (0.5, 1, 1.9), because its
stable range scales with the sharpest curvature), and each cell reports that optimizer's best grid
point. With `--schedule cosine` every optimizer, Sophia included, also gets the same cosine decay
to 0 over a horizon T tuned from (1/8, 1/4, 1/2, 1) of the step cap; a cell then reports its best
(lr, T). Everything else is fixed at the usual defaults: Adam betas (0.9, 0.999) (torch's), Lion
betas (0.9, 0.99), Sophia betas (0.965, 0.99) and rho = 0.04 (official), no weight decay, Hessian
refreshed every k = 10 steps after the step (official timing, h starts at 0). A miss prints
`>cap` with the grid lr that got lowest.

What a full run measured (steps to f <= 1e-6, cap 4000; constant lr, `--schedule cosine` in []):

    kappa = 1e3       GD            Adam       Lion          SophiaG     SophiaH
    heterogeneous     3475 [>4000]  114 [114]  3487 [852]    191 [191]   191 [159]
    quadratic         3475 [>4000]  131 [131]  >4000 [848]   447 [394]   425 [363]

Over kappa = 1 .. 1e4 Sophia's count stays within ~150-450 steps on both problems, GD's grows
like kappa, and constant-lr Lion, whose step never shrinks, needs a tiny lr and misses at large
kappa. Tuned Adam, however, needs fewer steps than SophiaG at every kappa on both problems, the
heterogeneous one included (the only cell where a Sophia beats Adam is SophiaH at kappa = 10 with
cosine decay, 79 vs 84). The paper's argument does hold for signGD: a fixed ~lr step cannot reach
the target on the heterogeneous problem at any lr (tests/test_toy.py checks this). Adam escapes it
for two reasons. (1) Its second moment remembers the large gradient its first sign-like overshoot
in the sharp coordinate produces (|g_x| ~ kappa * lr), so its effective step there drops to
~1 / kappa at once: Adam learns the curvature scale from its own oscillation. (2) Near the
optimum every method here is limited by its momentum: the ringing decays like beta1^t, so
reaching 1e-6 costs about log(1e-6) / log(beta1) steps, ~130 for Adam's 0.9 against ~390 for
Sophia's 0.965, and Sophia's Hessian EMA, started at 0 without bias correction, underestimates h
for hundreds of steps. The toy therefore shows Sophia's curvature-independence, not a win over
tuned Adam.

Hessian estimates, consistent with each optimizer's semantics:
- SophiaG uses the GNB estimator. f is the negative log-likelihood (up to a constant) of a
  Gaussian model o = sqrt(diag(kappa, 1)) * theta with targets 0, so the "sampled-label" loss is
  0.5 * ||o - t||^2 with t ~ N(o, I); its squared gradient diag(kappa, 1) * eps^2 has expectation
  exactly diag(H). One sample per refresh, so bs = 1.
- SophiaH uses `sophia.hessian.hutchinson` on f itself (exact here: H is diagonal).

All optimizers here are elementwise, so the script runs every (lr, kappa) cell of a grid at once:
one parameter group per (lr, horizon), each holding one row per kappa. The cells never interact.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

try:
    import sophia  # noqa: F401
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sophia import Lion, SophiaG, SophiaH
from sophia.hessian import hutchinson

OPTIMIZERS = ("gd", "adam", "lion", "sophiag", "sophiah")
LABELS = {"gd": "GD", "adam": "Adam", "lion": "Lion", "sophiag": "SophiaG", "sophiah": "SophiaH"}
PROBLEMS = ("heterogeneous", "quadratic")
SCHEDULES = ("constant", "cosine")
START = (math.e / 3, math.pi / 3)  # generic: sign steps of a round lr never land on 0
HESSIAN_EVERY = 10
RHO = 0.04
HORIZON_FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # cosine horizons, as fractions of the step cap

# lr grids: GD's entries multiply 1 / kappa (its stability limit is 2 / kappa)
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "gd": (0.5, 1.0, 1.9),
    "adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "lion": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "sophiag": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "sophiah": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
}
# the quick grids keep, for every optimizer, the points that win somewhere in the full run
QUICK_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "gd": (1.9,),
    "adam": (3e-2, 1e-1),
    "lion": (1e-3, 3e-3),
    "sophiag": (1e-2, 1e-1),
    "sophiah": (1e-2, 1e-1),
}


class Best(NamedTuple):
    """One table cell: the chosen lr, the steps to target (None: missed) and the cosine horizon."""

    lr: float
    steps: int | None
    horizon: int | None = None


class Run(NamedTuple):
    """One parameter group of a simulation: an lr, the kappas it runs, a cosine horizon or None."""

    lr: float
    kappas: tuple[float, ...]
    horizon: int | None = None


def start_point(problem: str, kappa: float) -> tuple[float, float]:
    """Where `problem` starts at condition number kappa (see the module docstring)."""
    if problem == "quadratic":
        return START
    if problem == "heterogeneous":
        return (START[0] / kappa, START[1])
    raise ValueError(f"unknown problem {problem!r}; choose from {', '.join(PROBLEMS)}")


def loss_fn(theta: torch.Tensor, kappa: float | torch.Tensor) -> torch.Tensor:
    """f(x, y) = 0.5 * (kappa * x^2 + y^2) over the last dim; kappa broadcasts over the rest."""
    return 0.5 * (kappa * theta[..., 0] ** 2 + theta[..., 1] ** 2)


def grad_fn(theta: torch.Tensor, kappa: float | torch.Tensor) -> torch.Tensor:
    """Analytic gradient of `loss_fn`, (kappa * x, y): cheaper than a backward pass per step."""
    return torch.stack((kappa * theta[..., 0], theta[..., 1]), dim=-1)


def gnb_gradient(
    theta: torch.Tensor, kappa: float | torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Gradient of the sampled-label loss 0.5 * ||o - t||^2 with t ~ N(o, I), o = sqrt(H) theta.

    f is the Gaussian negative log-likelihood of o against targets 0, so this is SophiaG's GNB
    recipe for that model: its square has expectation diag(H) = (kappa, 1) for bs = 1. Rows of a
    batched theta ([..., 2], kappa of shape [...]) get independent samples.
    """
    theta = theta.detach().requires_grad_(True)
    root = torch.as_tensor(kappa, dtype=theta.dtype).sqrt()
    scale = torch.stack(torch.broadcast_tensors(root, torch.ones_like(root)), dim=-1)
    o = scale * theta
    t = o.detach() + torch.randn(o.shape, generator=generator, dtype=o.dtype)
    (grad,) = torch.autograd.grad(0.5 * ((o - t) ** 2).sum(), [theta])
    return grad


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer `name` over parameter groups that each carry their own lr."""
    if name == "gd":
        return torch.optim.SGD(groups, lr=0.0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=0.0)
    if name == "lion":
        return Lion(groups, lr=0.0)
    if name == "sophiag":
        return SophiaG(groups, lr=0.0, rho=RHO, weight_decay=0.0)
    if name == "sophiah":
        return SophiaH(groups, lr=0.0, rho=RHO, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def cosine_factor(t: int, horizon: int | None) -> float:
    """lr multiplier at 0-based step t: 1 without a horizon, else cosine from 1 to 0 over it."""
    if horizon is None:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * t / horizon)) if t < horizon else 0.0


def simulate(
    name: str,
    problem: str,
    runs: Sequence[Run],
    steps: int,
    target: float | None = None,
    seed: int = 0,
    record: bool = False,
) -> tuple[list[list[int | None]], list[list[float]], list[torch.Tensor] | None]:
    """Optimise f with one optimizer for every (run, kappa) cell at once.

    Returns, per run and kappa, the number of steps after which f first dropped to `target`
    (None if it never did or no target was given) and the final loss; with `record`, also each
    run's path as a [steps + 1, len(kappas), 2] tensor (it then never stops early).
    """
    params = [
        torch.tensor([start_point(problem, k) for k in run.kappas], dtype=torch.float64,
                     requires_grad=True)
        for run in runs
    ]
    kvecs = [torch.tensor(run.kappas, dtype=torch.float64) for run in runs]
    opt = make_optimizer(name, [{"params": [p], "lr": run.lr} for p, run in zip(params, runs)])
    gen = torch.Generator().manual_seed(seed)
    hits: list[list[int | None]] = [[None] * len(run.kappas) for run in runs]
    paths = [[p.detach().clone()] for p in params] if record else None
    scheduled = any(run.horizon is not None for run in runs)

    def losses() -> list[torch.Tensor]:
        return [loss_fn(p, kv) for p, kv in zip(params, kvecs)]

    for t in range(steps):
        if scheduled:
            for group, run in zip(opt.param_groups, runs):
                group["lr"] = run.lr * cosine_factor(t, run.horizon)
        with torch.no_grad():
            for p, kv in zip(params, kvecs):
                p.grad = grad_fn(p, kv)
        if name == "sophiag":
            opt.step(bs=1)
        else:
            opt.step()

        if t % HESSIAN_EVERY == HESSIAN_EVERY - 1:
            if name == "sophiag":
                for p, kv in zip(params, kvecs):
                    p.grad = gnb_gradient(p, kv, gen)
                opt.update_hessian()
            elif name == "sophiah":
                total = sum(loss.sum() for loss in losses())
                opt.update_hessian(hutchinson(total, params, generator=gen))

        if record:
            for path, p in zip(paths, params):
                path.append(p.detach().clone())
        if target is not None:
            with torch.no_grad():
                now = [loss.tolist() for loss in losses()]
            done = True
            for row_hits, row_now in zip(hits, now):
                for i, value in enumerate(row_now):
                    if row_hits[i] is None and value <= target:
                        row_hits[i] = t + 1
                done = done and all(h is not None for h in row_hits)
            if done and not record:
                break
    with torch.no_grad():
        final = [loss.tolist() for loss in losses()]
    return hits, final, [torch.stack(path) for path in paths] if record else None


def tune(
    name: str,
    problem: str,
    kappas: Sequence[float],
    grid: Sequence[float],
    steps: int,
    target: float,
    schedule: str = "constant",
) -> list[Best]:
    """Per kappa, the best cell over the lr grid (and, for `cosine`, the horizon grid).

    Fewest steps to target wins, ties go to the earlier grid entry; if no cell reaches the target,
    the one with the lowest final loss is reported with steps None.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    horizons: Sequence[int | None] = (
        [None] if schedule == "constant"
        else sorted({max(1, round(f * steps)) for f in HORIZON_FRACTIONS})
    )
    runs: list[Run] = []
    for g in grid:
        for horizon in horizons:
            if name == "gd":  # GD's lr is c / kappa: one run per kappa
                runs.extend(Run(g / k, (k,), horizon) for k in kappas)
            else:
                runs.append(Run(g, tuple(kappas), horizon))
    hits, final, _ = simulate(name, problem, runs, steps, target)

    best: list[Best] = []
    for kappa in kappas:
        cells = [  # (steps or inf, final loss, run) for every run that covers this kappa
            (math.inf if h[run.kappas.index(kappa)] is None else h[run.kappas.index(kappa)],
             f[run.kappas.index(kappa)], run)
            for run, h, f in zip(runs, hits, final) if kappa in run.kappas
        ]
        n, _, run = min(cells, key=lambda c: (c[0], c[1] if c[0] == math.inf else 0.0))
        best.append(Best(run.lr, None if n == math.inf else int(n), run.horizon))
    return best


def steps_vs_condition(
    problem: str,
    kappas: Sequence[float],
    grids: dict[str, Sequence[float]],
    max_steps: int,
    target: float,
    schedule: str = "constant",
    names: Sequence[str] = OPTIMIZERS,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[Best]]:
    """For each optimizer: its best cell per kappa (see `tune`)."""
    results: dict[str, list[Best]] = {}
    for name in names:
        results[name] = tune(name, problem, kappas, grids[name], max_steps, target, schedule)
        if log:
            log(f"  tuned {LABELS[name]} on {problem}")
    return results


def protocol(problem: str, target: float, max_steps: int, schedule: str) -> str:
    """One paragraph stating what the table measures and how it was tuned."""
    start = "(x0 / kappa, y0)" if problem == "heterogeneous" else "(x0, y0)"
    sched = (
        "constant lr" if schedule == "constant"
        else "cosine decay to 0 over a tuned horizon T in "
        + "/".join(f"{f:g}" for f in HORIZON_FRACTIONS) + " of the cap (same for all)"
    )
    return (
        f"problem={problem}: f = 0.5 (kappa x^2 + y^2) from {start}, "
        f"(x0, y0) = ({START[0]:.4f}, {START[1]:.4f}); steps to f <= {target:g}, cap {max_steps}.\n"
        f"lr tuned per optimizer and kappa over its grid (GD: c / kappa), {sched}; "
        f"Sophia rho={RHO}, k={HESSIAN_EVERY}, official betas; Adam/Lion default betas."
    )


def format_table(kappas: Sequence[float], results: dict[str, list[Best]], max_steps: int) -> str:
    """Plain-text table: steps to target (and the chosen lr, horizon) per optimizer and kappa."""
    width = 26 if any(b.horizon is not None for row in results.values() for b in row) else 22
    head = f"{'optimizer':<10}" + "".join(f"{f'kappa={k:g}':>{width}}" for k in kappas)
    lines = [head, "-" * len(head)]
    for name, row in results.items():
        cells = []
        for b in row:
            steps = f">{max_steps}" if b.steps is None else str(b.steps)
            extra = "" if b.horizon is None else f",T={b.horizon}"
            cells.append(f"{steps} (lr={b.lr:.2g}{extra})".rjust(width))
        lines.append(f"{LABELS[name]:<10}" + "".join(cells))
    return "\n".join(lines)


def compare(
    kappas: Sequence[float], results: dict[str, list[Best]], a: str = "sophiag", b: str = "adam"
) -> str:
    """One line saying, per kappa, which of two optimizers reached the target in fewer steps."""
    cells = []
    for kappa, ba, bb in zip(kappas, results[a], results[b]):
        na = math.inf if ba.steps is None else ba.steps
        nb = math.inf if bb.steps is None else bb.steps
        winner = "tie" if na == nb else (LABELS[a] if na < nb else LABELS[b])
        cells.append(f"kappa={kappa:g}: {winner}")
    return f"fewer steps, {LABELS[a]} vs {LABELS[b]}: " + ", ".join(cells)


def plot_trajectories(
    problems: Sequence[str], kappa: float, best: dict[str, dict[str, Best]], steps: int, out: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """One contour panel per problem with each optimizer's path; returns the [steps+1, 2] paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(problems), figsize=(7 * len(problems), 5), squeeze=False)
    all_paths: dict[str, dict[str, torch.Tensor]] = {}
    for ax, problem in zip(axes[0], problems):
        paths = {}
        for name, b in best[problem].items():
            _, _, recorded = simulate(name, problem, [Run(b.lr, (kappa,), b.horizon)], steps,
                                      record=True)
            paths[name] = recorded[0][:, 0, :]
        all_paths[problem] = paths
        x0, y0 = start_point(problem, kappa)
        # frame the start, the optimum and the paths (clipped: a diverging path must not zoom out)
        pts = torch.cat([p for p in paths.values()]).numpy()
        pts = pts[np.isfinite(pts).all(axis=1)]
        xr = 1.1 * min(np.abs(pts[:, 0]).max(initial=abs(x0)), 3 * max(abs(x0), 0.4))
        ylo = 1.1 * max(pts[:, 1].min(initial=-0.05 * abs(y0)), -abs(y0))
        yhi = 1.1 * min(pts[:, 1].max(initial=y0), 1.5 * abs(y0))
        X, Y = np.meshgrid(np.linspace(-xr, xr, 300), np.linspace(ylo, yhi, 300))
        Z = 0.5 * (kappa * X**2 + Y**2)
        ax.contour(X, Y, Z, levels=np.geomspace(max(Z.min(), 1e-4), Z.max(), 18), cmap="Greys",
                   linewidths=0.7)
        for name, path in paths.items():
            b = best[problem][name]
            label = f"{LABELS[name]} (lr={b.lr:.2g}" + ("" if b.horizon is None
                                                         else f", T={b.horizon}") + ")"
            ax.plot(path[:, 0], path[:, 1], ".-", ms=2, lw=1, label=label)
        ax.plot([0], [0], "k*", ms=10)
        ax.plot([x0], [y0], "ko", ms=5)
        ax.set_xlim(-xr, xr)
        ax.set_ylim(ylo, yhi)
        ax.set_xlabel("x (sharp direction)")
        ax.set_ylabel("y (flat direction)")
        ax.set_title(f"{problem}: f = 0.5 (kappa x^2 + y^2), kappa={kappa:g}, {steps} steps",
                     fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return all_paths


def plot_steps(
    kappas: Sequence[float],
    results: dict[str, dict[str, list[Best]]],
    max_steps: int,
    target: float,
    out: Path,
) -> None:
    """Steps to reach the target versus condition number (log-log), one panel per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (problem, res) in zip(axes[0], results.items()):
        for name, row in res.items():
            ax.plot(kappas, [max_steps if b.steps is None else b.steps for b in row], "o-",
                    label=LABELS[name])
        ax.axhline(max_steps, color="grey", ls=":", lw=1, label="step cap (not reached)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("condition number kappa")
        ax.set_ylabel(f"steps to f <= {target:g}")
        ax.set_title(f"{problem}: steps to target vs kappa (lr tuned per cell)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[Best]]]:
    """Run the study; returns {problem: {optimizer: [Best per kappa]}}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/toy"), help="output folder")
    parser.add_argument("--problem", choices=(*PROBLEMS, "both"), default="both",
                        help="which start to study (default: both, heterogeneous first)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant",
                        help="lr schedule given to every optimizer alike")
    parser.add_argument("--quick", action="store_true", help="small grid and few steps (tests)")
    parser.add_argument("--target", type=float, default=1e-6, help="loss to reach")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap per run")
    parser.add_argument("--plot-kappa", type=float, default=30.0, help="kappa of the contour plot")
    args = parser.parse_args(argv)

    problems = PROBLEMS if args.problem == "both" else (args.problem,)
    if args.quick:
        kappas, grids, max_steps = [1.0, 1e3], QUICK_LR_GRIDS, args.max_steps or 700
    else:
        kappas, grids, max_steps = [1.0, 1e1, 1e2, 1e3, 1e4], LR_GRIDS, args.max_steps or 4000
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, list[Best]]] = {}
    for problem in problems:
        results[problem] = steps_vs_condition(problem, kappas, grids, max_steps, args.target,
                                              args.schedule)
        print(protocol(problem, args.target, max_steps, args.schedule))
        print(format_table(kappas, results[problem], max_steps))
        print(compare(kappas, results[problem]))
        print()
    plot_steps(kappas, results, max_steps, args.target, args.out / "steps_vs_condition.png")

    # the contour plot reuses the cells tuned at the table's kappa nearest to plot_kappa
    near = min(range(len(kappas)), key=lambda i: abs(math.log(kappas[i] / args.plot_kappa)))
    plot_best = {problem: {name: row[near] for name, row in res.items()}
                 for problem, res in results.items()}
    for best in plot_best.values():  # GD's lr is tuned as c / kappa
        best["gd"] = best["gd"]._replace(lr=best["gd"].lr * kappas[near] / args.plot_kappa)
    plot_trajectories(problems, args.plot_kappa, plot_best, 100 if args.quick else 200,
                      args.out / "trajectories.png")
    print(f"wrote {args.out / 'trajectories.png'} and {args.out / 'steps_vs_condition.png'}")
    return results


if __name__ == "__main__":
    main()
