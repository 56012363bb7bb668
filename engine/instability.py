"""When a run counts as diverged, and which training-loss points are spikes.

One rule for every reader of a run's metrics (``scripts/compare.py`` through ``analysis``, and the
run summary), so that a run is never "diverged" in one report and "fine" in another. Both functions
take the rows of ``metrics.jsonl`` as :func:`engine.run_dir.read_metrics` returns them; a
non-finite loss is written there as the string ``"nan"`` / ``"inf"`` (``engine/metrics.py``), and
W&B histories may hold real float NaNs: both count as non-finite. ``null`` means unknown, not
non-finite.

**Divergence.** A run diverged if

1. any logged ``train/loss`` or ``val/loss`` is non-finite (NaN or +-inf), or
2. its final ``val/loss`` is above its first one (the step-0 evaluation with
   ``train.eval_at_start``, the default): training left the model worse than its initialisation.

The divergence point (where compare.py draws its x) is the first non-finite loss for rule 1; for
rule 2 the first evaluation of the final stretch that stays above the first ``val/loss``.

**Spikes.** A ``train/loss`` point is a spike if it exceeds the median of the previous
:data:`SPIKE_WINDOW` finite logged points by more than :data:`SPIKE_THRESHOLD` (a fraction):
``loss > median(previous W) * (1 + threshold)``. The median, not the mean, so that a spike does not
raise the bar for the points right after it (up to W/2 - 1 neighbouring spikes are still caught).
The first W points are never spikes: the loss falls fastest there, and a window that short of
history says nothing. Non-finite points are left to the divergence rule.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

LOSS_KEYS: tuple[str, ...] = ("train/loss", "val/loss")

# 10 logged points: with the default log interval that is a few hundred steps, long enough for a
# median that one spike cannot move, short enough to follow the loss's downward trend (a trailing
# median lags above a falling loss, which only makes the rule harder to trigger, never easier).
SPIKE_WINDOW = 10
# 20% above the recent median: train/loss is one step's loss, not an average over the log
# interval, and small batches scatter it by a few percent; 20% is several times that scatter,
# while a real spike sends the loss back towards values of hundreds of steps earlier.
SPIKE_THRESHOLD = 0.2


def loss_value(value: Any) -> float | None:
    """A logged loss as a float: numbers (NaN/inf kept) and the strings ``"nan"``/``"inf"``/
    ``"-inf"`` the engine writes for non-finite values; None for null, text or bools."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _points(rows: Sequence[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the rows that log `key`, in step order (non-finite values kept)."""
    pts = []
    for row in rows:
        value = loss_value(row.get(key))
        if value is not None and isinstance(row.get("step"), int):
            pts.append((row["step"], value))
    return sorted(pts, key=lambda p: p[0])


@dataclass(frozen=True)
class Divergence:
    """Why and where a run diverged: `step` is the divergence point, `reason` one line of text."""

    step: int
    reason: str


def divergence(rows: Sequence[dict], keys: Sequence[str] = LOSS_KEYS, val_key: str = "val/loss"
               ) -> Divergence | None:
    """The run's divergence under the module's rule, or None if it did not diverge.

    `keys` are the losses whose non-finite values count (rule 1); `val_key` is the loss whose final
    value is compared with its first (rule 2).
    """
    bad = [(step, key, v) for key in keys for step, v in _points(rows, key) if not math.isfinite(v)]
    if bad:
        step, key, v = min(bad, key=lambda b: b[0])
        return Divergence(step, f"non-finite {key} ({v}) at step {step}")
    val = _points(rows, val_key)
    if len(val) >= 2 and val[-1][1] > val[0][1]:
        first = val[0][1]
        start = len(val) - 1
        while start > 0 and val[start - 1][1] > first:
            start -= 1
        return Divergence(val[start][0], f"final {val_key} {val[-1][1]:.4g} (step {val[-1][0]}) above the "
                                         f"first {first:.4g} (step {val[0][0]})")
    return None


def diverged(rows: Sequence[dict], keys: Sequence[str] = LOSS_KEYS, val_key: str = "val/loss") -> bool:
    """Did the run diverge? (:func:`divergence` is not None; the module docstring has the rule.)"""
    return divergence(rows, keys, val_key) is not None


@dataclass(frozen=True)
class Spike:
    """A loss point far above its running median: the step, the loss and the median it beat."""

    step: int
    loss: float
    median: float


def loss_spikes(rows: Sequence[dict], key: str = "train/loss", window: int = SPIKE_WINDOW,
                threshold: float = SPIKE_THRESHOLD) -> list[Spike]:
    """Points of `key` above ``median(previous window finite points) * (1 + threshold)``.

    The first `window` finite points are never spikes; non-finite points are skipped (they are the
    divergence rule's). Raises ValueError for a window < 1 or a negative threshold.
    """
    if window < 1 or threshold < 0:
        raise ValueError(f"spike window must be >= 1 and threshold >= 0, got {window} and {threshold}")
    finite = [(step, v) for step, v in _points(rows, key) if math.isfinite(v)]
    spikes = []
    for i in range(window, len(finite)):
        median = statistics.median(v for _, v in finite[i - window:i])
        step, v = finite[i]
        if v > median * (1 + threshold):
            spikes.append(Spike(step, v, median))
    return spikes
