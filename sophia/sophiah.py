"""SophiaH: Sophia with the Hutchinson diagonal Hessian estimator.

The update is `sophia.sophia`'s, as in SophiaG, but h is an EMA of Hutchinson estimates u * (H u)
(u Rademacher, see `sophia.hessian.hutchinson`) of the Hessian of the mean loss. Those estimates
can be negative, so the denominator is floored at eps, and no batch-size factor applies:

    r = min(|m| / max(rho * h, eps), 1)

`update_hessian(estimates)` does `h = beta2 * h + (1 - beta2) * estimate` per parameter.
State keys (`step`, `exp_avg`, `hessian`) and layout are SophiaG's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import check_positive
from .sophia import Denominator, SophiaBase

__all__ = ["SophiaH"]


def _denominator(rho: float, eps: float) -> Denominator:
    return Denominator(scale=rho, floor=eps)


class SophiaH(SophiaBase):
    """SophiaH optimizer (see the module docstring).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: step size; a clipped coordinate moves by exactly `lr` (default 1e-4).
        betas: (beta1 for the gradient EMA, beta2 for the Hessian EMA), each in [0, 1).
        rho: clipping threshold scale, > 0. It multiplies the Hessian of the mean loss, the same
            quantity SophiaG's rho * bs * g_hat^2 estimates, so values carry over.
        weight_decay: decoupled weight decay, >= 0.
        eps: floor of the denominator, > 0; guards against zero and negative curvature.
        maximize, foreach, fused: as for `sophia.SophiaG`: ascend instead of descend, and the
            implementation path (reference, multi-tensor or compiled; None picks).
    """

    # groups saved before SophiaH had eps get the constructor's default
    _GROUP_KEY_DEFAULTS = {**SophiaBase._GROUP_KEY_DEFAULTS, "eps": 1e-15}

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04, weight_decay: float = 0.1,
        eps: float = 1e-15,
        *, maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
    ):
        super().__init__(params, dict(
            lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
            maximize=maximize, foreach=foreach, fused=fused,
        ))

    def _check_hyperparameters(self, group: dict[str, Any], group_index: int | None) -> None:
        super()._check_hyperparameters(group, group_index)
        check_positive("eps", group["eps"], group_index)

    @torch.no_grad()
    def update_hessian(
        self, estimates: Sequence[Tensor | None] | Mapping[Tensor, Tensor]
    ) -> None:
        """h = beta2 * h + (1 - beta2) * estimate, per parameter.

        Args:
            estimates: either a sequence aligned with
                `[p for g in opt.param_groups for p in g["params"]]` (None entries are skipped),
                as returned by `sophia.hessian.hutchinson` on that list, or a dict param -> tensor.
        """
        aligned = iter(self._align(estimates))
        per_group = []
        for group in self.param_groups:
            hessians, ests = [], []
            for p in group["params"]:
                est = next(aligned)
                if est is not None:
                    ests.append(est.detach())
                    hessians.append(self._init_state(self.state[p], p)["hessian"])
            per_group.append((group, hessians, ests))
        self._update_hessian_ema(per_group, square=False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SophiaH update; `closure` optionally re-evaluates the model and returns the loss."""
        return self._sophia_step(closure, lambda group: _denominator(group["rho"], group["eps"]))

