"""lr schedules: the cosine trace point by point, and the registry's contract with configs/."""
from __future__ import annotations

import math

import pytest

from engine.build import lr_schedule
from engine.config_check import check_config
from engine.errors import HarnessError
from engine.schedules import SCHEDULE_SCHEMAS, SCHEDULES, Span, build_schedule, cosine
from train_helpers import REPO, compose_cfg


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
