"""Resuming continues a run as it was configured, or refuses to say why it cannot.

A run's identity (model, optimizer, batch, schedule, data) cannot change mid-run without the
results silently meaning something else. So when a checkpoint is resumed:

1. :func:`merge_overrides` rebuilds the command line the run was started with (its saved
   overrides) with this invocation's overrides on top, and ``train.py`` composes the config from
   that: ``python train.py hydra.run.dir=RUN`` continues RUN with *its* settings, not the defaults.
2. :func:`check_resume_config` compares that config with the one saved in the checkpoint and
   refuses every difference, listed, unless ``checkpoint.allow_config_change=true`` says the change
   is intended (then it is printed as a warning and recorded in the run's ``config.yaml``).

Keys in :data:`RESULT_NEUTRAL_KEYS` change how a run is operated, not what it computes, and may
differ.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping

from engine.errors import HarnessError

# The keys that change how a run is operated (when it stops, what and how often it logs, where it
# checkpoints, how it is tracked and launched), not what it computes: a resume may change them
# freely, run labels (scripts/compare.py) and the sweep table (summary.md) leave them out. A
# pattern "a.*" also covers the section "a" itself. eval.* adds measurements without touching the
# training computation (it draws no random numbers); train.peak_flops only scales the MFU metric;
# schedule.horizons only keeps extra checkpoints.
RESULT_NEUTRAL_KEYS = ("train.stop_at_step", "train.log_interval", "train.prefetch",
                       "train.peak_flops", "compile", "checkpoint.*", "data.prepare_if_missing",
                       "wandb.*", "eval.*", "hydra.*", "hparams_search", "schedule.horizons")

# Where a run's data and compute happen to live. The same experiment runs anywhere, so labels and
# tables leave these out too; a resume still refuses a change, because data=prepared names its
# data by data.dir alone, and a device change is rarely what was meant mid-run.
PLACEMENT_KEYS = ("device", "data.dir")

# Settings of one invocation only: a saved one is not carried into the next.
INVOCATION_KEYS = ("train.stop_at_step", "checkpoint.resume", "checkpoint.allow_config_change")


def override_key(override: str) -> str:
    """The config key or group an override sets: ``+optimizer.rho=0.1`` -> ``optimizer.rho``."""
    return override.split("=", 1)[0].lstrip("+~")


def is_result_neutral(key: str, *, placement: bool = False) -> bool:
    """Whether a config key, a config group (``hydra/launcher``) or an override (``key=value``)
    leaves a run's result unchanged: it matches :data:`RESULT_NEUTRAL_KEYS`, or with
    ``placement`` (for labelling runs, not for a resume) :data:`PLACEMENT_KEYS`."""
    key = override_key(key).replace("/", ".")
    patterns = RESULT_NEUTRAL_KEYS + (PLACEMENT_KEYS if placement else ())
    return any(fnmatch.fnmatch(key, pat) or (pat.endswith(".*") and key == pat[:-2])
               for pat in patterns)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every key that is not result-neutral
    (:func:`is_result_neutral`) and differs (a key present on one side only counts as a
    difference, with ``<unset>`` on the other)."""
    a, b = flatten(saved), flatten(current)
    changes = []
    for key in sorted(set(a) | set(b)):
        if is_result_neutral(key):
            continue
        old, new = a.get(key, "<unset>"), b.get(key, "<unset>")
        if old != new:
            changes.append((key, old, new))
    return changes


def format_changes(changes: Iterable[tuple[str, Any, Any]]) -> str:
    """One indented ``key: old -> new`` line per change."""
    return "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes)


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], *, allow: bool,
                        source: str) -> list[tuple[str, Any, Any]]:
    """Refuse (``HarnessError``) a resume whose config differs from the checkpoint's, unless
    ``allow``; returns the differences (empty when none)."""
    changes = config_changes(saved, current)
    if changes and not allow:
        raise HarnessError(
            f"Resuming {source} with a different config (checkpoint -> this command):\n"
            f"{format_changes(changes)}\n"
            f"A run's model, optimizer, batch, schedule and data cannot change mid-run. Resume "
            f"with the run's own settings (leave these overrides out: the saved ones are reused), "
            f"start a fresh run in another directory (hydra.run.dir=...), or, if the change is "
            f"intended, add checkpoint.allow_config_change=true."
        )
    return changes


def merge_overrides(saved: Iterable[str], new: Iterable[str]) -> list[str]:
    """The saved command line with this invocation's overrides replacing those of the same key.

    Saved overrides of :data:`INVOCATION_KEYS` are dropped: they applied to the earlier
    invocation only (a ``train.stop_at_step`` or ``checkpoint.resume`` carried over would stop or
    restart the continued run in the wrong place).
    """
    new = list(new)
    by_key = {override_key(o): o for o in new}
    merged = [by_key.pop(override_key(o), o) for o in saved
              if override_key(o) in by_key or override_key(o) not in INVOCATION_KEYS]
    return merged + [o for o in new if override_key(o) in by_key]
