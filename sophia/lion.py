"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

Reproduces `lion_pytorch.Lion` (the widely used reference) to float rounding, with the same state
layout (`exp_avg` only), plus a multi-tensor path and telemetry. Per parameter with gradient g:

    c  = beta1 * m + (1 - beta1) * g
    p *= 1 - lr * weight_decay
    p -= lr * sign(c)
    m  = beta2 * m + (1 - beta2) * g

Every coordinate moves by exactly lr (or 0), so Lion wants an lr 3-10x below AdamW's and a weight
decay 3-10x above it to keep the same effective decay lr * weight_decay.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (
    acc_dtype,
    as_real,
    check_betas,
    check_nonnegative,
    default_foreach,
    group_by_device_and_dtype,
    sum_to,
)

__all__ = ["Lion", "lion"]


class Lion(Optimizer):
    """Lion optimizer (see the module docstring).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: step size, >= 0 (default 1e-4).
        betas: (beta1 for the update interpolation, beta2 for the momentum EMA), each in [0, 1).
        weight_decay: decoupled weight decay, >= 0.
        maximize: ascend the objective instead of descending it.
        foreach: use the multi-tensor path; None picks it when all parameters sit on one
            accelerator type (torch.optim's rule).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ):
        _check_hyperparameters(lr, betas, weight_decay)
        defaults = dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, foreach=foreach
        )
        self._telemetry: dict[str, Tensor] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(
            group["lr"], group["betas"], group["weight_decay"], len(self.param_groups) - 1
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
        self._telemetry = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Lion update; `closure` optionally re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        update_sq: list[Tensor] = []
        numel = 0
        device: torch.device | None = None
        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "Lion does not support sparse gradients; use dense gradients "
                        "(e.g. nn.Embedding(sparse=False))."
                    )
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            foreach = group["foreach"] if group["foreach"] is not None else default_foreach(params)
            n_moved = lion(
                params, grads, exp_avgs,
                beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                maximize=group["maximize"], foreach=foreach,
            )
            device = device or params[0].device
            # each moved coordinate contributes lr^2 to the squared update
            update_sq.append(n_moved * group["lr"] ** 2)
            numel += sum(2 * p.numel() if torch.is_complex(p) else p.numel() for p in params)

        if numel == 0:
            self._telemetry = {}
        else:
            self._telemetry = {"update_rms": (sum_to(update_sq, device) / numel).sqrt()}
        return loss

    def telemetry(self) -> dict[str, Tensor]:
        """Statistics of the last step as 0-d device tensors: `update_rms` (RMS of lr * sign(c),
        weight decay excluded). Empty before any step."""
        return dict(self._telemetry)


def _check_hyperparameters(
    lr: Any, betas: Any, weight_decay: Any, group_index: int | None = None
) -> None:
    check_nonnegative("lr", lr, group_index)
    check_betas(betas, group_index)
    check_nonnegative("weight_decay", weight_decay, group_index)


# ----------------------------------------------------------------------------------------------
# functional API: the per-group maths, one function per implementation path


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool,
) -> Tensor:
    """Apply one Lion step to aligned tensor lists, in place.

    Returns the number of coordinates that moved (sign(c) != 0) as a float32 0-d tensor on the
    device of params[0], from which the caller derives the update RMS.
    """
    func = _multi_tensor_lion if foreach else _single_tensor_lion
    return func(
        params, grads, exp_avgs,
        beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, maximize=maximize,
    )


def _single_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    maximize: bool,
) -> Tensor:
    moved: list[Tensor] = []
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        if maximize:
            grad = -grad
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)

        param.mul_(1 - lr * weight_decay)
        update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
        param.add_(update, alpha=-lr)
        exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)

        moved.append(update.count_nonzero())
    return sum_to(moved, params[0].device)


def _multi_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    maximize: bool,
) -> Tensor:
    moved: list[Tensor] = []
    grouped = group_by_device_and_dtype([params, grads, exp_avgs])
    for (_, dtype), (d_params, d_grads, d_exp_avgs) in grouped.items():
        if maximize:
            d_grads = torch._foreach_neg(d_grads)
        d_params, d_grads, d_exp_avgs = as_real(d_params), as_real(d_grads), as_real(d_exp_avgs)

        if weight_decay != 0:
            torch._foreach_mul_(d_params, 1 - lr * weight_decay)
        updates = torch._foreach_mul(d_exp_avgs, beta1)
        torch._foreach_add_(updates, d_grads, alpha=1 - beta1)
        torch._foreach_sign_(updates)
        torch._foreach_add_(d_params, updates, alpha=-lr)
        torch._foreach_mul_(d_exp_avgs, beta2)
        torch._foreach_add_(d_exp_avgs, d_grads, alpha=1 - beta2)

        # |sign| is 1 where a coordinate moved and 0 elsewhere, so its L1 norm counts them
        moved.extend(torch._foreach_norm(updates, 1, dtype=acc_dtype(dtype)))
    return sum_to(moved, params[0].device)
