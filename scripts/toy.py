"""Toy problems: how GD, Adam, Lion and Sophia cope with one sharp and one flat direction.

    python scripts/toy.py                    # all four problems: tables + figures in results/toy/
    python scripts/toy.py --problem exact    # the two exact-gradient problems only (or: noisy)
    python scripts/toy.py --problem noisy-heterogeneous --noise-batch 1000 --noisy-target 1e-4
    python scripts/toy.py --schedule cosine  # every optimizer gets a cosine-decayed lr
    python scripts/toy.py --quick            # small version (used by the test suite)

The loss is f(x, y) = 0.5 * (kappa * x^2 + y^2). There are two starts: `heterogeneous` puts the
sharp coordinate kappa times closer to its optimum, and `quadratic` gives equal distances. Each
start is run with exact gradients or with mini-batch gradients (`noisy-*`). For each optimizer the
lr is tuned per problem and per kappa (1 .. 1e4) over a fixed grid, and the script tabulates the
steps needed to reach the target and hold it there. It writes `tables.txt`,
`steps_vs_condition.png` and `trajectories.png` to --out, with a `-cosine` suffix under
--schedule cosine. The problems, the protocol, the recorded results and what they mean are in
docs/results/toy/README.md.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from engine.optimizers import entries, optimizer_defaults
from sophia.hessian import hutchinson

# GD and Adam are the baselines; every elementwise optimizer of the harness's registry joins them
# (AdamW's is Adam itself: no weight decay here). Muon and SOAP are left out: they precondition
# across a tensor's coordinates, and the toy's coordinates are independent problems.
BASELINES = {"gd": "GD", "adam": "Adam"}
OPTIMIZERS = (*BASELINES, *(n for n, e in entries().items() if e.access and n != "adamw"))
LABELS = {**BASELINES, **{n: entries()[n].label for n in OPTIMIZERS if n not in BASELINES}}
PROBLEMS = ("heterogeneous", "quadratic", "noisy-heterogeneous", "noisy-quadratic")
NOISY_PREFIX = "noisy-"
SCHEDULES = ("constant", "cosine")
NOISE_BATCH = 100  # B of the noisy problems: gradient noise covariance diag(H) / B
REPLICATES = 32  # independent noisy runs per cell; their mean loss is what must reach the target
EXACT_TARGET = 1e-6
NOISY_TARGET = 1e-3
HOLD_STEPS = 50  # a cell reaches the target only if its loss then stays there this many steps
START = (math.e / 3, math.pi / 3)  # generic: sign steps of a round lr never land on 0
HESSIAN_EVERY = 10
RHO = 0.04
# cosine horizons, as fractions of the step cap: short ones matter, since a decayed lr is what lets
# an optimizer get under a noise floor quickly
HORIZON_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)

# lr grids: GD's entries multiply 1 / kappa (its stability limit is 2 / kappa). They reach down
# far enough for the noisy problems, whose noise floor favours small steps.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "gd": (0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 1.9),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "lion": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "sophia": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "sophiah": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
}
DEFAULT_LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # a new optimizer
QUICK_MAX_STEPS = 700
# the quick grids keep, for every optimizer, the points that win somewhere in the full run
QUICK_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "gd": (0.1, 1.0, 1.9),
    "adam": (1e-3, 3e-2, 1e-1),
    "lion": (3e-4, 3e-3),
    "sophia": (3e-3, 3e-2),
    "sophiah": (3e-3, 3e-2),
}


class Best(NamedTuple):
    """One table cell: the chosen lr, the steps to target (None: missed) and the cosine horizon."""

    lr: float
    steps: int | None
    horizon: int | None = None
    edge: bool = False  # the chosen lr is the smallest or largest of its grid: widen the grid


class Run(NamedTuple):
    """One parameter group of a simulation: an lr, the kappas it runs, a cosine horizon or None."""

    lr: float
    kappas: tuple[float, ...]
    horizon: int | None = None


def is_noisy(problem: str) -> bool:
    """Whether `problem` uses mini-batch gradients (the `noisy-` variants) instead of exact ones."""
    return problem.startswith(NOISY_PREFIX)


def start_point(problem: str, kappa: float) -> tuple[float, float]:
    """Where `problem` starts at condition number kappa (see the module docstring)."""
    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; choose from {', '.join(PROBLEMS)}")
    if problem.removeprefix(NOISY_PREFIX) == "quadratic":
        return START
    return (START[0] / kappa, START[1])


def curvature(kappa: float | torch.Tensor) -> torch.Tensor:
    """diag(H) = (kappa, 1) over a new last dim (float64)."""
    k = torch.as_tensor(kappa, dtype=torch.float64)
    return torch.stack((k, torch.ones_like(k)), dim=-1)


def loss_fn(theta: torch.Tensor, kappa: float | torch.Tensor) -> torch.Tensor:
    """f(x, y) = 0.5 * (kappa * x^2 + y^2) over the last dim; kappa broadcasts over the rest."""
    return 0.5 * (kappa * theta[..., 0] ** 2 + theta[..., 1] ** 2)


def grad_fn(theta: torch.Tensor, kappa: float | torch.Tensor) -> torch.Tensor:
    """Analytic gradient of `loss_fn`, (kappa * x, y): cheaper than a backward pass per step."""
    return torch.stack((kappa * theta[..., 0], theta[..., 1]), dim=-1)


def noisy_gradient(
    theta: torch.Tensor, kappa: float | torch.Tensor, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """Mini-batch gradient of the Gaussian model behind f: mean, the exact gradient; covariance
    diag(H) / batch.

    f is, up to a constant, the population loss of o = sqrt(H) theta against data y ~ N(0, I);
    a batch of B such y gives the loss mean_b 0.5 * ||o - y_b||^2, whose gradient is
    H theta - sqrt(H) * mean_b y_b. Sampling the batch mean directly (N(0, I / B)) is equivalent.
    The noise thus has the shape of the curvature, as for a well-specified model's per-example
    gradients (their covariance is the Fisher), which is what Adam's second moment then measures.
    """
    noise = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
    return grad_fn(theta, kappa) + (curvature(kappa) / batch).sqrt() * noise


def gnb_gradient(
    theta: torch.Tensor, kappa: float | torch.Tensor, generator: torch.Generator, batch: int = 1
) -> torch.Tensor:
    """Gradient of the sampled-label loss mean_b 0.5 ||o - t_b||^2, t_b ~ N(o, I), o = sqrt(H)theta.

    f is the Gaussian negative log-likelihood of o against targets 0, so this is SophiaG's GNB
    recipe for that model over `batch` sampled labels: batch * grad^2 has expectation
    diag(H) = (kappa, 1), matching `SophiaG.step(bs=batch)`. Rows of a batched theta
    ([..., 2], kappa of shape [...]) get independent samples.
    """
    theta = theta.detach().requires_grad_(True)
    o = curvature(kappa).sqrt() * theta
    t_mean = o.detach() + torch.randn(o.shape, generator=generator, dtype=o.dtype) / batch**0.5
    # the mean of `batch` sampled losses has the same gradient as one loss against their mean label
    (grad,) = torch.autograd.grad(0.5 * ((o - t_mean) ** 2).sum(), [theta])
    return grad


def optimizer_config(name: str) -> dict:
    """A registry optimizer's config as the toy runs it: its defaults, rho = RHO where it has one."""
    cfg = optimizer_defaults(name)
    return {**cfg, **({"rho": RHO} if "rho" in cfg else {})}


