"""SophiaG (Liu et al. 2023): sophia.SophiaG fed a Gauss-Newton-Bartlett Hessian estimate."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from engine.errors import HarnessError
from engine.optimizers import OptimizerEntry, ParamGroups, betas, register
from sophia import SophiaG

# The official GNB estimate (bs * g^2 of the loss averaged over the whole Hessian batch) or the
# mean of per-micro-batch squares (same passes, variance / m); see engine/hessian.py.
ESTIMATORS = ("gnb", "gnb_msq")


def estimator(cfg: Mapping[str, Any]) -> str:
    """``optimizer.hessian_estimator``, checked."""
    value = cfg["hessian_estimator"]
    if value not in ESTIMATORS:
        hint = (" Hutchinson estimates feed SophiaH: use optimizer=sophiah."
                if value == "hutchinson" else "")
        raise HarnessError(
            f"optimizer.hessian_estimator={value!r} is not one of {', '.join(ESTIMATORS)}: "
            f"gnb is the official estimate, gnb_msq the lower-variance mean of per-micro-batch "
            f"squares at the same cost.{hint}"
        )
    return value


def make(groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    return SophiaG(groups, lr=cfg["lr"], betas=betas(cfg), rho=float(cfg["rho"]),
                   foreach=cfg["foreach"], fused=cfg["fused"])


register(OptimizerEntry(name="sophia", label="SophiaG", make=make, hessian=estimator,
                        paths=("reference", "foreach", "fused"), access=(4, 2), compiled=True,
                        summary="clipped diagonal-Hessian preconditioning, GNB estimate"))
