"""Runs as compare.py reads them: finding them on disk (run, sweep and W&B directories, or a
``metrics.jsonl``: the list is in scripts/compare.py's docstring), loading, labelling and grouping.

Files are read with :mod:`engine.run_dir`, whose rule for damaged metrics lines applies. A path
or sweep job that cannot be read is skipped with a warning naming it and the reason.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from engine.errors import HarnessError
from engine.instability import Divergence, divergence, loss_value
from engine.resume import is_result_neutral, override_key
from engine.run_dir import METRICS_FILE, read_config, read_metrics, read_overrides, read_yaml


class CompareError(HarnessError):
    """Bad input the user can fix; reported as one paragraph without a traceback."""


@dataclass
class Run:
    """A run's metrics plus what is needed to label it."""

    path: Path
    records: list[dict]
    optimizer: str
    overrides: list[str]
    config: dict | None = None  # the resolved config.yaml (None for a bare W&B history)

    def seed(self) -> str | None:
        """The value of the run's ``seed=`` override, if any."""
        return self.override("seed")

    def override(self, key: str) -> str | None:
        """The value of the run's ``key=`` override (``+key=`` too), if any."""
        for o in self.overrides:
            if override_key(o) == key:
                return o.split("=", 1)[1] if "=" in o else None
        return None

    def setting(self, dotted: str) -> float | None:
        """A numeric setting such as ``optimizer.lr``: from the resolved config.yaml, else from an
        override of that key (a W&B history has only the latter); None if neither is a number."""
        node = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            node = self.override(dotted)
        value = loss_value(node)  # a number, or a number written as text by YAML or an override
        return value if value is not None and math.isfinite(value) else None

    def final(self, metric: str) -> float | None:
        """The metric's last finite value in step order (None if it has none)."""
        values = series(self.records, "step", metric)[1]
        return values[-1] if values else None

    def divergence(self) -> Divergence | None:
        """Where and why the run diverged (engine.instability's rule), or None."""
        return divergence(self.records)


def _optimizer_name(config: dict | None, overrides: list[str]) -> str | None:
    """``optimizer.name`` of the config, else the value of an ``optimizer=`` override."""
    opt = config.get("optimizer") if isinstance(config, dict) else None
    if isinstance(opt, dict) and isinstance(opt.get("name"), str):
        return opt["name"]
    for o in overrides:
        value = o.partition("=")[2]
        if override_key(o) == "optimizer" and value:
            return value
    return None


def load_run(run_dir: Path) -> Run:
    """Load a run directory that holds `metrics.jsonl`.

    Raises HarnessError (CompareError, or engine.run_dir.RunDirError) if the file is unreadable or
    holds no metrics.
    """
    metrics = run_dir / METRICS_FILE
    records = read_metrics(metrics)
    if not records:
        raise CompareError(f"{metrics} holds no metrics. The run probably stopped before its first "
                           f"log line; rerun it or leave it out of the comparison.")
    overrides = read_overrides(run_dir) or []
    config = read_config(run_dir)
    return Run(run_dir, records, _optimizer_name(config, overrides) or run_dir.name, overrides, config)


def load_wandb_run(wandb_dir: Path) -> Run:
    """Load a W&B run directory from `files/wandb-history.jsonl`.

    Raises HarnessError if that file is missing, unreadable or holds no metrics.
    """
    history = wandb_dir / "files" / "wandb-history.jsonl"
    if not history.exists():
        raise CompareError(f"no files/wandb-history.jsonl in {wandb_dir} and no metrics.jsonl in the run "
                           f"directory above it (offline W&B runs keep history in a binary file; "
                           f"point compare.py at the run directory instead)")
    records = read_metrics(history)
    if not records:
        raise CompareError(f"{history} holds no metrics; leave {wandb_dir} out of the comparison.")
    # W&B stores each top-level config key as {"value": ...}.
    cfg = read_yaml(wandb_dir / "files" / "config.yaml")
    value = cfg.get("optimizer", {}) if isinstance(cfg, dict) else None
    value = value.get("value", value) if isinstance(value, dict) else None
    return Run(wandb_dir, records, _optimizer_name({"optimizer": value}, []) or wandb_dir.name, [])


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
        except HarnessError as e:
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


def make_labels(runs: Sequence[Run], group_seeds: bool = True) -> list[str]:
    """Label each run by optimizer plus the overrides that differ between runs.

    Overrides common to all runs, `optimizer=...` (the optimizer leads the label) and those that do
    not change the result (`engine.resume.is_result_neutral` with placement: `hydra.*`, `wandb.*`,
    `checkpoint.*`, `data.dir`, the device, ...) are dropped; with `group_seeds` the `seed=`
    override is dropped too, so seeds of one configuration share a label. Remaining duplicates get
    the run directory's name appended.
    """
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    labels = []
    for r in runs:
        parts = [r.optimizer]
        for o in r.overrides:
            key = override_key(o)
            if o in common or key == "optimizer" or is_result_neutral(o, placement=True) or (
                    group_seeds and key == "seed"):
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


def line_labels(runs: Sequence[Run], leave_out: Callable[[str], bool]) -> list[str]:
    """Each run's line in a view drawn along one axis (model size, horizon): its optimizer plus
    the overrides that differ between ``runs``, leaving out seeds, ``optimizer=``, those that do
    not change the result and those ``leave_out(override)`` names (the axis's own keys), so the
    seeds and the axis's points of one configuration share a line."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    return [" ".join([r.optimizer] + [o for o in r.overrides
                                      if o not in common and not is_result_neutral(o, placement=True)
                                      and not leave_out(o) and override_key(o) not in ("optimizer", "seed")])
            for r in runs]


def group_runs(runs: Sequence[Run], group_seeds: bool = True) -> dict[str, list[Run]]:
    """Runs by label (:func:`make_labels`), in order; a label shared by several runs (its seeds)
    reads ``label (N seeds)``."""
    by_label: dict[str, list[Run]] = {}
    for label, run in zip(make_labels(runs, group_seeds), runs):
        by_label.setdefault(label, []).append(run)
    return {(f"{label} ({len(members)} seeds)" if len(members) > 1 else label): members
            for label, members in by_label.items()}


def series(records: Sequence[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) pairs of the records that carry both keys, in step order, one point per step."""
    by_step: dict = {}
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            by_step[r.get("step", x)] = (float(x), float(y))
    pts = [by_step[s] for s in sorted(by_step)]
    return [p[0] for p in pts], [p[1] for p in pts]


@dataclass
class Diverged:
    """A diverged run of a group, left out of every mean, with where and why it diverged."""

    label: str
    run: Run
    divergence: Divergence


def split_diverged(groups: dict[str, list[Run]]) -> tuple[dict[str, list[Run]], list[Diverged]]:
    """Each group without its diverged runs (``engine.instability``'s rule), and those runs.

    A group all of whose runs diverged stays, empty, so that its label keeps its place (and style).
    """
    healthy: dict[str, list[Run]] = {}
    diverged: list[Diverged] = []
    for label, members in groups.items():
        healthy[label] = []
        for run in members:
            d = run.divergence()
            if d is None:
                healthy[label].append(run)
            else:
                diverged.append(Diverged(label, run, d))
    return healthy, diverged