def hessian_estimate(name: str) -> str | None:
    """The Hessian estimate ``name`` is fed ("gnb", "gnb_msq", "hutchinson"), or None."""
    entry = entries().get(name)
    return entry.hessian(optimizer_config(name)) if entry and entry.hessian else None


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer `name` over parameter groups that each carry their own lr (no weight decay:
    the toy loss has its optimum away from 0)."""
    if name == "gd":
        return torch.optim.SGD(groups, lr=0.0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=0.0)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return entries()[name].make([{**g, "weight_decay": 0.0} for g in groups],
                                optimizer_config(name))


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
    noise_batch: int = NOISE_BATCH,
    replicates: int = REPLICATES,
) -> tuple[list[list[int | None]], list[list[float]], list[torch.Tensor] | None]:
    """Optimise f with one optimizer for every (run, kappa) cell at once.

    A cell's loss is f at its iterate; where anything is random (a noisy problem, SophiaG's
    sampled Hessian estimate) it is the mean of f over `replicates` independent runs from the same
    start. Returns, per run and kappa, the steps to target: the first step from which that loss
    stays <= `target` for HOLD_STEPS steps in a row (None if that never happens within `steps` or
    no target was given; a lucky dip does not count), and the final loss (inf if the run
    diverged); with `record`, also each run's path (first replicate) as a [steps + 1,
    len(kappas), 2] tensor (it then never stops early).
    """
    noisy = is_noisy(problem)
    estimate = hessian_estimate(name)
    # GNB samples labels (random); Hutchinson is exact on a diagonal Hessian
    reps = replicates if noisy or estimate in ("gnb", "gnb_msq") else 1
    batch = noise_batch if noisy else 1  # exact gradients: one GNB label sample per refresh
    params = [  # [kappas, replicates, 2]: every coordinate is independent for these optimizers
        torch.tensor([[start_point(problem, k)] * reps for k in run.kappas], dtype=torch.float64,
                     requires_grad=True)
        for run in runs
    ]
    kvecs = [torch.tensor(run.kappas, dtype=torch.float64)[:, None] for run in runs]
    opt = make_optimizer(name, [{"params": [p], "lr": run.lr} for p, run in zip(params, runs)])
    gen = torch.Generator().manual_seed(seed)
    hits: list[list[int | None]] = [[None] * len(run.kappas) for run in runs]
    below_since: list[list[int | None]] = [[None] * len(run.kappas) for run in runs]
    paths = [[p.detach()[:, 0].clone()] for p in params] if record else None
    scheduled = any(run.horizon is not None for run in runs)

    def losses() -> list[torch.Tensor]:  # per run: [kappas], replicates averaged
        return [loss_fn(p, kv).mean(dim=1) for p, kv in zip(params, kvecs)]

    for t in range(steps):
        if scheduled:
            for group, run in zip(opt.param_groups, runs):
                group["lr"] = run.lr * cosine_factor(t, run.horizon)
        with torch.no_grad():
            for p, kv in zip(params, kvecs):
                p.grad = noisy_gradient(p, kv, batch, gen) if noisy else grad_fn(p, kv)
        if estimate in ("gnb", "gnb_msq"):
            opt.step(bs=batch)
        else:
            opt.step()

        if t % HESSIAN_EVERY == HESSIAN_EVERY - 1:
            if estimate in ("gnb", "gnb_msq"):
                for p, kv in zip(params, kvecs):
                    p.grad = gnb_gradient(p, kv, gen, batch)
                opt.update_hessian()
            elif estimate == "hutchinson":  # a mini-batch loss has the same (constant) Hessian as f
                # a sum, not the replicate mean: each row must see its own f's Hessian
                total = sum(loss_fn(p, kv).sum() for p, kv in zip(params, kvecs))
                opt.update_hessian(hutchinson(total, params, generator=gen))

        if record:
            for path, p in zip(paths, params):
                path.append(p.detach()[:, 0].clone())
        if target is not None:
            with torch.no_grad():
                now = [loss.tolist() for loss in losses()]
            done = True
            for row_hits, row_since, row_now in zip(hits, below_since, now):
                for i, value in enumerate(row_now):
                    if row_hits[i] is not None:
                        continue
                    if value > target or not math.isfinite(value):
                        row_since[i] = None
                        continue
                    if row_since[i] is None:
                        row_since[i] = t + 1
                    held = t + 2 - row_since[i]  # steps at or below target, this one included
                    if held >= HOLD_STEPS:
                        row_hits[i] = row_since[i]
                done = done and all(h is not None for h in row_hits)
            if done and not record:
                break
    with torch.no_grad():
        final = [[v if math.isfinite(v) else math.inf for v in loss.tolist()]
                 for loss in losses()]
    return hits, final, [torch.stack(path) for path in paths] if record else None


def tune(
    name: str,
    problem: str,
    kappas: Sequence[float],
    grid: Sequence[float],
    steps: int,
    target: float,
    schedule: str = "constant",
    noise_batch: int = NOISE_BATCH,
    replicates: int = REPLICATES,
) -> list[Best]:
    """Per kappa, the best cell over the lr grid (and, for `cosine`, the horizon grid).

    Fewest steps to target wins, ties go to the earlier grid entry; if no cell reaches the target,
    the one with the lowest final loss is reported with steps None. A winner at either end of a
    grid of 3 or more points (lr, or cosine horizon) is flagged `edge`: the optimum may lie outside.
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
    hits, final, _ = simulate(name, problem, runs, steps, target, noise_batch=noise_batch,
                              replicates=replicates)

    best: list[Best] = []
    for kappa in kappas:
        cells = [  # (steps or inf, final loss, run) for every run that covers this kappa
            (math.inf if h[run.kappas.index(kappa)] is None else h[run.kappas.index(kappa)],
             f[run.kappas.index(kappa)], run)
            for run, h, f in zip(runs, hits, final) if kappa in run.kappas
        ]
        n, _, run = min(cells, key=lambda c: (c[0], c[1] if c[0] == math.inf else 0.0))
        g = run.lr * kappa if name == "gd" else run.lr
        edge = len(grid) >= 3 and any(math.isclose(g, e) for e in (min(grid), max(grid)))
        if run.horizon is not None and len(horizons) >= 3:
            edge = edge or run.horizon in (min(horizons), max(horizons))
        best.append(Best(run.lr, None if n == math.inf else int(n), run.horizon, edge))
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
    noise_batch: int = NOISE_BATCH,
    replicates: int = REPLICATES,
) -> dict[str, list[Best]]:
    """For each optimizer: its best cell per kappa (see `tune`)."""
    results: dict[str, list[Best]] = {}
    for name in names:
        results[name] = tune(name, problem, kappas, grids.get(name, DEFAULT_LR_GRID), max_steps, target, schedule,
                             noise_batch, replicates)
        if log:
            log(f"  tuned {LABELS[name]} on {problem}")
    return results


