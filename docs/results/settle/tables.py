"""The tables of the settle study (docs/results.md) from the run directories study.sh wrote.

    python docs/results/settle/tables.py OUT > tables.md

Branch against fresh run, WSD against cosine, the final losses per horizon, the clip-trigger rates
with seed intervals and the scale_attn_by_inverse_layer_idx grid. Everything else (verdicts, lr
sensitivity, fitted speed-up) is scripts/compare.py's.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from analysis.verdicts import welch  # noqa: E402
from engine.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from engine.run_dir import read_config, read_metrics, read_summary  # noqa: E402

OPTIMIZERS = {"adamw": "AdamW", "sophia": "SophiaG", "lion": "Lion", "muon": "Muon"}
SEEDS = (1337, 2, 3)
HORIZONS = (250, 500, 1000, 2000)
CLOCKS = ("time/elapsed", "throughput", "time/hessian", "memory/peak", "mfu")


def horizon_runs(out: Path, opt: str, seed: int) -> dict[int, Path]:
    """max_steps -> run dir: the WSD parent and its branches."""
    parent = out / "wsd" / f"{opt}-s{seed}"
    runs = {2000: parent}
    for sub in sorted((out / "wsd" / f"{opt}-s{seed}-branches").glob("[0-9]*")):
        runs[read_config(sub)["train"]["max_steps"]] = sub
    return runs


def final(run: Path, key: str = "val_loss") -> float | None:
    summary = read_summary(run) or {}
    return None if summary.get("diverged") else summary.get(key)


def loss(run: Path) -> str:
    summary = read_summary(run) or {}
    if summary.get("diverged"):
        return f"diverged (step {summary['diverged']['step']})"
    return "-" if summary.get("val_loss") is None else f"{summary['val_loss']:.4f}"


def last(run: Path, key: str) -> float | None:
    values = [r[key] for r in read_metrics(run / "metrics.jsonl") if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def interval(values: list[float]) -> str:
    """mean +- the 95% t-interval's half width."""
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{statistics.mean(values):.4f} +- {half:.4f}"


def branch_vs_fresh(out: Path) -> None:
    print("| optimizer | weights | metrics (clocks aside) | val loss, branch | val loss, fresh |")
    print("|---|---|---|---|---|")
    for opt, name in OPTIMIZERS.items():
        branch, fresh = horizon_runs(out, opt, 1337)[500], out / "fresh" / f"{opt}-500"
        a = load_checkpoint(list_checkpoints(branch / "checkpoints")[-1])["model"]
        b = load_checkpoint(list_checkpoints(fresh / "checkpoints")[-1])["model"]
        same = all(torch.equal(a[k], b[k]) for k in a)
        rows = [[{k: v for k, v in r.items() if k not in CLOCKS} for r in read_metrics(d / "metrics.jsonl")]
                for d in (branch, fresh)]
        print(f"| {name} | {'identical' if same else 'DIFFER'} | "
              f"{'identical' if rows[0] == rows[1] else 'DIFFER'} ({len(rows[0])} lines) | "
              f"{loss(branch)} | {loss(fresh)} |")


def wsd_vs_cosine(out: Path) -> None:
    print("| optimizer | " + " | ".join(f"{t} steps: WSD / cosine" for t in HORIZONS[1:]) + " |")
    print("|---|" + "---|" * len(HORIZONS[1:]))
    for opt, name in OPTIMIZERS.items():
        wsd = horizon_runs(out, opt, 1337)
        cells = [f"{loss(wsd[t])} / {loss(out / 'cosine' / f'{opt}-{t}')}" for t in HORIZONS[1:]]
        print(f"| {name} | " + " | ".join(cells) + " |")


def per_horizon(out: Path) -> None:
    print("| optimizer | " + " | ".join(f"{t} steps" for t in HORIZONS) + " |")
    print("|---|" + "---|" * len(HORIZONS))
    for opt, name in OPTIMIZERS.items():
        runs = [horizon_runs(out, opt, s) for s in SEEDS]
        cells = []
        for t in HORIZONS:
            values = [v for r in runs if (v := final(r[t])) is not None]
            cells.append(interval(values) + ("" if len(values) == len(SEEDS) else
                                             f" ({len(SEEDS) - len(values)} diverged)"))
        print(f"| {name} | " + " | ".join(cells) + " |")


def clip_rates(out: Path) -> None:
    rates = {opt: [last(horizon_runs(out, opt, s)[2000], "grad/clip_rate") for s in SEEDS]
             for opt in OPTIMIZERS}
    print("| optimizer | clip-trigger rate, 2000 steps (mean +- 95% interval, 3 seeds) | per seed |")
    print("|---|---|---|")
    for opt, name in OPTIMIZERS.items():
        print(f"| {name} | {interval(rates[opt])} | {', '.join(f'{v:.3f}' for v in rates[opt])} |")
    print()
    for other in ("adamw", "lion"):
        w = welch(rates["sophia"], rates[other])
        ci = "n/a" if w.ci95 is None else f"[{w.ci95[0]:+.3f}, {w.ci95[1]:+.3f}]"
        p = "n/a" if w.p_value is None else f"{w.p_value:.3g}"
        print(f"- SophiaG - {OPTIMIZERS[other]}: {w.diff:+.3f}, 95% CI {ci}, Welch p = {p}")


def scale_attn(out: Path) -> None:
    print("| optimizer | lr | 1x: off / on | 3x: off / on | 10x: off / on |")
    print("|---|---|---|---|---|")
    for opt, name in OPTIMIZERS.items():
        off = {"1": horizon_runs(out, opt, 1337)[1000], "3": out / "grid" / f"{opt}-x3",
               "10": out / "grid" / f"{opt}-x10"}
        lr = read_config(off["1"])["optimizer"]["lr"]
        cells = [f"{loss(off[x])} / {loss(out / 'grid-scaled' / f'{opt}-x{x}')}" for x in ("1", "3", "10")]
        print(f"| {name} | {lr:g} | " + " | ".join(cells) + " |")


def main() -> None:
    out = Path(sys.argv[1])
    for title, table in (("Branch at 500 steps against a fresh 500-step WSD run, seed 1337", branch_vs_fresh),
                         ("WSD against cosine, seed 1337, final val loss", wsd_vs_cosine),
                         ("WSD final val loss per horizon, 3 seeds", per_horizon),
                         ("Clip-trigger rate", clip_rates),
                         ("scale_attn_by_inverse_layer_idx, WSD 1000 steps, seed 1337", scale_attn)):
        print(f"### {title}\n")
        table(out)
        print()


if __name__ == "__main__":
    main()
