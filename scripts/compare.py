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
- `speedup.json` and a table on stdout (below);
- with `--scaling`, or by default when the runs span two or more model sizes, `scaling.png`,
  `scaling.json` and the size-match tables on stdout (see "Scaling view" below).
Every run has its own colour, line style and marker, and earlier runs are drawn wider, so runs
whose curves coincide (a clip rate of 1.0 for all, say) all stay visible.

Each run is labelled by its optimizer (`optimizer.name` in its resolved `config.yaml`) followed by
the Hydra overrides that differ between the runs compared. Overrides common to all runs,
`optimizer=...` and those that do not change the result (`hydra.*`, `wandb.*`, `checkpoint.*`,
`data.dir`, `device`, logging intervals, ...; see `NOISE_OVERRIDES`) are dropped. Runs whose
labels differ only by a `seed=` override form one group, drawn as the mean with a min/max band
(`--no-group-seeds` turns this off).

Speed-up at matched loss (exact definition)
-------------------------------------------
For each run (or seed group) take the points that carry the metric (`--metric`, default
`val/loss`), in step order. A seed group's curve is the pointwise mean of its members' curves,
aligned by evaluation index and truncated to the shortest member.

1. Smoothing: `s_i = mean(l_j for j in [max(0, i - N + 1), i])`, a trailing moving average over
   the last N evaluation points (`--smooth N`, default 1 = no smoothing).
2. Target: B's final smoothed loss `s_last(B)`, or `--target-loss X` for every pair.
3. Cost to reach a target on axis x (steps, tokens, flops, seconds), `steps_to_reach`: the first
   x at which the piecewise-linear interpolation of the points `(x_i, s_i)` reaches the target,
   i.e. `x_0` if `s_0 <= target`, else for the first i with `s_i <= target`
   `x_{i-1} + (target - s_{i-1}) * (x_i - x_{i-1}) / (s_i - s_{i-1})`; None if no point reaches it.
   Nothing is extrapolated beyond the first or the last point.
4. `ratio(A, B) = cost_A(target) / cost_B(target)` for every ordered pair A != B. B's own cost uses
   the same rule, so for a monotone curve it is B's last evaluation point. A twice as fast as B
   reads 0.5. If A (or, with `--target-loss`, B) never reaches the target the ratio is null and the
   table says "not reached"; a zero denominator or a missing axis also gives null, with a reason.

Scaling view (exact definition)
-------------------------------
- Size N: non-embedding parameters, every parameter but the token and position embeddings
  (12 n_layer n_embd^2 plus LayerNorms and biases), from the run's `config.yaml` model section
  (`non_embedding_params`; the model is built on the meta device).
- Lines: one per optimizer (plus any overrides that differ between runs other than seeds, model
  size overrides `model=`, `model.*=` and `experiment=`, and those that do not change the result).
  The runs of a line at one size are its seeds: drawn as the mean with a min/max band, recorded
  with mean, min, max and std.
- `scaling.png`, three panels: final val loss against N; final val loss against total training
  FLOPs (the `flops` metric: Hessian passes included); val loss at a matched budget against N,
  where a size's budget is the smallest total FLOPs of any run of that size and each run's val loss
  there is interpolated linearly between its evaluations.
- Size matches, for each ordered pair of lines (A, B) and each size N of A, for both the final and
  the matched-budget loss: the size at which B's mean loss, interpolated linearly in log N, equals
  A's loss at N (first crossing), and its ratio to N. "A at 10M matches B at 20M (2.00x)" means B
  needs twice the parameters for A's loss. None when B is already at or below it at its smallest
  size or never reaches it: nothing is extrapolated.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from engine.resume import override_key

# Cost axes: name in the table -> key in metrics.jsonl.
AXES: dict[str, str] = {"steps": "step", "tokens": "tokens", "flops": "flops", "seconds": "time/elapsed"}


class CompareError(Exception):
    """Bad input the user can fix; reported as one paragraph without a traceback."""