def protocol(
    problem: str,
    target: float,
    max_steps: int,
    schedule: str,
    noise_batch: int = NOISE_BATCH,
    replicates: int = REPLICATES,
) -> str:
    """One paragraph stating what the table measures and how it was tuned."""
    start = "(x0, y0)" if problem.removeprefix(NOISY_PREFIX) == "quadratic" else "(x0 / kappa, y0)"
    sched = (
        "constant lr" if schedule == "constant"
        else "cosine decay to 0 over a tuned horizon T in "
        + "/".join(f"1/{round(1 / f)}" if f < 1 else "1" for f in HORIZON_FRACTIONS)
        + " of the cap (same for all)"
    )
    gradients = (
        f"mini-batch gradients, noise covariance diag(kappa, 1) / B with B={noise_batch}; "
        f"loss = mean f over {replicates} independent runs"
        if is_noisy(problem) else "exact gradients"
    )
    return (
        f"problem={problem}: f = 0.5 (kappa x^2 + y^2) from {start}, "
        f"(x0, y0) = ({START[0]:.4f}, {START[1]:.4f}), {gradients}; "
        f"steps to loss <= {target:g}, cap {max_steps}.\n"
        f"lr tuned per optimizer and kappa over its grid (GD: c / kappa; * = best at a grid end), "
        f"{sched}; Sophia rho={RHO}, k={HESSIAN_EVERY}, official betas; Adam/Lion default betas."
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
            edge = "*" if b.edge else ""
            cells.append(f"{steps} (lr={b.lr:.2g}{extra}){edge}".rjust(width))
        lines.append(f"{LABELS[name]:<10}" + "".join(cells))
    return "\n".join(lines)


def compare(
    kappas: Sequence[float], results: dict[str, list[Best]], a: str = "sophia", b: str = "adam"
) -> str:
    """One line saying, per kappa, which of two optimizers reached the target in fewer steps."""
    cells = []
    for kappa, ba, bb in zip(kappas, results[a], results[b]):
        na = math.inf if ba.steps is None else ba.steps
        nb = math.inf if bb.steps is None else bb.steps
        winner = "tie" if na == nb else (LABELS[a] if na < nb else LABELS[b])
        cells.append(f"kappa={kappa:g}: {winner}")
    return f"fewer steps, {LABELS[a]} vs {LABELS[b]}: " + ", ".join(cells)


def _panel_grid(n: int, width: float = 7.0, height: float = 5.0):
    """A figure with n panels, two per row; returns (figure, flat list of the n axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_trajectories(
    problems: Sequence[str],
    kappa: float,
    best: dict[str, dict[str, Best]],
    steps: int,
    out: Path,
    noise_batch: int = NOISE_BATCH,
) -> dict[str, dict[str, torch.Tensor]]:
    """One contour panel per problem with each optimizer's path (on a noisy problem, of one run);
    returns the [steps+1, 2] paths."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = _panel_grid(len(problems))
    all_paths: dict[str, dict[str, torch.Tensor]] = {}
    for ax, problem in zip(axes, problems):
        paths = {}
        for name, b in best[problem].items():
            _, _, recorded = simulate(name, problem, [Run(b.lr, (kappa,), b.horizon)], steps,
                                      record=True, noise_batch=noise_batch, replicates=1)
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
        noise = f", one run, B={noise_batch}" if is_noisy(problem) else ""
        ax.set_title(f"{problem}: f = 0.5 (kappa x^2 + y^2), kappa={kappa:g}, {steps} steps"
                     + noise, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return all_paths


def plot_steps(
    kappas: Sequence[float],
    results: dict[str, dict[str, list[Best]]],
    max_steps: int,
    targets: dict[str, float],
    out: Path,
) -> None:
    """Steps to reach each problem's target versus condition number (log-log), a panel each."""
    import matplotlib.pyplot as plt

    fig, axes = _panel_grid(len(results))
    for ax, (problem, res) in zip(axes, results.items()):
        for name, row in res.items():
            ax.plot(kappas, [max_steps if b.steps is None else b.steps for b in row], "o-",
                    label=LABELS[name])
        ax.axhline(max_steps, color="grey", ls=":", lw=1, label="step cap (not reached)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("condition number kappa")
        ax.set_ylabel(("mean " if is_noisy(problem) else "") + f"f <= {targets[problem]:g}: steps")
        ax.set_title(f"{problem}: steps to target vs kappa (lr tuned per cell)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


PROBLEM_SETS = {
    "all": PROBLEMS,
    "exact": tuple(p for p in PROBLEMS if not is_noisy(p)),
    "noisy": tuple(p for p in PROBLEMS if is_noisy(p)),
}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[Best]]]:
    """Run the study; returns {problem: {optimizer: [Best per kappa]}}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/toy"), help="output folder")
    parser.add_argument("--problem", choices=(*PROBLEMS, *PROBLEM_SETS), default="all",
                        help="one problem, or a set of them (default: all four)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant",
                        help="lr schedule given to every optimizer alike")
    parser.add_argument("--quick", action="store_true", help="small grid and few steps (tests)")
    parser.add_argument("--target", type=float, default=EXACT_TARGET,
                        help="loss to reach on the exact-gradient problems")
    parser.add_argument("--noisy-target", type=float, default=NOISY_TARGET,
                        help="mean loss to reach on the noisy problems")
    parser.add_argument("--noise-batch", type=int, default=NOISE_BATCH,
                        help="batch size B of the noisy problems (noise covariance diag(H) / B)")
    parser.add_argument("--replicates", type=int, default=REPLICATES,
                        help="independent runs averaged per cell on the noisy problems")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap per run")
    parser.add_argument("--plot-kappa", type=float, default=30.0, help="kappa of the contour plot")
    args = parser.parse_args(argv)
    for flag in ("target", "noisy_target", "noise_batch", "replicates"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")

    problems = PROBLEM_SETS.get(args.problem, (args.problem,))
    targets = {p: args.noisy_target if is_noisy(p) else args.target for p in problems}
    if args.quick:
        kappas, grids, max_steps = [1.0, 1e3], QUICK_LR_GRIDS, args.max_steps or QUICK_MAX_STEPS
    else:
        kappas, grids, max_steps = [1.0, 1e1, 1e2, 1e3, 1e4], LR_GRIDS, args.max_steps or 4000
    args.out.mkdir(parents=True, exist_ok=True)

    # the constant-lr files keep their historical names; other schedules get a suffix, so that
    # both schedules' results can sit in one --out folder
    suffix = "" if args.schedule == "constant" else f"-{args.schedule}"
    tables_path = args.out / f"tables{suffix}.txt"
    steps_path = args.out / f"steps_vs_condition{suffix}.png"
    trajectories_path = args.out / f"trajectories{suffix}.png"

    results: dict[str, dict[str, list[Best]]] = {}
    blocks = []
    for problem in problems:
        results[problem] = steps_vs_condition(problem, kappas, grids, max_steps, targets[problem],
                                              args.schedule, noise_batch=args.noise_batch,
                                              replicates=args.replicates)
        blocks.append("\n".join([
            protocol(problem, targets[problem], max_steps, args.schedule, args.noise_batch,
                     args.replicates),
            format_table(kappas, results[problem], max_steps),
            compare(kappas, results[problem]),
        ]))
        print(blocks[-1])
        print()
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = "python scripts/toy.py " + shlex.join(given)
    tables_path.write_text(f"{command.rstrip()}\n\n" + "\n\n".join(blocks) + "\n")
    plot_steps(kappas, results, max_steps, targets, steps_path)

    # the contour plot reuses the cells tuned at the table's kappa nearest to plot_kappa
    near = min(range(len(kappas)), key=lambda i: abs(math.log(kappas[i] / args.plot_kappa)))
    plot_best = {problem: {name: row[near] for name, row in res.items()}
                 for problem, res in results.items()}
    for best in plot_best.values():  # GD's lr is tuned as c / kappa
        best["gd"] = best["gd"]._replace(lr=best["gd"].lr * kappas[near] / args.plot_kappa)
    plot_trajectories(problems, args.plot_kappa, plot_best, 100 if args.quick else 200,
                      trajectories_path, args.noise_batch)
    print(f"wrote {tables_path}, {trajectories_path} and {steps_path}")
    return results


if __name__ == "__main__":
    main()
