"""AdamW: torch's own (fused on CUDA, foreach on CPU unless ``fused`` says otherwise)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from engine.optimizers import BASE_SCHEMA, EPS, OptimizerEntry, ParamGroups, betas, register
from engine.schema import Bool, Optional


def make(groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    fused = cfg["fused"]
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=betas(cfg), eps=float(cfg["eps"]),
                             fused=bool(fused), foreach=None if fused else True)


register(OptimizerEntry(name="adamw", label="AdamW", make=make, paths=("foreach", "fused"),
                        access=(4, 3), summary="torch.optim.AdamW",
                        schema={**BASE_SCHEMA, "eps": EPS,
                                "fused": Optional(Bool(), doc="null: fused on CUDA")}))