# --------------------------------------------------------------------------- the maths (pure)


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
    """Cost ratios at matched loss for every ordered pair (A, B), A != B (see the module docstring).

    Returns one dict per pair: `{"a", "b", "target", "axes": {axis: {"a", "b", "ratio", "note"}}}`
    where `a`/`b` are the costs (None if not reached), `ratio = a / b` or None, and `note` is None
    or a short reason ("not reached by A", "not reached by B", "axis missing", "B's cost is 0").
    Curves without points are skipped.
    """
    smoothed = {c.label: smooth(c.loss, smooth_n) for c in curves if c.loss}
    rows = []
    for a in curves:
        for b in curves:
            if a is b or a.label not in smoothed or b.label not in smoothed:
                continue
            target = smoothed[b.label][-1] if target_loss is None else float(target_loss)
            axes = {}
            for axis in AXES:
                xa, xb = a.x.get(axis), b.x.get(axis)
                if xa is None or xb is None:
                    axes[axis] = {"a": None, "b": None, "ratio": None, "note": "axis missing"}
                    continue
                ca = steps_to_reach(xa, smoothed[a.label], target)
                cb = steps_to_reach(xb, smoothed[b.label], target)
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
            rows.append({"a": a.label, "b": b.label, "target": target, "axes": axes})
    return rows


