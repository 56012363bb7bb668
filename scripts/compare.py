"""Compare training runs: loss curves on four cost axes, diagnostics, and speed-up at matched loss.

    python scripts/compare.py outputs/2024-05-01/12-00-00 multirun/2024-05-01/13-00-00 --out cmp

Inputs: any mix of
- a run directory (holds `metrics.jsonl`, written by the engine),
- a Hydra multirun directory (numbered sub-directories 0/, 1/, ... that are run directories),
- a W&B offline run directory (`.../wandb/offline-run-*`): if the run directory above `wandb/`
  holds `metrics.jsonl` that file is used (it is the engine's complete record); otherwise the
  run's `files/wandb-history.jsonl` is read,
- a `metrics.jsonl` file itself.

A path or sweep job that cannot be read (it does not exist, holds no `metrics.jsonl` as a job that
failed before logging does, or its metrics are empty or damaged) is skipped and named on stderr
with the reason; the exit status is 2 only when no run at all is readable.

Outputs in `--out` (default `compare_out/`):
- `loss.png`: a 2x4 grid, train loss (top row) and validation loss (bottom row), in nats/token,
  against optimizer steps, training tokens, FLOPs and wall-clock seconds (tokens, FLOPs and seconds
  include Hessian passes); large numbers read 120k, 1.5M, 3.2G;
- `diagnostics.png`: a 2x2 grid of lr, grad-clip trigger rate (`grad/clip_rate`), Sophia's clip
  fraction (`sophia/clip_frac`) and win rate (`sophia/win_rate`) against steps;
- `downstream.png`, when some run logged them (`eval.hellaswag_interval`): HellaSwag `acc` and
  `acc_norm` against training tokens;
- `speedup.json` and a table on stdout: for each pair (A, B), A's cost to reach B's final loss
  over B's, on each axis (0.5: A is twice as fast; `analysis/speedup.py` has the definition), with
  its range over seed pairings when a group has several seeds;
- verdicts (`speedup.json` `"verdicts"`, and printed): for each pair of groups with two or more
  seeds, the difference of their mean final losses with a 95% interval and Welch's p-value
  (`analysis/verdicts.py`);
- when runs of one optimizer differ in `optimizer.lr`: `lr_sensitivity.png` and a table (also in
  `speedup.json` `"lr_sensitivity"`): best lr, its loss, and how wide the lr range within 1% of it is
  (`analysis/sensitivity.py`);
- with `--scaling`, or by default when the runs span two or more model sizes, `scaling.png`,
  `scaling.json` and the size-match tables on stdout (`analysis/scaling.py`);
- when the runs of one line (optimizer plus differing overrides, seeds and horizon keys such as
  `train.max_steps` and `checkpoint.branch_from` aside) span three or more horizons: `horizons.png`,
  `horizons.json` and a summary on stdout: per line the fit L(D) = A * D^-alpha + E of final loss
  against tokens, whether it is good, and for each pair of good fits the token ratio at which they
  reach equal loss at each horizon (`analysis/horizons.py`); those ratios are also in
  `speedup.json` `"fitted"`, which names horizons.json for the fits.
Every run has its own colour, line style and marker, and earlier runs are drawn wider, so runs
whose curves coincide (a clip rate of 1.0 for all, say) all stay visible.

Each run is labelled by its optimizer (`optimizer.name` in its resolved `config.yaml`) followed by
the Hydra overrides that differ between the runs compared. Overrides common to all runs,
`optimizer=...` and those that do not change the result (`hydra.*`, `wandb.*`, `checkpoint.*`,
`data.dir`, `device`, logging intervals, ...: `engine.resume.is_result_neutral`) are dropped. Runs
whose labels differ only by a `seed=` override form one group, drawn as the mean with a min/max
band (`--no-group-seeds` turns this off).

A diverged run (a non-finite loss, or a final val loss above its first: `engine/instability.py`) is
never averaged into a mean, a verdict, the speed-up or the scaling view: it is listed in a
"diverged" table (and `speedup.json` `"diverged"`) and drawn apart, dotted, with an x where it
diverged. Training-loss spikes are named on stderr and in `speedup.json` `"spikes"`.

This script is the command line; the maths, the reading of runs and the figures are the
`analysis` package's.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

from analysis import horizons, plots, scaling, sensitivity, speedup, verdicts
from analysis.runs import CompareError, Diverged, Run, collect_runs, group_runs, split_diverged
from analysis.units import si_format
from engine.errors import HarnessError
from engine.instability import SPIKE_THRESHOLD, SPIKE_WINDOW, loss_spikes


def write_scaling(runs: Sequence[Run], out: Path, forced: bool) -> list[Path]:
    """The scaling view (scaling.png, scaling.json and the size-match tables on stdout) when the runs
    span at least two model sizes; with `forced` and fewer, a note says why there is none."""
    points, notes = scaling.scaling_points(runs)
    sizes = sorted({p.params for p in points})
    if len(sizes) < 2:
        if forced:
            for note in notes:
                print(f"note: scaling: left out {note}", file=sys.stderr)
            found = (f"only one model size ({si_format(sizes[0])} non-embedding parameters)" if sizes
                     else "no run with a model size and val/loss points")
            print(f"note: the scaling view needs runs of at least two model sizes; found {found}. "
                  f"Add runs of other sizes (e.g. model=gpt2-nano, or model.n_layer=...).", file=sys.stderr)
        return []
    for note in notes:
        print(f"note: scaling: left out {note}", file=sys.stderr)
    plots.save_figure(lambda: plots.scaling_figure(points), out / "scaling.png")
    report = scaling.scaling_report(points)
    for metric, rows in report["size_matches"].items():
        print(scaling.format_size_matches(rows, metric))
    (out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    return [out / "scaling.png", out / "scaling.json"]


def report_instability(groups: dict[str, list[Run]], diverged: Sequence[Diverged]) -> dict:
    """Print the diverged runs as a table and the loss spikes as notes; their speedup.json entries."""
    if diverged:
        w = max(len(d.label) for d in diverged)
        print("Diverged runs (left out of every mean, verdict and speed-up):")
        for d in diverged:
            print(f"  {d.label:<{w}}  diverged at step {d.divergence.step}: {d.divergence.reason}  ({d.run.path})")
    spikes = {}
    for label, members in groups.items():
        for run in members:
            found = loss_spikes(run.records)
            if found:
                spikes[str(run.path)] = [{"step": s.step, "loss": s.loss, "median": s.median} for s in found]
                print(f"note: {len(found)} train/loss spike(s) in {label} ({run.path}), above {1 + SPIKE_THRESHOLD:g}x "
                      f"the median of the previous {SPIKE_WINDOW} points: steps "
                      f"{', '.join(str(s.step) for s in found[:10])}{' ...' if len(found) > 10 else ''}",
                      file=sys.stderr)
    return {"diverged": [{"label": d.label, "path": str(d.run.path), "step": d.divergence.step,
                          "reason": d.divergence.reason} for d in diverged],
            "spikes": spikes}


def write_lr_sensitivity(runs: Sequence[Run], out: Path, metric: str) -> dict | None:
    """lr_sensitivity.png and the printed table when some optimizer's runs span two or more lrs;
    returns speedup.json's ``"lr_sensitivity"``, or None (silently) otherwise."""
    points = sensitivity.lr_points(runs, metric)
    if not points:
        return None
    plots.save_figure(lambda: plots.lr_sensitivity_figure(points), out / "lr_sensitivity.png")
    report = sensitivity.lr_report(points)
    print(sensitivity.format_lr_table(report["table"], metric))
    print(f"wrote {out / 'lr_sensitivity.png'}")
    return report


