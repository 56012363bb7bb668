"""Reading a run directory back: its metrics rows, config, overrides and summary.

The end-of-run summary, the sweep table (``summary.md``) and ``scripts/compare.py`` all read runs
through this module, so they agree on what a run holds. The layout (docs/runs.md)::

    RUN_DIR/config.yaml               the resolved config (Hydra's .hydra/config.yaml until written)
    RUN_DIR/.hydra/overrides.yaml     the command line's overrides
    RUN_DIR/metrics.jsonl             one JSON object per logged step
    RUN_DIR/summary.json              the end-of-run summary

**Bad lines.** ``metrics.jsonl`` is appended one line at a time by one writer, so a line can only
go bad in two ways, and each has one treatment:

- *A torn last line*: the last line lacks its newline and is not valid JSON. The process was
  killed mid-write; the file is otherwise sound and the row never existed. Skipped silently.
- *Any other bad line*: one that is not a JSON object with an integer ``step`` (a line cut short
  before a resume appended more, disk damage, a hand edit). Skipped, and each read of the file
  emits one :class:`RunDirWarning` naming the file and the numbers of all such lines, so damage is
  seen but never costs the rest of the run.

Blank lines carry nothing and are passed over. The YAML and JSON files are whole documents: one
that cannot be parsed counts as absent.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from engine.errors import HarnessError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
HYDRA_DIR = ".hydra"
OVERRIDES_FILE = "overrides.yaml"

_LISTED_LINES = 10  # line numbers named in a warning; more are counted


class RunDirError(HarnessError):
    """A file of a run directory exists but cannot be read (permissions, a directory, I/O)."""


class RunDirWarning(UserWarning):
    """Lines of a metrics file were skipped as damaged (see the module docstring)."""


def _step(row: Any) -> int | None:
    """The row's step: ``step``, or W&B's ``_step`` in its own history file."""
    if not isinstance(row, dict):
        return None
    step = row.get("step", row.get("_step"))
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics file (``metrics.jsonl``, or a W&B ``wandb-history.jsonl``) as the
    run finally kept them, under the bad-line rule of the module docstring.

    Every row has an integer ``step`` (W&B's ``_step`` is copied to it). A row whose step is not
    after the previous one means a rollback re-ran those steps, so the abandoned rows from that
    step on are dropped: nothing may come from a branch the run threw away. A missing file has no
    rows; one that exists but cannot be read raises :class:`RunDirError`.
    """
    path = Path(path)
    try:
        # errors="replace": binary garbage then fails as bad JSON on the line it is on
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise RunDirError(f"{path} cannot be read ({err.strerror or err}); check that it is a file "
                          f"you may read.") from None
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: a write cut short
                continue
            row = None
        step = _step(row)
        if step is None:
            bad.append(number)
            continue
        row = {**row, "step": step}
        while rows and rows[-1]["step"] >= step:
            rows.pop()
        rows.append(row)
    if bad:
        listed = ", ".join(map(str, bad[:_LISTED_LINES]))
        more = f" and {len(bad) - _LISTED_LINES} more" if len(bad) > _LISTED_LINES else ""
        warnings.warn(f"{path}: skipped {len(bad)} damaged line(s), not a JSON object with an "
                      f"integer step: line{'s' if len(bad) > 1 else ''} {listed}{more}",
                      RunDirWarning, stacklevel=2)
    return rows


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document in ``path``, or None when it is missing or cannot be read or parsed."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def read_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's resolved ``config.yaml``, else Hydra's composed ``.hydra/config.yaml`` (a job
    that failed before the engine wrote its copy still has Hydra's), else None."""
    run_dir = Path(run_dir)
    for path in (run_dir / CONFIG_FILE, run_dir / HYDRA_DIR / CONFIG_FILE):
        cfg = read_yaml(path)
        if isinstance(cfg, dict):
            return cfg
    return None


def read_overrides(run_dir: str | os.PathLike) -> list[str] | None:
    """The command line's overrides from ``.hydra/overrides.yaml``, as written; None when the
    file is missing, unreadable or not a list."""
    overrides = read_yaml(Path(run_dir) / HYDRA_DIR / OVERRIDES_FILE)
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``summary.json``; None when it is missing, unreadable or not a JSON object."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None