def format_table(rows: Sequence[dict], smooth_n: int, metric: str, target_loss: float | None) -> str:
    """Human-readable speed-up table (ratios < 1 mean A is cheaper than B)."""
    target_desc = f"{target_loss:g}" if target_loss is not None else f"B's final smoothed {metric}"
    lines = [
        f"Speed-up at matched {metric}: cost for A to reach {target_desc} / B's own cost "
        f"(moving average over {smooth_n} eval point(s); < 1 means A is faster).",
    ]
    if not rows:
        return lines[0] + "\n(fewer than two runs with points: nothing to compare)"
    wa = max(len("A"), *(len(r["a"]) for r in rows))
    wb = max(len("B"), *(len(r["b"]) for r in rows))
    header = f"{'A':<{wa}}  {'B':<{wb}}  {'target':>8}" + "".join(f"  {ax:>16}" for ax in AXES)
    lines += [header, "-" * len(header)]
    for r in rows:
        cells = []
        for ax in AXES:
            cell = r["axes"][ax]
            cells.append(f"{cell['ratio']:.3f}" if cell["ratio"] is not None else cell["note"])
        lines.append(f"{r['a']:<{wa}}  {r['b']:<{wb}}  {r['target']:>8.4f}" + "".join(f"  {c:>16}" for c in cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """A run's metrics plus what is needed to label it."""

    path: Path
    records: list[dict]
    optimizer: str
    overrides: list[str]
    config: dict | None = None  # the resolved config.yaml (None for a bare W&B history)

    def seed(self) -> str | None:
        for o in self.overrides:
            if o.split("=", 1)[0].lstrip("+~") == "seed":
                return o.split("=", 1)[1] if "=" in o else None
        return None


def read_jsonl(path: Path) -> list[dict]:
    """Read a metrics file. A torn last line (a run killed mid-write) is skipped with a warning.

    Raises CompareError when the file cannot be read or a line before the last is not JSON.
    """
    try:
        # errors="replace": binary garbage then fails as bad JSON, with the line it is on
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise CompareError(f"{path} cannot be read ({e.strerror or e}); check that it is a file you "
                           f"may read.") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: ignoring a half-written last line ({e.msg})")
                continue
            raise CompareError(f"{path} line {i + 1} is not valid JSON ({e.msg}). The file is damaged; "
                               f"fix or delete that line and run again.") from None
        if isinstance(obj, dict):
            records.append(obj)
    return records


def _with_numeric_step(records: list[dict], source: Path) -> list[dict]:
    # Sorting and de-duplicating by step needs a number there; a record without one is garbage.
    kept = [r for r in records if isinstance(r.get("step"), (int, float)) and not isinstance(r.get("step"), bool)
            and math.isfinite(r["step"])]
    if records and len(kept) < len(records):
        warnings.warn(f"{source}: ignoring {len(records) - len(kept)} of {len(records)} records without a "
                      f"numeric 'step'")
    return kept


def _load_yaml(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _run_config(run_dir: Path) -> dict | None:
    """The run's resolved config.yaml, else Hydra's composed .hydra/config.yaml, else None."""
    for cfg_path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        cfg = _load_yaml(cfg_path) if cfg_path.exists() else None
        if isinstance(cfg, dict):
            return cfg
    return None


def _optimizer_name(run_dir: Path, overrides: list[str]) -> str | None:
    for cfg_path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        cfg = _load_yaml(cfg_path) if cfg_path.exists() else None
        opt = cfg.get("optimizer") if isinstance(cfg, dict) else None
        if isinstance(opt, dict) and isinstance(opt.get("name"), str):
            return opt["name"]
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "optimizer" and value:
            return value
    return None


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    data = _load_yaml(path) if path.exists() else None
    return [str(o) for o in data] if isinstance(data, list) else []


def load_run(run_dir: Path) -> Run:
    """Load a run directory that holds `metrics.jsonl`.

    Raises CompareError if the file is unreadable, damaged or holds no metrics.
    """
    metrics = run_dir / "metrics.jsonl"
    records = _with_numeric_step(read_jsonl(metrics), metrics)
    if not records:
        raise CompareError(f"{metrics} holds no metrics. The run probably stopped before its first "
                           f"log line; rerun it or leave it out of the comparison.")
    overrides = _overrides(run_dir)
    return Run(run_dir, records, _optimizer_name(run_dir, overrides) or run_dir.name, overrides,
               _run_config(run_dir))


def load_wandb_run(wandb_dir: Path) -> Run:
    """Load a W&B run directory from `files/wandb-history.jsonl`.

    Raises CompareError if that file is missing, unreadable or holds no metrics.
    """
    history = wandb_dir / "files" / "wandb-history.jsonl"
    if not history.exists():
        raise CompareError(f"no files/wandb-history.jsonl in {wandb_dir} and no metrics.jsonl in the run "
                           f"directory above it (offline W&B runs keep history in a binary file; "
                           f"point compare.py at the run directory instead)")
    records = []
    for r in read_jsonl(history):
        if "step" not in r and "_step" in r:
            r = {**r, "step": r["_step"]}
        records.append(r)
    records = _with_numeric_step(records, history)
    if not records:
        raise CompareError(f"{history} holds no metrics; leave {wandb_dir} out of the comparison.")
    opt = None
    cfg = _load_yaml(wandb_dir / "files" / "config.yaml") if (wandb_dir / "files" / "config.yaml").exists() else None
    if isinstance(cfg, dict):
        # W&B stores each top-level config key as {"value": ...}.
        value = cfg.get("optimizer", {})
        value = value.get("value", value) if isinstance(value, dict) else None
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            opt = value["name"]
    return Run(wandb_dir, records, opt or wandb_dir.name, [])


def _is_wandb_run(path: Path) -> bool:
    path = path.resolve()  # wandb/latest-run is a symlink to the newest run
    return path.parent.name == "wandb" and re.match(r"(offline-)?run-", path.name) is not None


def _no_metrics_reason(path: Path) -> str:
    """Why `path`, a directory without metrics.jsonl, is not a run compare.py can read."""
    if (path / ".hydra").is_dir():
        log = path / "train.log"
        log_note = ("its train.log is empty" if log.is_file() and log.stat().st_size == 0
                    else "its train.log may say why" if log.is_file() else "it has no train.log")
        return (f"no metrics.jsonl: a Hydra run directory whose run stopped before its first log line "
                f"({log_note})")
    return ("no metrics.jsonl, and it is not a Hydra multirun directory (no numbered sub-directories) or a "
            "W&B run directory. Point compare.py at the directory train.py printed as its run directory")


def collect_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Expand the command-line paths into runs (see the module docstring for what is accepted).

    A path or sweep job that cannot be read (missing, no metrics, damaged metrics) is skipped with a
    warning `skipping PATH: reason`; the caller decides what to do if no run is left.
    """
    runs: list[Run] = []
    seen: set[Path] = set()

    def add(run_dir: Path, load=load_run, what: str = "") -> None:
        key = run_dir.resolve()
        if key in seen:
            return
        seen.add(key)
        try:
            runs.append(load(run_dir))
        except CompareError as e:
            warnings.warn(f"skipping {what}{run_dir}: {e}")

    def skip(path: Path, reason: str) -> None:
        warnings.warn(f"skipping {path}: {reason}")

    for raw in paths:
        path = Path(raw)
        if not path.exists():
            skip(path, "it does not exist. Pass run directories (holding metrics.jsonl), Hydra multirun "
                       "directories or W&B run directories.")
        elif path.is_file():
            if path.name == "metrics.jsonl":
                add(path.parent)
            else:
                skip(path, "a file, not a run directory. Pass the directory that holds metrics.jsonl (or "
                           "that metrics.jsonl itself).")
        elif (path / "metrics.jsonl").exists():
            add(path)
        elif path.name == "wandb" and (path.parent / "metrics.jsonl").exists():
            add(path.parent)
        elif _is_wandb_run(path):
            path = path.resolve()
            parent = path.parent.parent
            if (parent / "metrics.jsonl").exists():
                add(parent)
            else:
                add(path, load_wandb_run, "W&B run ")
        else:
            subdirs = sorted((d for d in path.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
            if not subdirs:
                skip(path, _no_metrics_reason(path))
            for sub in subdirs:
                if (sub / "metrics.jsonl").exists():
                    add(sub)
                else:
                    skip(sub, _no_metrics_reason(sub))
    return runs


# --------------------------------------------------------------------------- labels and groups


# Overrides that say where or how a run was stored, logged or resumed, not what it trained: left
# out of labels so that runs differing only in them read as the same configuration.
NOISE_OVERRIDE_PREFIXES: tuple[str, ...] = ("hydra.", "wandb.", "checkpoint.")
NOISE_OVERRIDES: frozenset[str] = frozenset({
    "hydra", "wandb", "checkpoint", "hparams_search", "device", "data.dir", "data.prepare_if_missing",
    "train.log_interval", "train.peak_flops", "train.prefetch", "train.stop_at_step",
})


def is_noise_override(override: str) -> bool:
    """Whether `override` (`key=value`) leaves the training result unchanged (paths, logging, W&B,
    checkpointing, the device), so that a run label need not show it."""
    key = override_key(override)
    return key in NOISE_OVERRIDES or key.startswith(NOISE_OVERRIDE_PREFIXES)


def make_labels(runs: Sequence[Run], group_seeds: bool = True) -> list[str]:
    """Label each run by optimizer plus the overrides that differ between runs.

    Overrides common to all runs, `optimizer=...` (the optimizer leads the label) and those that do
    not change the result (`is_noise_override`: `hydra.*`, `wandb.*`, `checkpoint.*`, data paths,
    the device, ...) are dropped; with `group_seeds` the `seed=` override is dropped too, so seeds of
    one configuration share a label. Remaining duplicates get the run directory's name appended.
    """
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    labels = []
    for r in runs:
        parts = [r.optimizer]
        for o in r.overrides:
            key = override_key(o)
            if o in common or key == "optimizer" or is_noise_override(o) or (group_seeds and key == "seed"):
                continue
            parts.append(o)
        labels.append(" ".join(parts))
    # Same label without a seed to tell them apart: not a seed group, so disambiguate by directory.
    for label in set(labels):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        if len(idx) > 1 and not (group_seeds and all(runs[i].seed() is not None for i in idx)
                                 and len({runs[i].seed() for i in idx}) == len(idx)):
            for i in idx:
                labels[i] = f"{label} [{runs[i].path.name}]"
    return labels


def series(records: Sequence[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) pairs of the records that carry both keys, in step order, one point per step."""
    by_step: dict = {}
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            by_step[r.get("step", x)] = (float(x), float(y))
    pts = [by_step[s] for s in sorted(by_step)]
    return [p[0] for p in pts], [p[1] for p in pts]


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


# --------------------------------------------------------------------------- plotting


_SI_PREFIXES = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si_format(x: float, pos: int | None = None) -> str:
    """Tick label with an SI prefix and at most three significant digits: 120000 -> "120k",
    1.2e6 -> "1.2M", 7.2e10 -> "72G", 0.5 -> "0.5". (`pos` makes it a matplotlib FuncFormatter.)"""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    x = float(f"{x:.3g}")  # round first, so 999999 becomes "1M", not "1e+03k"
    for scale, prefix in _SI_PREFIXES:
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}"
    return f"{x:.3g}"


@dataclass(frozen=True)
class Style:
    """How one run (or seed group) is drawn: the same in every panel and in the legend."""

    color: tuple
    linestyle: str | tuple
    marker: str
    linewidth: float
    markersize: float
    index: int  # drawing order; staggers the markers of runs whose points coincide


_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_MARKERS_PER_LINE = 10


def plot_styles(labels: Sequence[str]) -> dict[str, Style]:
    """A distinct colour, line style and marker per label. Earlier labels are drawn first and wider,
    so where curves coincide each one still shows as a rim or in the gaps of the dashes above it."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    n = len(labels)
    styles = {}
    for i, label in enumerate(labels):
        width = 1.3 + 2.2 * (n - 1 - i) / (n - 1) if n > 1 else 1.6
        styles[label] = Style(cmap(i % 10), _LINESTYLES[i % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)],
                              width, 3.0 + 1.2 * width, i)
    return styles


def _band(member_series: list[tuple[list[float], list[float]]]):
    """Mean x, mean/min/max y of several series aligned by index (truncated to the shortest)."""
    n = min(len(xs) for xs, _ in member_series)
    xs = [sum(s[0][i] for s in member_series) / len(member_series) for i in range(n)]
    ys = [[s[1][i] for s in member_series] for i in range(n)]
    return xs, [sum(v) / len(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def _draw(ax, groups: dict[str, list[Run]], styles: dict[str, Style], x_key: str, y_key: str,
          smooth_n: int) -> bool:
    drawn = False
    for label, members in groups.items():
        member_series = [series(r.records, x_key, y_key) for r in members]
        member_series = [s for s in member_series if s[0]]
        if not member_series:
            continue
        xs, mean, lo, hi = _band(member_series)
        if not xs:
            continue
        st = styles[label]
        # At most ~10 markers per line, each run's shifted by a fraction of the spacing, so runs with
        # identical points do not stack their markers on the same spots.
        every = max(1, len(xs) // _MARKERS_PER_LINE)
        offset = (st.index * max(1, every // max(1, len(styles)))) % every
        ax.plot(xs, smooth(mean, smooth_n), color=st.color, linestyle=st.linestyle, linewidth=st.linewidth,
                marker=st.marker, markersize=st.markersize, markevery=(offset, every), markerfacecolor="none",
                markeredgewidth=1.2, label=label, zorder=2 + st.index * 0.01)
        if len(member_series) > 1:
            ax.fill_between(xs, smooth(lo, smooth_n), smooth(hi, smooth_n), color=st.color, alpha=0.15,
                            linewidth=0)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, f"no {y_key} points", ha="center", va="center", transform=ax.transAxes, color="gray")
    return drawn


def _loss_ylim(ax, groups: dict[str, list[Run]], x_key: str, y_key: str) -> None:
    # The first steps' loss (ln(vocab) ~ 11) would flatten everything that matters: clip the view.
    ys = [series(r.records, x_key, y_key)[1] for ms in groups.values() for r in ms]
    ys = [y for y in ys if y]
    if not ys:
        return
    lo = min(min(y) for y in ys)
    hi = max(y[len(y) // 10] for y in ys)
    if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))


def _si_axis(axis) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    # Few ticks with short SI labels: a 4-panel row leaves each axis ~4 inches.
    axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(si_format))


def _add_legend(fig, styles: dict[str, Style]) -> None:
    """One legend above the panels with an entry for every run (also those with no points in this
    figure), as many columns as fit; the figure grows so that neither panels nor legend are cut."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=st.color, linestyle=st.linestyle, linewidth=st.linewidth, marker=st.marker,
                      markersize=st.markersize, markerfacecolor="none", markeredgewidth=1.2)
               for st in styles.values()]
    labels = list(styles)
    fig_w, fig_h = fig.get_size_inches()
    if not labels:
        fig.tight_layout()
        return
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(4, len(labels)), 0, -1):
        legend = fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=ncol, fontsize=9,
                            handlelength=4.0, frameon=False)
        box = legend.get_window_extent(renderer)
        if box.width <= 0.98 * fig_w * fig.dpi or ncol == 1:
            break
        legend.remove()
    legend_w, legend_h = box.width / fig.dpi, box.height / fig.dpi
    # Widen for a label longer than the figure; heighten by the legend so the panels keep their size.
    fig.set_size_inches(max(fig_w, legend_w + 0.4), fig_h + legend_h + 0.1)
    fig.tight_layout(rect=(0, 0, 1, 1 - (legend_h + 0.1) / (fig_h + legend_h + 0.1)))


