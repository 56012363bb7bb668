"""Which parameters get weight decay, and which go to Muon.

Both rules are explicit and configurable because they change results: the official Sophia
scripts decay Linear weights only, nanoGPT decays every matrix including the embeddings, and Muon
only makes sense for the hidden 2-D weight matrices. Parameters with ``requires_grad=False`` are
left out of every group (an optimizer would ignore them anyway). Tied tensors appear once.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

WEIGHT_DECAY_RULES = ("linear_weights", "matrices", "all", "none")


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() already deduplicates shared tensors (tied wte/lm_head): first name wins.
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _decays(rule: str, model: nn.Module) -> set[int]:
    """ids of the parameters that ``rule`` decays."""
    params = _trainable(model)
    if rule == "all":
        return {id(p) for _, p in params}
    if rule == "none":
        return set()
    if rule == "matrices":
        return {id(p) for _, p in params if p.dim() >= 2}
    # linear_weights: a tensor shared with an embedding (the tied output head) counts as an
    # embedding, as in the official Sophia scripts, where it is not decayed.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return linear - embeddings


def weight_decay_groups(
    model: nn.Module, weight_decay: float, rule: str = "linear_weights"
) -> list[dict[str, Any]]:
    """Optimizer param groups: ``{"params": decayed, "weight_decay": weight_decay}`` and
    ``{"params": the rest, "weight_decay": 0.0}``, in that order.

    Rules:
      - ``linear_weights`` (official Sophia scripts, default): nn.Linear weights only; not
        embeddings (the tied wte/lm_head tensor counts as an embedding), LayerNorms or biases.
      - ``matrices`` (nanoGPT): every parameter with dim >= 2, the embeddings included.
      - ``all``: every parameter. ``none``: no parameter.
    Every trainable parameter lands in exactly one group; empty groups are dropped (at least one
    group is always returned).
    """
    if rule not in WEIGHT_DECAY_RULES:
        raise ValueError(
            f"unknown weight-decay rule {rule!r}; choose one of: {', '.join(WEIGHT_DECAY_RULES)}"
        )
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    decay_ids = _decays(rule, model)
    params = _trainable(model)
    decay = [p for _, p in params if id(p) in decay_ids]
    no_decay = [p for _, p in params if id(p) not in decay_ids]
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]] or groups[:1]


MUON_INCLUDE = ("transformer.h.*",)
MUON_EXCLUDE: tuple[str, ...] = ()


def muon_param_split(
    model: nn.Module,
    include: Sequence[str] = MUON_INCLUDE,
    exclude: Sequence[str] = MUON_EXCLUDE,
    *,
    named: bool = False,
) -> tuple[list[Any], list[Any]]:
    """Split trainable parameters into ``(muon_params, adamw_params)``.

    A parameter goes to Muon iff it is 2-D, its name matches one of the ``include`` glob patterns
    (fnmatch, on ``named_parameters()`` names) and none of the ``exclude`` patterns. The default
    include, ``transformer.h.*``, selects the hidden matrices inside the transformer blocks
    (attention c_attn / c_proj, MLP c_fc / c_proj); the token and position embeddings, the tied
    output head, LayerNorms and biases go to AdamW, as Muon's authors recommend. Non-2-D tensors
    always go to AdamW: Muon's orthogonalisation is defined for matrices only.

    With ``named=True`` both lists hold ``(name, param)`` pairs instead of parameters.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include and exclude are sequences of patterns, not a single string")
    muon: list[Any] = []
    adamw: list[Any] = []
    for name, p in _trainable(model):
        to_muon = (
            p.dim() == 2
            and any(fnmatch.fnmatchcase(name, pat) for pat in include)
            and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)
        )
        (muon if to_muon else adamw).append((name, p) if named else p)
    return muon, adamw


def describe_groups(model: nn.Module, groups: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Names of the parameters in each group, for logging the grouping a run used."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), "?") for p in g["params"]] for g in groups]


__all__ = [
    "WEIGHT_DECAY_RULES",
    "weight_decay_groups",
    "muon_param_split",
    "describe_groups",
    "MUON_INCLUDE",
    "MUON_EXCLUDE",
]
