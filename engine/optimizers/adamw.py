"""AdamW: torch's own, fused wherever torch has a fused kernel for the parameters' device (CUDA and
CPU), else foreach, unless ``fused`` says otherwise.

The fused path is the default because speed-ups on the seconds axis compare every optimizer at its
fastest correct implementation: on CPU torch's foreach AdamW takes several times the fused step
(docs/benchmarks.md), while Sophia and Lion run their own fused kernels."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from engine.optimizers import BASE_SCHEMA, EPS, OptimizerEntry, ParamGroups, betas, register
from engine.schema import Bool, Optional


def make(groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    fused = cfg["fused"]
    kwargs = dict(lr=cfg["lr"], betas=betas(cfg), eps=float(cfg["eps"]))
    if fused is None:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # no fused kernel for this device or dtype: the next fastest path
            return torch.optim.AdamW(groups, foreach=True, **kwargs)
    return torch.optim.AdamW(groups, fused=bool(fused), foreach=None if fused else True, **kwargs)


register(OptimizerEntry(name="adamw", label="AdamW", make=make, paths=("foreach", "fused"),
                        access=(4, 3), summary="torch.optim.AdamW",
                        schema={**BASE_SCHEMA, "eps": EPS,
                                "fused": Optional(Bool(), doc="null: fused where torch has the kernel, else "
                                                           "foreach")}))
