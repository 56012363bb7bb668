"""The lr schedules, by name: ``schedule=<name>`` picks one for every optimizer alike.

A schedule is a function registered with :func:`register_schedule`; ``configs/schedule/<name>.yaml``
declares the keys of its own with their defaults (the config check accepts exactly those), and the
registration their types and ranges (``schema``, engine/schema.py). The knobs every schedule
shares, warmup, the end of the decay and the final lr ratio, are ``train.warmup_steps``,
``train.decay_steps`` and ``train.min_lr_ratio``, handed to it as a :class:`Span`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from engine.errors import HarnessError
from engine.registry import add_unique
from engine.schema import Choice, Float, Int, List, Spec


@dataclass(frozen=True)
class Span:
    """The shared shape of a schedule: warmup steps, the step where decay ends, the lr ratio left."""

    warmup_steps: int
    decay_steps: int
    min_lr_ratio: float


# (0-based optimizer step, span, the schedule's own config) -> multiplier on each group's base lr
Schedule = Callable[[int, Span, Mapping[str, Any]], float]
SCHEDULES: dict[str, Schedule] = {}
# name -> the specs of the schedule's own keys (its yaml's keys but ``name``)
SCHEDULE_SCHEMAS: dict[str, Mapping[str, Spec]] = {}


def register_schedule(name: str, *, schema: Mapping[str, Spec]) -> Callable[[Schedule], Schedule]:
    """Decorator: make ``fn`` the schedule ``schedule=<name>``; ``schema`` gives the type and
    range of each key its yaml declares besides ``name`` (``{}`` when it has none)."""
    def add(fn: Schedule) -> Schedule:
        add_unique(SCHEDULES, "schedule", name, fn)
        SCHEDULE_SCHEMAS[name] = dict(schema)
        return fn
    return add


def warmup(step: int, span: Span) -> float | None:
    """The linear warmup's multiplier, from 1/warmup (the first step is never taken at lr 0) to
    1; None once warmup is over."""
    return (step + 1) / span.warmup_steps if step < span.warmup_steps else None


@register_schedule("cosine", schema={})
def cosine(step: int, span: Span, cfg: Mapping[str, Any]) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at ``decay_steps``, flat after it (a
    fully decayed schedule, which a fair comparison evaluates at)."""
    ramp = warmup(step, span)
    if ramp is not None:
        return ramp
    if step >= span.decay_steps:
        return span.min_lr_ratio
    progress = (step - span.warmup_steps) / max(1, span.decay_steps - span.warmup_steps)
    return span.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - span.min_lr_ratio)


@register_schedule("constant", schema={})
def constant(step: int, span: Span, cfg: Mapping[str, Any]) -> float:
    """Linear warmup, then the peak lr for good (``decay_steps`` and ``min_lr_ratio`` unused)."""
    ramp = warmup(step, span)
    return 1.0 if ramp is None else ramp


# The decay of a WSD schedule as a function of its progress p in [0, 1], from 1 to 0; the
# multiplier is min_lr_ratio + (1 - min_lr_ratio) * shape(p).
WSD_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),  # Hägele et al. 2024's best cooldown
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
}


def wsd_decay_start(decay_steps: int, decay_fraction: float) -> int:
    """The step where a WSD schedule ending at ``decay_steps`` leaves its peak: the last
    ``decay_fraction`` of the steps decay (rounded; at least one step when the fraction is > 0)."""
    length = round(decay_fraction * decay_steps)
    return decay_steps - (max(1, length) if decay_fraction > 0 else 0)


@register_schedule("wsd", schema={
    "decay_fraction": Float(min=0, max=1, doc="the share of the steps, at the end, that decay"),
    "decay_shape": Choice(*WSD_SHAPES, doc="how the lr falls during the decay"),
    "horizons": List(Int(min=1), doc="horizons whose decay start keeps a checkpoint for cooldown "
                                     "branches (engine/branching.py)"),
})
def wsd(step: int, span: Span, cfg: Mapping[str, Any]) -> float:
    """Warmup-stable-decay: linear warmup, the peak lr until the last ``decay_fraction`` of the
    steps to ``decay_steps``, then a ``decay_shape`` decay to ``min_lr_ratio`` (which may be 0),
    flat after it. Every horizon shares the stable part, so a run can branch into any shorter
    horizon's decay from a checkpoint taken where that decay starts."""
    start = wsd_decay_start(span.decay_steps, cfg["decay_fraction"])
    if step < start:
        ramp = warmup(step, span)
        return 1.0 if ramp is None else ramp
    if step >= span.decay_steps:
        return span.min_lr_ratio
    progress = (step - start) / (span.decay_steps - start)
    shape = WSD_SHAPES[cfg["decay_shape"]](progress)
    return span.min_lr_ratio + (1.0 - span.min_lr_ratio) * shape


def decay_end(train: Mapping[str, Any]) -> int:
    """The step where the decay ends: ``train.decay_steps``, or ``train.max_steps`` when null."""
    return train["decay_steps"] if train.get("decay_steps") is not None else train["max_steps"]


def lr_schedule(cfg: Mapping[str, Any]) -> Callable[[int], float]:
    """A run's ``step -> lr multiplier``: its ``schedule`` with the shared knobs of its ``train``
    section (``cfg``: a run's config, composed or as saved)."""
    t = cfg["train"]
    span = Span(warmup_steps=t["warmup_steps"], decay_steps=decay_end(t),
                min_lr_ratio=float(t["min_lr_ratio"]))
    schedule = cfg["schedule"]
    return build_schedule(dict(schedule.items()) if hasattr(schedule, "items") else schedule,
                          span)


def build_schedule(cfg: Mapping[str, Any], span: Span) -> Callable[[int], float]:
    """``step -> lr multiplier`` for the ``schedule`` config ``cfg`` (its ``name`` and own keys)."""
    name = cfg.get("name")
    if name not in SCHEDULES:
        raise HarnessError(f"schedule={name!r} is unknown; choose one of {', '.join(SCHEDULES)}.")
    fn, own = SCHEDULES[name], dict(cfg)
    return lambda step: fn(step, span, own)
