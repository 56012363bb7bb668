"""SophiaH (Liu et al. 2023): sophia.SophiaH fed a Hutchinson estimate of the Hessian diagonal.

Its config has no ``hessian_estimator`` key: Hutchinson is what makes it SophiaH (a key with one
legal value would be a knob that does nothing).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from engine.optimizers import (BASE_SCHEMA, EPS, HESSIAN_SCHEMA, PATH_SCHEMA, OptimizerEntry,
                               ParamGroups, betas, register)
from sophia import SophiaH


def make(groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    return SophiaH(groups, lr=cfg["lr"], betas=betas(cfg), rho=float(cfg["rho"]),
                   eps=float(cfg["eps"]), foreach=cfg["foreach"], fused=cfg["fused"])


register(OptimizerEntry(name="sophiah", label="SophiaH", make=make,
                        hessian=lambda cfg: "hutchinson", paths=("reference", "foreach", "fused"),
                        access=(4, 2), compiled=True,
                        summary="clipped diagonal-Hessian preconditioning, Hutchinson estimate",
                        schema={**BASE_SCHEMA, **HESSIAN_SCHEMA, **PATH_SCHEMA, "eps": EPS}))
