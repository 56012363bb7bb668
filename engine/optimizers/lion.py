"""Lion (Chen et al. 2023): sophia.Lion."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from engine.optimizers import BASE_SCHEMA, PATH_SCHEMA, OptimizerEntry, ParamGroups, betas, register
from sophia import Lion


def make(groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    return Lion(groups, lr=cfg["lr"], betas=betas(cfg), foreach=cfg["foreach"], fused=cfg["fused"])


register(OptimizerEntry(name="lion", label="Lion", make=make,
                        paths=("reference", "foreach", "fused"), access=(3, 2), compiled=True,
                        summary="sign of an interpolated momentum (Chen et al. 2023)",
                        schema={**BASE_SCHEMA, **PATH_SCHEMA}))
