"""engine/instability.py: the divergence rule and the loss-spike rule on synthetic metric rows."""
from __future__ import annotations

import math

import pytest

from engine.instability import (SPIKE_THRESHOLD, SPIKE_WINDOW, divergence, diverged, loss_spikes,
                                loss_value)


def rows(train=(), val=(), every=10):
    """Metric rows in the engine's format: train[i] at step i * every, val as {step: loss}."""
    out = {}
    for i, v in enumerate(train):
        out.setdefault(i * every, {"step": i * every})["train/loss"] = v
    for step, v in dict(val).items():
        out.setdefault(step, {"step": step})["val/loss"] = v
    return [out[s] for s in sorted(out)]


def test_loss_values_as_the_engine_writes_them():
    assert loss_value(3.5) == 3.5 and loss_value(4) == 4.0
    assert math.isnan(loss_value("nan")) and loss_value("inf") == math.inf and loss_value("-inf") == -math.inf
    assert math.isnan(loss_value(float("nan")))  # a W&B history's NaN
    assert loss_value(None) is None and loss_value("n/a") is None and loss_value(True) is None


def test_a_healthy_run_did_not_diverge():
    r = rows(train=[6.0, 5.0, 4.5, 4.2], val={0: 6.1, 20: 4.6, 30: 4.3})
    assert not diverged(r) and divergence(r) is None
    # a val loss that rises late but stays below the first is overfitting, not divergence
    assert not diverged(rows(val={0: 6.0, 10: 3.0, 20: 5.9}))
    # one evaluation, or none: nothing to compare; null is unknown, not non-finite
    assert not diverged(rows(train=[5.0, None], val={0: 6.0}))


@pytest.mark.parametrize("bad", ["nan", "inf", float("nan"), float("-inf")])
def test_a_non_finite_loss_diverges_at_its_step(bad):
    d = divergence(rows(train=[6.0, 5.0, bad, 4.0], val={0: 6.1, 30: 4.0}))
    assert d is not None and d.step == 20 and "non-finite train/loss" in d.reason
    d = divergence(rows(train=[6.0, 5.0, 4.5, 4.0], val={0: 6.1, 30: bad}))
    assert d is not None and d.step == 30 and "non-finite val/loss" in d.reason
    assert diverged(rows(val={0: 6.0, 10: bad, 20: 3.0}))  # even if it recovered


def test_final_val_above_the_first_diverges_where_it_last_rose_above():
    # below the start at 10 and 20, above at 30, back below at 40, above from 50 to the end
    r = rows(val={0: 6.0, 10: 5.0, 20: 4.0, 30: 6.5, 40: 5.5, 50: 6.2, 60: 7.0, 70: 8.0})
    d = divergence(r)
    assert d is not None and d.step == 50
    assert "final val/loss 8 (step 70) above the first 6 (step 0)" in d.reason
    # the train loss never counts for this rule
    assert not diverged(rows(train=[5.0, 9.0], val={0: 6.0, 10: 5.0}))


def test_spikes_beat_the_running_median_by_the_threshold():
    assert (SPIKE_WINDOW, SPIKE_THRESHOLD) == (10, 0.2)  # the documented rule
    # a falling loss with a +-1% wiggle: no spike, the trend only lowers the points under their median
    base = [6.0 * 0.97 ** i * (1.01 if i % 2 else 0.99) for i in range(40)]
    assert loss_spikes(rows(train=base)) == []
    spiky = list(base)
    median = sorted(base[15:25])[4:6]
    spiky[25] = sum(median) / 2 * 1.25  # 25% above the median of the 10 before it: a spike
    spiky[26] = sum(sorted(base[16:26])[4:6]) / 2 * 1.15  # 15%: noise under this rule
    spiky[27], spiky[28] = spiky[25], spiky[25] * 1.3  # two more right after: the median holds
    found = loss_spikes(rows(train=spiky))
    assert [s.step for s in found] == [250, 270, 280]
    assert found[0].median == pytest.approx(sum(median) / 2) and found[0].loss == spiky[25]
    # the threshold and window are parameters; the first `window` points are never spikes
    assert [s.step for s in loss_spikes(rows(train=spiky), threshold=0.1)] == [250, 260, 270, 280]
    early = [6.0, 9.0] + base[2:]
    assert loss_spikes(rows(train=early)) == []
    assert [s.step for s in loss_spikes(rows(train=early), window=1)] == [10]
    # non-finite points are the divergence rule's, and skipped here
    assert [s.step for s in loss_spikes(rows(train=spiky[:25] + ["nan"] + spiky[25:]))] == [260, 280, 290]
    with pytest.raises(ValueError, match="window"):
        loss_spikes([], window=0)
