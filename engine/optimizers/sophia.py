"""SophiaG (Liu et al. 2023): sophia.SophiaG fed a Gauss-Newton-Bartlett Hessian estimate."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from engine.optimizers import (BASE_SCHEMA, HESSIAN_SCHEMA, PATH_SCHEMA, OptimizerEntry,
                               ParamGroups, betas, register)
from engine.schema import Choice
from sophia import SophiaG

# The official GNB estimate (bs * g^2 of the loss averaged over the whole Hessian batch) or the
# mean of per-micro-batch squares (same passes, variance / m); see engine/hessian.py.
ESTIMATORS = ("gnb", "gnb_msq")


def estimator(cfg: Mapping[str, Any]) -> str:
    """``optimizer.hessian_estimator`` (checked by the schema)."""
    return cfg["hessian_estimator"]


def make(groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    return SophiaG(groups, lr=cfg["lr"], betas=betas(cfg), rho=float(cfg["rho"]),
                   foreach=cfg["foreach"], fused=cfg["fused"])


register(OptimizerEntry(name="sophia", label="SophiaG", make=make, hessian=estimator,
                        paths=("reference", "foreach", "fused"), access=(4, 2), compiled=True,
                        summary="clipped diagonal-Hessian preconditioning, GNB estimate",
                        schema={**BASE_SCHEMA, **HESSIAN_SCHEMA, **PATH_SCHEMA,
                                "hessian_estimator": Choice(
                                    *ESTIMATORS, doc="gnb is the official estimate, gnb_msq the "
                                    "lower-variance mean of per-micro-batch squares at the same "
                                    "cost; Hutchinson estimates feed SophiaH: use "
                                    "optimizer=sophiah")}))