_X_LABELS = {"step": "optimizer steps", "tokens": "training tokens (incl. Hessian passes)",
             "flops": "FLOPs (model, incl. Hessian passes)", "time/elapsed": "wall-clock (s, excl. eval)"}
_X_TITLES = {"step": "steps", "tokens": "tokens", "flops": "FLOPs", "time/elapsed": "wall-clock time"}
_LOSS_LABELS = {"train/loss": ("training loss", "training loss (nats/token)"),
                "val/loss": ("validation loss", "validation loss (nats/token)")}


def loss_figure(groups: dict[str, list[Run]], smooth_n: int, styles: dict[str, Style] | None = None):
    """The 2x4 loss figure: train (top) and validation loss (bottom) against steps, tokens, FLOPs, seconds."""
    import matplotlib.pyplot as plt

    styles = styles or plot_styles(list(groups))
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), squeeze=False)
    for row, y_key in enumerate(("train/loss", "val/loss")):
        name, y_label = _LOSS_LABELS[y_key]
        for col, x_key in enumerate(AXES.values()):
            ax = axes[row][col]
            if _draw(ax, groups, styles, x_key, y_key, smooth_n):
                _loss_ylim(ax, groups, x_key, y_key)
            ax.set_title(f"{name} vs {_X_TITLES[x_key]}", fontsize=11)
            ax.set_xlabel(_X_LABELS[x_key])
            ax.set_ylabel(y_label)
            _si_axis(ax.xaxis)
            ax.grid(alpha=0.3)
    _add_legend(fig, styles)
    return fig


