"""Downstream evaluations: name -> a builder, one module per evaluation.

An evaluation ``NAME`` is configured by the ``eval.NAME_*`` keys of configs/config.yaml (its
``eval.NAME_interval`` > 0 turns it on during training) and logs ``eval/NAME_*`` metrics. Its
module registers a builder with :func:`register_eval`; the builder gets its own keys without the
prefix (``interval``, ``task_file``, ...), the data's tokenizer name, and the rank and world size,
and returns a :class:`DownstreamEval` or None when it is off. The registration also declares the
type and range of each of those keys (``schema``), which the config check applies before a run
starts. HellaSwag is ``evals/hellaswag.py``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import torch

from engine.registry import add_unique, import_modules
from engine.schema import Spec


class DownstreamEval(Protocol):
    """What the training loop needs of an evaluation."""

    def due(self, step: int, max_steps: int) -> bool:
        """Whether it runs after ``step`` optimizer steps."""

    def __call__(self, model: torch.nn.Module, device: torch.device | str,
                 autocast: Callable[[], Any] | None = None, rank: int = 0,
                 world_size: int = 1) -> dict[str, float]:
        """Its metrics (``eval/NAME_*``); every rank calls it."""


EvalBuilder = Callable[..., "DownstreamEval | None"]
EVALS: dict[str, EvalBuilder] = {}
# name -> the specs of its options (without the ``<name>_`` prefix)
SCHEMAS: dict[str, Mapping[str, Spec]] = {}


def register_eval(name: str, *, schema: Mapping[str, Spec]) -> Callable[[EvalBuilder], EvalBuilder]:
    """Decorator: make ``builder(options, tokenizer, *, rank, world_size)`` the evaluation
    ``name``, configured by the ``eval.<name>_*`` keys; ``schema`` gives each option's type and
    range (engine/schema.py), keyed without the prefix."""
    def add(builder: EvalBuilder) -> EvalBuilder:
        add_unique(EVALS, "evaluation", name, builder)
        SCHEMAS[name] = dict(schema)
        return builder
    return add


def _discover() -> None:
    import_modules(__name__, __path__)


def eval_schema() -> dict[str, Spec]:
    """The specs of every registered evaluation's keys, as the ``eval`` group names them
    (``<name>_<option>``)."""
    _discover()
    return {f"{name}_{key}": spec for name, specs in sorted(SCHEMAS.items())
            for key, spec in specs.items()}


def build_evals(eval_cfg: Mapping[str, Any], tokenizer: str, *, rank: int = 0,
                world_size: int = 1) -> list[DownstreamEval]:
    """Every evaluation the ``eval`` config turns on, in name order. Call it on every rank while
    building the trainer, so that a missing task file is refused before the run dir is written."""
    _discover()
    built = []
    for name in sorted(EVALS):
        options = {key[len(name) + 1:]: value for key, value in eval_cfg.items()
                   if key.startswith(f"{name}_")}
        evaluation = EVALS[name](options, tokenizer, rank=rank, world_size=world_size)
        if evaluation is not None:
            built.append(evaluation)
    return built
