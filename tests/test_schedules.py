"""lr schedules: the cosine trace point by point, and the registry's contract with configs/."""
from __future__ import annotations

import math

import pytest

from engine.build import lr_schedule
from engine.config_check import check_config
from engine.errors import HarnessError
from engine.schedules import SCHEDULE_SCHEMAS, SCHEDULES, Span, build_schedule, cosine
from engine.run import run
from train_helpers import REPO, compose_cfg, read_metrics, tiny_overrides


def test_cosine_trace_point_by_point():
    span = Span(warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    f = build_schedule({"name": "cosine"}, span)
    assert f(0) == pytest.approx(0.1)  # warmup starts at 1/warmup, never 0
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)  # the peak, where decay begins
    assert f(60) == pytest.approx(0.1 + 0.5 * 0.9)  # halfway: cos(pi/2) = 0
    assert f(35) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi / 4)) * 0.9)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # flat after the decay
    values = [f(s) for s in range(10, 111)]
    assert values == sorted(values, reverse=True)


def test_the_configured_schedule_follows_the_train_group():
    cfg = compose_cfg(["train.max_steps=200", "train.warmup_steps=20", "train.min_lr_ratio=0.0"])
    f = lr_schedule(cfg)
    span = Span(warmup_steps=20, decay_steps=200, min_lr_ratio=0.0)
    assert [f(s) for s in range(0, 260, 7)] == [cosine(s, span, {}) for s in range(0, 260, 7)]
    cfg = compose_cfg(["train.max_steps=200", "train.decay_steps=100"])
    assert lr_schedule(cfg)(100) == pytest.approx(cfg.train.min_lr_ratio)


def test_every_registered_schedule_has_its_config_file_and_back():
    files = {p.stem for p in (REPO / "configs" / "schedule").glob("*.yaml")}
    assert files == set(SCHEDULES) == set(SCHEDULE_SCHEMAS)  # each registered with its specs
    for name in SCHEDULES:
        cfg = compose_cfg([f"schedule={name}"])
        assert cfg.schedule.name == name
        check_config(cfg)


def test_a_typo_in_the_schedule_group_is_refused():
    with pytest.raises(HarnessError, match=r"schedule\.min_lr=0\.1.*Keys of schedule=cosine"):
        check_config(compose_cfg(["+schedule.min_lr=0.1"]))


def test_an_unknown_schedule_name_lists_the_registered_ones():
    with pytest.raises(HarnessError, match=r"schedule='linear' is unknown; choose one of cosine"):
        build_schedule({"name": "linear"}, Span(1, 2, 0.0))


WSD_SPAN = Span(warmup_steps=10, decay_steps=100, min_lr_ratio=0.01)


@pytest.mark.parametrize("shape,at_85", [
    ("linear", 0.01 + 0.99 * 0.75),
    ("1-sqrt", 0.01 + 0.99 * (1 - math.sqrt(0.25))),
    ("cosine", 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.25))),
])
def test_wsd_trace_point_by_point(shape, at_85):
    f = build_schedule({"name": "wsd", "decay_fraction": 0.2, "decay_shape": shape}, WSD_SPAN)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # the shared warmup
    assert all(f(s) == 1.0 for s in range(10, 81))  # stable until the last 20% of 100 steps
    assert f(85) == pytest.approx(at_85)  # a quarter into the 20-step decay
    assert f(100) == pytest.approx(0.01) and f(120) == pytest.approx(0.01)
    decay = [f(s) for s in range(80, 101)]
    assert decay == sorted(decay, reverse=True)


def test_wsd_may_decay_to_zero_and_rounds_its_decay_start():
    f = build_schedule({"name": "wsd", "decay_fraction": 0.25, "decay_shape": "linear"},
                       Span(warmup_steps=0, decay_steps=10, min_lr_ratio=0.0))
    # round(2.5) = 2 decay steps: 8 is the peak, 9 halfway, 10 zero
    assert [f(s) for s in (0, 7, 8, 9, 10)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])


def test_constant_keeps_the_peak_after_warmup():
    f = build_schedule({"name": "constant"}, WSD_SPAN)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert {f(s) for s in range(10, 500, 7)} == {1.0}


def test_a_run_follows_the_wsd_trace(tiny_data, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", schedule="wsd",
                                     **{"schedule.decay_fraction": 0.5}))
    run(cfg, tmp_path)
    f = lr_schedule(cfg)
    rows = [r for r in read_metrics(tmp_path) if "lr" in r]
    assert len(rows) == 6  # steps 5, 10, ..., 30
    for r in rows:  # the lr of the step that led to this row
        assert r["lr"] == pytest.approx(cfg.optimizer.lr * f(r["step"] - 1))
    assert {r["step"] for r in rows if r["lr"] == pytest.approx(cfg.optimizer.lr)} == {5, 10, 15}
