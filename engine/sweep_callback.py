"""One table of a multirun's jobs, printed when the sweep ends and kept in the sweep dir.

Registered in ``configs/config.yaml`` under ``hydra.callbacks``. Without it a sweep's results are
scattered over one ``summary.json`` per numbered job dir; the table is
``<sweep dir>/summary.md``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from data.files import write_text_atomic
from engine import run_dir
from engine.metrics import ConsoleSink
from engine.resume import is_result_neutral
from engine.summary import summarize_run

TABLE_FILE = "summary.md"
COLUMNS = ("job", "overrides", "final val", "best val", "steps", "wall-clock", "status")


def _shown(override: str) -> bool:
    """Overrides worth a column: not result-neutral ones (Hydra's, W&B's, checkpointing, where
    the job ran), and not paths (long, and unique per job only by accident)."""
    if is_result_neutral(override, placement=True):
        return False
    value = override.partition("=")[2]
    return not ("/" in value or "\\" in value or value.startswith("~"))


def read_overrides(job_dir: Path) -> list[str] | None:
    """The job's shown overrides from ``.hydra/overrides.yaml``; None when it cannot be read."""
    overrides = run_dir.read_overrides(job_dir)
    return None if overrides is None else [o for o in overrides if _shown(o)]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The numbered job dirs of a sweep, in job order."""
    try:
        found = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and d.name.isdigit()]
    except OSError:
        return []
    return sorted(found, key=lambda d: int(d.name))


def _loss(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def job_row(job_dir: Path, overrides: str, failed: bool = False,
            finished: bool = True) -> list[str]:
    """One table row; never raises. ``failed``: Hydra reported the job's task as failed;
    ``finished``: the sweep is over, so a job short of its last step did not make it."""
    try:
        s = summarize_run(job_dir)
    except Exception as err:  # an unreadable dir costs its row, never the sweep
        return [job_dir.name, overrides, "-", "-", "-", "-", f"unreadable ({type(err).__name__})"]
    status = s["status"]
    if failed or (status == "incomplete" and finished):
        status = "failed"
    steps = "-" if s["step"] is None else str(s["step"])
    if s["max_steps"]:
        steps += f"/{s['max_steps']}"
    wall = "-" if s["elapsed_s"] is None else ConsoleSink.format_duration(s["elapsed_s"])
    return [job_dir.name, overrides, _loss(s["val_loss"]), _loss(s["best_val_loss"]), steps, wall,
            status]


def split_overrides(per_job: list[list[str] | None]) -> tuple[list[str], list[str]]:
    """The overrides every readable job shares, and each job's own ones as a cell ("?": unknown).

    Only the differences go in the rows: the shared part (model, data, schedule ...) would make
    every row the same screen-wide string."""
    known = [o for o in per_job if o is not None]
    common = [o for o in known[0] if all(o in other for other in known)] if len(known) > 1 else []
    cells = ["?" if o is None else " ".join(x for x in o if x not in common) for o in per_job]
    return common, cells


def markdown_table(rows: list[list[str]]) -> str:
    """A markdown table padded to aligned columns, so it reads the same in a terminal."""
    cells = [list(COLUMNS)] + [[c.replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


class RunTable(Callback):
    """Hydra callback: a table of the sweep's runs (overrides, losses, steps, wall-clock, status).

    The table is refreshed after every job that runs in this process, so a sweep that dies part
    way still leaves one for the jobs done, and printed once at the end of the sweep.
    """

    def __init__(self, filename: str = TABLE_FILE, print_fn: Callable[..., None] = print) -> None:
        self.filename = filename
        self.print = print_fn
        self._failed: set[str] = set()  # job dir names Hydra reported as failed
        self._job_parents: list[Path] = []

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        """Remember a failed job and refresh the table file (quietly: the job's output is busy)."""
        try:
            job_dir = Path(str(OmegaConf.select(config, "hydra.runtime.output_dir")))
            if str(getattr(job_return, "status", "")).endswith("FAILED"):
                self._failed.add(job_dir.name)
            if config.hydra.mode is not None and str(config.hydra.mode).endswith("MULTIRUN"):
                self._job_parents.append(job_dir.parent)
                self.write_table(job_dir.parent, finished=False)
        except Exception:  # the table is a convenience; the job's result is what matters
            pass

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print the sweep's table and write it to ``<sweep dir>/summary.md``."""
        try:
            sweep_dir = self._sweep_dir(config)
            table = self.write_table(sweep_dir, finished=True)
            if table is None:
                self.print(f"run table: no job dirs in {sweep_dir}", flush=True)
                return
            self.print(f"\nsweep {sweep_dir} ({self.filename}):\n{table}", flush=True)
        except Exception as err:
            print(f"run table: could not summarise the sweep ({type(err).__name__}: {err})",
                  file=sys.stderr, flush=True)

    def _sweep_dir(self, config: DictConfig) -> Path:
        # The dir the jobs really used, when they ran here; re-resolving hydra.sweep.dir is the
        # fallback for remote launchers (it names the same dir as long as its resolvers are cached).
        if self._job_parents:
            return self._job_parents[-1]
        return Path(str(config.hydra.sweep.dir))

    def write_table(self, sweep_dir: Path, finished: bool = True) -> str | None:
        """Build the table of ``sweep_dir``'s jobs and write it; None when there are no jobs."""
        jobs = job_dirs(sweep_dir)
        if not jobs:
            return None
        common, cells = split_overrides([read_overrides(d) for d in jobs])
        table = markdown_table([job_row(d, cell, failed=d.name in self._failed, finished=finished)
                                for d, cell in zip(jobs, cells)])
        if common:
            table = f"All jobs: `{' '.join(common)}`\n\n{table}"
        try:
            # atomic: jobs of a parallel launcher may refresh the table at once
            write_text_atomic(Path(sweep_dir) / self.filename, table)
        except OSError as err:
            print(f"run table: could not write {Path(sweep_dir) / self.filename}: {err}",
                  file=sys.stderr, flush=True)
        return table
