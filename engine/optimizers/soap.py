"""SOAP (Vyas et al. 2024): sophia.SOAP, Adam in the eigenbasis of Shampoo's preconditioner."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from engine.optimizers import BASE_SCHEMA, EPS, OptimizerEntry, ParamGroups, betas, register
from engine.schema import Float, Int, Optional
from sophia import SOAP


def make(groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    return SOAP(groups, lr=cfg["lr"], betas=betas(cfg), shampoo_beta=cfg["shampoo_beta"],
                eps=float(cfg["eps"]), weight_decay=float(cfg["weight_decay"]),
                precondition_frequency=cfg["precondition_frequency"],
                max_precond_dim=cfg["max_precond_dim"])


register(OptimizerEntry(name="soap", label="SOAP", make=make, paths=("reference",),
                        summary="Adam in the eigenbasis of Shampoo's preconditioner",
                        schema={**BASE_SCHEMA, "eps": EPS,
                                "shampoo_beta": Optional(Float(min=0, lt=1),
                                                         doc="null: betas[1]"),
                                "precondition_frequency": Int(min=1),
                                "max_precond_dim": Int(min=1)}))