# (metrics.jsonl key, panel title, y-axis label); all four are plotted against optimizer steps.
DIAGNOSTIC_PANELS: list[tuple[str, str, str]] = [
    ("lr", "learning rate", "learning rate (log scale)"),
    ("grad/clip_rate", "grad-norm clip trigger rate (cumulative)", "fraction of steps clipped"),
    ("sophia/clip_frac", "Sophia clip fraction", "fraction of coordinates clipped"),
    ("sophia/win_rate", "Sophia win rate (1 - clip fraction)", "fraction of coordinates not clipped"),
]


def diagnostics_figure(groups: dict[str, list[Run]], styles: dict[str, Style] | None = None):
    """The 2x2 diagnostics figure: lr, grad-clip trigger rate, Sophia clip fraction and win rate."""
    import matplotlib.pyplot as plt

    styles = styles or plot_styles(list(groups))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), squeeze=False)
    for ax, (key, title, y_label) in zip((a for row in axes for a in row), DIAGNOSTIC_PANELS):
        drawn = _draw(ax, groups, styles, "step", key, 1)
        if key == "lr":
            if drawn:  # Muon's and Lion's lrs differ by ~100x: log scale shows both
                ax.set_yscale("log")
        else:
            # Fractions: a fixed 0..1 range keeps a constant curve (all 1.0, say) off the frame's edge.
            ax.set_ylim(-0.04, 1.04)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(y_label if key != "lr" or drawn else "learning rate")
        _si_axis(ax.xaxis)
        ax.grid(alpha=0.3)
    _add_legend(fig, styles)
    return fig


