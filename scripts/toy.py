"""Toy problems: why a clipped diagonal-Newton step helps on ill-conditioned losses.

    python scripts/toy.py                  # both figures + table under results/toy/
    python scripts/toy.py --quick          # small version (used by the test suite)

The problem is an axis-aligned quadratic with one sharp and one flat direction,

    f(x, y) = 0.5 * (kappa * x^2 + y^2),     condition number kappa,

the 2-D picture of Figure 2 in the Sophia paper. (a) draws the trajectories of GD, Adam, Lion,
SophiaG and SophiaH on its contours; (b) counts the steps each needs to bring f below an absolute
target (default 1e-6) from a fixed start as kappa goes from 1 to 1e4. GD's stable lr shrinks like
1/kappa, so its step count grows like kappa; Sophia's unclipped step is a damped Newton step, so
its count does not depend on kappa.

What to expect (and what the table shows): on an *axis-aligned* quadratic Adam is also almost
invariant to kappa, because its per-coordinate normalisation undoes diagonal rescaling. Sophia's
clipping makes it move at most lr per coordinate per step while |theta_i| > rho (a sign step), and
with the official beta1 = 0.965 and a Hessian EMA that starts at 0 its end-game is slower than
tuned Adam's (beta1 = 0.9). The toy shows the curvature-independence, not a win over Adam.

Hessian estimates, consistent with each optimizer's semantics:
- SophiaG uses the GNB estimator. f is the negative log-likelihood (up to a constant) of a
  Gaussian model o = sqrt(diag(kappa, 1)) * theta with targets 0, so the "sampled-label" loss is
  0.5 * ||o - t||^2 with t ~ N(o, I); its squared gradient diag(kappa, 1) * eps^2 has expectation
  exactly diag(H). One sample per refresh, so bs = 1.
- SophiaH uses `sophia.hessian.hutchinson` on f itself (exact here: H is diagonal).
Both refresh h every k = 10 steps after the step (official timing) with the official betas
(0.965, 0.99), rho = 0.04 and no weight decay; only lr is tuned.

Each optimizer's lr is tuned per kappa over a small grid (GD's grid is c / kappa because its stable
range scales with the sharpest curvature); the table states the chosen lr of every cell.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

try:
    import sophia  # noqa: F401
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sophia import Lion, SophiaG, SophiaH
from sophia.hessian import hutchinson

OPTIMIZERS = ("gd", "adam", "lion", "sophiag", "sophiah")
LABELS = {"gd": "GD", "adam": "Adam", "lion": "Lion", "sophiag": "SophiaG", "sophiah": "SophiaH"}
START = (math.e / 3, math.pi / 3)  # generic: sign steps of a round lr never land on 0
HESSIAN_EVERY = 10
RHO = 0.04

# lr grids: GD's entries multiply 1 / kappa (its stability limit is 2 / kappa)
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "gd": (0.5, 1.0, 1.9),
    "adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "lion": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "sophiag": (3e-3, 1e-2, 3e-2, 1e-1),
    "sophiah": (3e-3, 1e-2, 3e-2, 1e-1),
}
QUICK_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "gd": (1.9,),
    "adam": (3e-2,),
    "lion": (3e-3,),
    "sophiag": (1e-2, 1e-1),
    "sophiah": (1e-2,),
}


def loss_fn(theta: torch.Tensor, kappa: float) -> torch.Tensor:
    """f(x, y) = 0.5 * (kappa * x^2 + y^2)."""
    return 0.5 * (kappa * theta[0] ** 2 + theta[1] ** 2)


def gnb_gradient(theta: torch.Tensor, kappa: float, generator: torch.Generator) -> torch.Tensor:
    """Gradient of the sampled-label loss 0.5 * ||o - t||^2 with t ~ N(o, I), o = sqrt(H) theta.

    f is the Gaussian negative log-likelihood of o against targets 0, so this is SophiaG's GNB
    recipe for that model: its square has expectation diag(H) = (kappa, 1) for bs = 1.
    """
    theta = theta.detach().requires_grad_(True)
    o = torch.tensor([math.sqrt(kappa), 1.0], dtype=theta.dtype) * theta
    t = o.detach() + torch.randn(o.shape, generator=generator, dtype=o.dtype)
    (grad,) = torch.autograd.grad(0.5 * ((o - t) ** 2).sum(), [theta])
    return grad


def run(
    name: str, kappa: float, lr: float, steps: int, target: float | None = None, seed: int = 0
) -> tuple[list[tuple[float, float]], int | None]:
    """Optimise f with one optimizer from START.

    Returns the trajectory (list of (x, y) including the start) and the number of steps after
    which f first dropped to `target` (None if it never did, or if no target was given).
    """
    theta = torch.tensor(START, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(seed)
    if name == "gd":
        opt = torch.optim.SGD([theta], lr=lr)
    elif name == "adam":
        opt = torch.optim.Adam([theta], lr=lr)
    elif name == "lion":
        opt = Lion([theta], lr=lr)
    elif name == "sophiag":
        opt = SophiaG([theta], lr=lr, rho=RHO, weight_decay=0.0)
    elif name == "sophiah":
        opt = SophiaH([theta], lr=lr, rho=RHO, weight_decay=0.0)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")

    path = [START]
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(theta, kappa)
        loss.backward()
        if name == "sophiag":
            opt.step(bs=1)
        else:
            opt.step()
        path.append(tuple(theta.detach().tolist()))

        if t % HESSIAN_EVERY == HESSIAN_EVERY - 1:
            if name == "sophiag":
                theta.grad = gnb_gradient(theta, kappa, gen)
                opt.update_hessian()
            elif name == "sophiah":
                (estimate,) = hutchinson(loss_fn(theta, kappa), [theta], generator=gen)
                opt.update_hessian([estimate])

        if target is not None and loss_fn(theta.detach(), kappa).item() <= target:
            return path, t + 1
    return path, None


def tune(
    name: str, kappa: float, grid: Sequence[float], steps: int, target: float
) -> tuple[float, int | None]:
    """Best (lr, steps-to-target) over the grid; ties and failures favour the earlier entry."""
    best_lr, best_steps = grid[0], None
    for g in grid:
        lr = g / kappa if name == "gd" else g
        _, n = run(name, kappa, lr, steps, target)
        if n is not None and (best_steps is None or n < best_steps):
            best_lr, best_steps = lr, n
        elif best_steps is None and n is None and g == grid[0]:
            best_lr = lr
    return best_lr, best_steps


def steps_vs_condition(
    kappas: Sequence[float],
    grids: dict[str, Sequence[float]],
    max_steps: int,
    target: float,
    names: Sequence[str] = OPTIMIZERS,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[tuple[float, int | None]]]:
    """For each optimizer and kappa: (tuned lr, steps to reach f <= target or None)."""
    results: dict[str, list[tuple[float, int | None]]] = {}
    for name in names:
        results[name] = [tune(name, k, grids[name], max_steps, target) for k in kappas]
        if log:
            log(f"  tuned {LABELS[name]}")
    return results


def format_table(
    kappas: Sequence[float], results: dict[str, list[tuple[float, int | None]]], max_steps: int
) -> str:
    """Plain-text table: steps to target (and the chosen lr) per optimizer and kappa."""
    head = f"{'optimizer':<10}" + "".join(f"{f'kappa={k:g}':>22}" for k in kappas)
    lines = [head, "-" * len(head)]
    for name, row in results.items():
        cells = []
        for lr, n in row:
            steps = f">{max_steps}" if n is None else str(n)
            cells.append(f"{steps} (lr={lr:.2g})".rjust(22))
        lines.append(f"{LABELS[name]:<10}" + "".join(cells))
    return "\n".join(lines)


def plot_trajectories(
    kappa: float, lrs: dict[str, float], steps: int, out: Path
) -> dict[str, list[tuple[float, float]]]:
    """Contour plot of f with each optimizer's path; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = {name: run(name, kappa, lr, steps)[0] for name, lr in lrs.items()}
    xs = np.linspace(-1.2, 1.2, 300)
    ys = np.linspace(-0.4, 1.2, 300)
    X, Y = np.meshgrid(xs, ys)
    Z = 0.5 * (kappa * X**2 + Y**2)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.contour(X, Y, Z, levels=np.geomspace(1e-3, Z.max(), 18), cmap="Greys", linewidths=0.7)
    for name, path in paths.items():
        p = np.array(path)
        ax.plot(p[:, 0], p[:, 1], ".-", ms=2, lw=1, label=f"{LABELS[name]} (lr={lrs[name]:.2g})")
    ax.plot([0], [0], "k*", ms=10)
    ax.set_xlabel("x (sharp direction)")
    ax.set_ylabel("y (flat direction)")
    ax.set_title(f"f = 0.5 (kappa x^2 + y^2), kappa={kappa:g}, {steps} steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return paths


def plot_steps(
    kappas: Sequence[float],
    results: dict[str, list[tuple[float, int | None]]],
    max_steps: int,
    target: float,
    out: Path,
) -> None:
    """Steps to reach the target versus condition number (log-log); misses drawn at the cap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, row in results.items():
        steps = [max_steps if n is None else n for _, n in row]
        ax.plot(kappas, steps, "o-", label=LABELS[name])
    ax.axhline(max_steps, color="grey", ls=":", lw=1, label="step cap (not reached)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("condition number kappa")
    ax.set_ylabel(f"steps to f <= {target:g}")
    ax.set_title("Steps to target vs conditioning (lr tuned per cell)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, list[tuple[float, int | None]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/toy"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="small grid and few steps (tests)")
    parser.add_argument("--target", type=float, default=1e-6, help="loss to reach")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap per run")
    parser.add_argument("--plot-kappa", type=float, default=30.0, help="kappa of the contour plot")
    args = parser.parse_args(argv)

    if args.quick:
        kappas, grids, max_steps = [1.0, 1e3], QUICK_LR_GRIDS, args.max_steps or 700
    else:
        kappas, grids, max_steps = [1.0, 1e1, 1e2, 1e3, 1e4], LR_GRIDS, args.max_steps or 4000
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"steps to f <= {args.target:g} from {START}, cap {max_steps} steps")
    results = steps_vs_condition(kappas, grids, max_steps, args.target)
    print(format_table(kappas, results, max_steps))
    plot_steps(kappas, results, max_steps, args.target, args.out / "steps_vs_condition.png")

    # the contour plot reuses the lrs tuned at the table's kappa nearest to plot_kappa
    near = min(range(len(kappas)), key=lambda i: abs(math.log(kappas[i] / args.plot_kappa)))
    plot_lrs = {name: results[name][near][0] for name in OPTIMIZERS}
    plot_lrs["gd"] *= kappas[near] / args.plot_kappa  # GD's lr is tuned as c / kappa
    plot_trajectories(args.plot_kappa, plot_lrs, 100 if args.quick else 200,
                      args.out / "trajectories.png")
    print(f"wrote {args.out / 'trajectories.png'} and {args.out / 'steps_vs_condition.png'}")
    return results


if __name__ == "__main__":
    main()
