"""Cooldown branches: every horizon of a warmup-stable-decay run from one parent run.

A WSD schedule (engine/schedules.py) holds the peak lr until the last ``decay_fraction`` of its
steps, so the runs of horizons T1 < T2 < ... share everything up to the step where each decays.
The parent, a WSD run of the longest horizon with ``schedule.horizons=[T1, T2, ...]``, keeps a
checkpoint at each horizon's decay start in ``RUN/branch_points/`` (never rotated away by
``checkpoint.keep_last``). A branch, ``train.max_steps=T checkpoint.branch_from=PARENT``, starts
from the parent's checkpoint at the step where its own decay begins and runs the decay to T.

Why a branch equals a fresh run of its horizon, bit for bit on one machine: batches, Hessian
probes and evaluation batches are functions of the step and the seed; the checkpoint carries
the weights, the optimizer state, the RNG state and the counters; and :func:`check_branch`
accepts a branch only when its settings equal the parent's in everything but the schedule's
decay (``train.max_steps``, ``train.decay_steps``, ``train.min_lr_ratio``, ``schedule.*``) and
its lr multiplier equals the parent's at every step before the branch point. The decay itself
may differ from the parent's (another shape, another final lr ratio): a branch is then a fresh
run of *its own* settings.

A branch copies the parent's metrics up to the branch step into its own ``metrics.jsonl``, so
its curves and counters (tokens, FLOPs, seconds) read like those of a fresh run, and records
its parent and branch step in its checkpoints and ``summary.json`` (``branch``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from data.files import write_text_atomic
from engine.checkpoint import BRANCH_POINTS_DIR, checkpoint_path, checkpoint_step, list_checkpoints
from engine.errors import HarnessError
from engine.resume import config_changes, format_changes
from engine.run_dir import METRICS_FILE
from engine.schedules import decay_end, lr_schedule, wsd_decay_start

# Settings a branch may set differently from its parent (with every schedule.* key): they shape
# the decay only. Whether they leave the lr before the branch step alone is checked on the lr
# trace itself.
DECAY_KEYS = ("train.max_steps", "train.decay_steps", "train.min_lr_ratio")


def decay_start(cfg: Mapping[str, Any]) -> int:
    """The step where a WSD run configured as ``cfg`` (a resolved config) leaves its peak lr."""
    schedule, train = cfg["schedule"], cfg["train"]
    if schedule.get("name") != "wsd":
        raise HarnessError(
            f"cooldown branches need schedule=wsd (this config has schedule="
            f"{schedule.get('name')}): only a warmup-stable-decay run shares its steps with "
            f"every shorter horizon. Start the parent with schedule=wsd.")
    return wsd_decay_start(decay_end(train), schedule["decay_fraction"])


def branch_points(cfg: DictConfig) -> frozenset[int]:
    """The steps a parent run keeps a checkpoint at for its declared ``schedule.horizons``: each
    horizon's decay start. Refuses horizons longer than the run's decay, or with no stable part."""
    horizons = list(cfg.schedule.get("horizons") or [])
    if not horizons:
        return frozenset()
    end = decay_end(cfg.train)
    if max(horizons) > end:
        raise HarnessError(
            f"schedule.horizons={horizons} has horizons past this run's decay end {end} "
            f"(train.decay_steps, or train.max_steps when null): a branch can only start where "
            f"this run is still at its peak lr. Raise train.max_steps to the longest horizon.")
    frac = cfg.schedule.decay_fraction
    steps = {wsd_decay_start(t, frac) for t in horizons}
    if 0 in steps:
        raise HarnessError(
            f"schedule.horizons={horizons} with schedule.decay_fraction={frac} decays from step "
            f"0 on, so there is no shared stable part to branch from; lower "
            f"schedule.decay_fraction.")
    return frozenset(steps)


def existing_points(parent: Path) -> list[int]:
    """The steps of every checkpoint a run keeps, branch points and rotating ones together."""
    found = list_checkpoints(parent / BRANCH_POINTS_DIR) + list_checkpoints(parent / "checkpoints")
    return sorted({checkpoint_step(p) for p in found})


def find_branch_checkpoint(parent: Path, step: int) -> Path:
    """The parent's checkpoint at ``step`` (a kept branch point first, else a rotating
    checkpoint that happens to sit there); refused, listing the steps that exist, when none."""
    if not parent.is_dir():
        raise HarnessError(f"checkpoint.branch_from={parent}: no such run directory.")
    for sub in (BRANCH_POINTS_DIR, "checkpoints"):
        if (path := checkpoint_path(parent / sub, step)).is_file():
            return path
    have = existing_points(parent)
    raise HarnessError(
        f"checkpoint.branch_from={parent} has no checkpoint at step {step}, where this run's "
        f"decay starts; it has checkpoints at steps {have or 'none'}. Start the parent with this "
        f"horizon in schedule.horizons=[...], or pick a horizon whose decay starts at one of "
        f"those steps.")


def check_branch(parent_cfg: Mapping[str, Any], cfg: Mapping[str, Any], step: int, *,
                 source: str, allow: bool) -> list[tuple[str, Any, Any]]:
    """Refuse a branch at ``step`` whose run would differ from its parent before ``step``.

    ``parent_cfg`` is the resolved config saved in the parent's checkpoint, ``cfg`` this run's.
    Settings other than the decay's (:data:`DECAY_KEYS`) and result-neutral ones must be equal
    (``allow``: checkpoint.allow_config_change=true turns the refusal into the returned list),
    and both lr schedules must give the same multiplier at every step before ``step``.
    """
    changes = [c for c in config_changes(parent_cfg, cfg)
               if c[0] not in DECAY_KEYS and not c[0].startswith("schedule.")]
    if changes and not allow:
        raise HarnessError(
            f"A branch from {source} must train like its parent up to step {step}, but these "
            f"settings differ (parent -> this command):\n{format_changes(changes)}\nPass the "
            f"parent's settings (`python train.py checkpoint.branch_from=PARENT "
            f"train.max_steps=T` reuses its command line), or add "
            f"checkpoint.allow_config_change=true if the change is intended.")
    parent_lr, branch_lr = lr_schedule(parent_cfg), lr_schedule(cfg)
    for s in range(step):
        if parent_lr(s) != branch_lr(s):
            raise HarnessError(
                f"A branch from {source} at step {step} would not equal a fresh run: at step {s} "
                f"the parent's lr multiplier is {parent_lr(s):.6g} and this run's "
                f"{branch_lr(s):.6g}. The branch must start before the parent's own decay "
                f"(its decay start is step {decay_start(parent_cfg)}); use a shorter horizon or "
                f"the parent's warmup and decay_fraction.")
    return changes


def inherit_metrics(parent: Path, run_dir: Path) -> None:
    """Copy the parent's ``metrics.jsonl`` into ``run_dir``, replacing what is there (an earlier
    attempt of this branch that saved no checkpoint); the metrics sink then cuts it back to the
    branch step, as it does for a resumed run."""
    source = parent / METRICS_FILE
    text = source.read_text() if source.is_file() else ""
    write_text_atomic(run_dir / METRICS_FILE, text)