def write_horizons(runs: Sequence[Run], out: Path, metric: str) -> dict | None:
    """horizons.png, horizons.json and the printed fits and ratios when some line spans three or more
    horizons; returns speedup.json's ``"fitted"``, or None (silently) otherwise. `runs` may include
    diverged runs: they are left out of the fits and listed in horizons.json ``"left_out"``."""
    lines, left_out = horizons.horizon_lines(runs, metric)
    if not any(line.fit is not None for line in lines):
        return None
    for item in left_out:
        print(f"note: horizons: left out {item['path']}: {item['reason']}", file=sys.stderr)
    plots.save_figure(lambda: plots.horizons_figure(lines), out / "horizons.png")
    report = horizons.horizons_report(lines, left_out, metric)
    (out / "horizons.json").write_text(json.dumps(report, indent=2) + "\n")
    print(horizons.format_horizons(report, lines))
    for name in ("horizons.png", "horizons.json"):
        print(f"wrote {out / name}")
    return {"file": "horizons.json", "definition": report["definition"], "pairs": report["pairs"]}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status: 0, or 2 for a bad argument or when no run is readable."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run dirs, Hydra multirun dirs, W&B run dirs or metrics.jsonl files")
    p.add_argument("--out", default="compare_out", help="output directory (default: compare_out)")
    p.add_argument("--smooth", type=int, default=1,
                   help="moving-average window in points for the speed-up targets and the plotted curves")
    p.add_argument("--target-loss", type=float, default=None,
                   help="compare the cost to reach this loss instead of each B's final loss")
    p.add_argument("--metric", default="val/loss", help="metric for the speed-up table (default: val/loss)")
    p.add_argument("--no-group-seeds", dest="group_seeds", action="store_false",
                   help="draw every seed as its own line instead of mean and min/max band")
    p.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None,
                   help="write the scaling view (scaling.png, scaling.json); default: when the runs span "
                        "two or more model sizes")
    args = p.parse_args(argv)

    def warn(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    # Scoped, and "always": main() may run twice in one process, and a repeated skip must still show.
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = warn
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.smooth < 1:
            raise CompareError(f"--smooth must be >= 1, got {args.smooth}; use 1 for no smoothing.")
        runs = collect_runs(args.runs)
        if not runs:
            raise CompareError("no runs with metrics found in the paths given (each path skipped is named above, "
                               "with the reason); nothing to compare.")
        groups = group_runs(runs, args.group_seeds)
        # Diverged runs are data, not noise: never averaged in, always shown (engine/instability.py).
        healthy, diverged = split_diverged(groups)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path in plots.plot(healthy, out, args.smooth, diverged):
            print(f"wrote {path}")
        if args.scaling is not False:
            kept = [r for members in healthy.values() for r in members]
            for path in write_scaling(kept, out, forced=bool(args.scaling)):
                print(f"wrote {path}")
        instability = report_instability(groups, diverged)
        lr_report = write_lr_sensitivity(runs, out, args.metric)
        fitted = write_horizons(runs, out, args.metric)

        gone = [label for label, members in healthy.items() if not members]
        if gone:
            print(f"note: every run of {', '.join(gone)} diverged; left out of the speed-up table and the verdicts.",
                  file=sys.stderr)
        curves = [speedup.metric_curve(label, members, args.metric) for label, members in healthy.items() if members]
        missing = [c.label for c in curves if not c.loss]
        if missing:
            print(f"note: no {args.metric} points in {', '.join(missing)}; "
                  f"{'speed-up skipped' if len(missing) == len(curves) else 'left out of the speed-up table'} "
                  f"(is evaluation enabled, and did the run reach its first eval?)", file=sys.stderr)
        curves = [c for c in curves if c.loss]
        if len(curves) < 2:
            if not missing:
                print(f"note: speed-up needs at least two runs with {args.metric} points; skipped.", file=sys.stderr)
            if lr_report is None and fitted is None:
                return 0
        report = speedup.speedup_report(curves, healthy, args.metric, args.smooth, args.target_loss)
        if len(curves) >= 2:
            print(speedup.format_table(report["pairs"], args.smooth, args.metric, args.target_loss))
            seed_table = speedup.format_seed_ranges(report["pairs"])
            if seed_table:
                print(seed_table)
        compared = {c.label: healthy[c.label] for c in curves}
        report["verdicts"] = verdicts.verdicts(compared, args.metric)
        print(verdicts.format_verdicts(report["verdicts"], args.metric, compared))
        report.update(instability)
        if lr_report is not None:
            report["lr_sensitivity"] = lr_report
        if fitted is not None:
            report["fitted"] = fitted
        (out / "speedup.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'speedup.json'}")
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