# (metrics.jsonl key, panel title); both plotted against training tokens.
DOWNSTREAM_PANELS: list[tuple[str, str]] = [
    ("eval/hellaswag_acc", "HellaSwag accuracy (summed log-likelihood, acc)"),
    ("eval/hellaswag_acc_norm", "HellaSwag accuracy (per-token log-likelihood, acc_norm)"),
]


def has_downstream(groups: dict[str, list[Run]]) -> bool:
    """Did any run log a downstream accuracy?"""
    return any(key in rec for runs in groups.values() for r in runs for rec in r.records
               for key, _ in DOWNSTREAM_PANELS)


def downstream_figure(groups: dict[str, list[Run]], styles: dict[str, Style] | None = None):
    """The 1x2 downstream figure: HellaSwag acc and acc_norm against training tokens."""
    import matplotlib.pyplot as plt

    styles = styles or plot_styles(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], DOWNSTREAM_PANELS):
        _draw(ax, groups, styles, "tokens", key, 1)
        ax.set_ylim(-0.02, 1.02)  # accuracies: chance is 0.25 with 4 endings
        ax.axhline(0.25, color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("training tokens (incl. Hessian passes)")
        ax.set_ylabel("accuracy (chance 0.25)")
        _si_axis(ax.xaxis)
        ax.grid(alpha=0.3)
    _add_legend(fig, styles)
    return fig


def plot(groups: dict[str, list[Run]], out: Path, smooth_n: int) -> list[Path]:
    """Write `loss.png` (2x4) and `diagnostics.png` (2x2) into `out`, and `downstream.png` when
    some run has downstream accuracies; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = plot_styles(list(groups))
    paths = []
    figures = [("loss.png", loss_figure(groups, smooth_n, styles)),
               ("diagnostics.png", diagnostics_figure(groups, styles))]
    if has_downstream(groups):
        figures.append(("downstream.png", downstream_figure(groups, styles)))
    for name, fig in figures:
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


# --------------------------------------------------------------------------- scaling view


# Overrides that choose the model's size (or an experiment preset, which fixes the size together
# with the optimizer): left out of a scaling line's label, so one optimizer's runs at all sizes
# form one line.
SIZE_OVERRIDE_KEYS: frozenset[str] = frozenset({"model", "experiment"})


def is_size_override(override: str) -> bool:
    """Whether `override` sets the model (`model=...`, `model.*=...`) or an experiment preset."""
    key = override_key(override)
    return key in SIZE_OVERRIDE_KEYS or key.startswith("model.")


@functools.cache
def _non_embedding_params(model_items: tuple) -> int:
    import torch

    from model import GPT, GPTConfig

    settings = dict(model_items)
    preset = settings.pop("preset", None)
    # Keys of the model section that are not GPTConfig fields (init_from: the starting weights)
    # do not change the shape.
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    fields = {k: v for k, v in settings.items() if v is not None and k in known}
    cfg = GPTConfig.from_preset(preset, **fields) if preset else GPTConfig(**fields)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = GPT(cfg)
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def non_embedding_params(model_cfg: dict | None) -> int | None:
    """Non-embedding parameters of a run's `model` config section (preset plus non-null fields).

    Every parameter except the token embedding (tied with the output head) and the position
    embedding: the transformer blocks and the final LayerNorm, i.e. 12 n_layer n_embd^2 plus the
    LayerNorm weights (2 n_layer + 1) n_embd, plus biases when `bias` is true. This is the N of
    scaling-law fits (Kaplan et al. 2020); `GPT.num_params(non_embedding=True)` keeps the tied
    token embedding and so differs by vocab x n_embd. The model is built on the meta device, so
    the count follows model/gpt.py exactly. None when the section is missing or invalid.
    """
    if not isinstance(model_cfg, dict):
        return None
    fields = {k: v for k, v in model_cfg.items() if k != "vocab_size"}  # embeddings only
    try:
        return _non_embedding_params(tuple(sorted(fields.items())))
    except (TypeError, ValueError):
        return None


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
        n = non_embedding_params((run.config or {}).get("model"))
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
    common = set.intersection(*(set(r.overrides) for r, *_ in usable)) if usable else set()
    points: dict[tuple[str, int], ScalingPoint] = {}
    curves = {}
    for run, n, xs, ys in usable:
        parts = [run.optimizer] + [o for o in run.overrides if o not in common and not is_noise_override(o)
                                   and not is_size_override(o) and override_key(o) not in ("optimizer", "seed")]
        line = " ".join(parts)
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


def scaling_figure(points: Sequence[ScalingPoint]):
    """1x3: final val loss against non-embedding params and against total FLOPs, and val loss at the
    matched FLOPs budget against params; one line per optimizer, a min/max band over seeds."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    lines = sorted({p.line for p in points})
    styles = plot_styles(lines)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2), squeeze=False)
    panels = [("params", "final", "final validation loss vs model size", "non-embedding parameters"),
              ("flops", "final", "final validation loss vs training FLOPs",
               "total training FLOPs (incl. Hessian passes)"),
              ("params", "matched_budget", "validation loss at matched FLOPs vs model size",
               "non-embedding parameters")]
    for ax, (x_key, metric, title, x_label) in zip(axes[0], panels):
        for line in lines:
            pts = [p for p in points if p.line == line and (p.final if metric == "final" else p.at_budget)]
            if not pts:
                continue
            st = styles[line]
            stats = [ScalingPoint.stats(p.final if metric == "final" else p.at_budget) for p in pts]
            xs = [p.params if x_key == "params" else ScalingPoint.stats(p.flops)["mean"] for p in pts]
            ax.plot(xs, [s["mean"] for s in stats], color=st.color, linestyle=st.linestyle, marker=st.marker,
                    linewidth=st.linewidth, markersize=st.markersize, markerfacecolor="none", markeredgewidth=1.2,
                    label=line)
            if any(s["n"] > 1 for s in stats):
                ax.fill_between(xs, [s["min"] for s in stats], [s["max"] for s in stats], color=st.color,
                                alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        # 1-2-5 ticks: tiny-model sweeps often span less than a decade, where 10^k ticks leave
        # one label or none
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(si_format))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, pos: ""))
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3, which="both")
    _add_legend(fig, styles)
    return fig


def write_scaling(runs: Sequence[Run], out: Path, forced: bool) -> list[Path]:
    """The scaling view (scaling.png, scaling.json and the size-match tables on stdout) when the runs
    span at least two model sizes; with `forced` and fewer, a note says why there is none."""
    points, notes = scaling_points(runs)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = scaling_figure(points)
    fig.savefig(out / "scaling.png", dpi=100)
    plt.close(fig)
    report = scaling_report(points)
    for metric, rows in report["size_matches"].items():
        print(format_size_matches(rows, metric))
    (out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    return [out / "scaling.png", out / "scaling.json"]


# --------------------------------------------------------------------------- CLI


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
        labels = make_labels(runs, args.group_seeds)
        by_label: dict[str, list[Run]] = {}
        for label, run in zip(labels, runs):
            by_label.setdefault(label, []).append(run)
        groups = {(f"{label} ({len(members)} seeds)" if len(members) > 1 else label): members
                  for label, members in by_label.items()}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path in plot(groups, out, args.smooth):
            print(f"wrote {path}")
        if args.scaling is not False:
            for path in write_scaling(runs, out, forced=bool(args.scaling)):
                print(f"wrote {path}")

        curves = [metric_curve(label, members, args.metric) for label, members in groups.items()]
        missing = [c.label for c in curves if not c.loss]
        if missing:
            print(f"note: no {args.metric} points in {', '.join(missing)}; "
                  f"{'speed-up skipped' if len(missing) == len(curves) else 'left out of the speed-up table'} "
                  f"(is evaluation enabled, and did the run reach its first eval?)", file=sys.stderr)
        curves = [c for c in curves if c.loss]
        if len(curves) < 2:
            if not missing:
                print(f"note: speed-up needs at least two runs with {args.metric} points; skipped.", file=sys.stderr)
            return 0
        rows = speedup_table(curves, args.smooth, args.target_loss)
        print(format_table(rows, args.smooth, args.metric, args.target_loss))
        report = {
            "definition": ("ratio = cost for A to reach the target / cost for B to reach it, first crossing of "
                           "the linearly interpolated smoothed curve; target = B's final smoothed loss unless "
                           "target_loss is set; null when not reached"),
            "metric": args.metric,
            "smooth": args.smooth,
            "target_loss": args.target_loss,
            "runs": {c.label: {"paths": [str(r.path) for r in groups[c.label]], "points": len(c.loss),
                               "final": c.loss[-1], "final_smoothed": smooth(c.loss, args.smooth)[-1]}
                     for c in curves},
            "pairs": rows,
        }
        (out / "speedup.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'speedup.json'}")
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
