"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

Reproduces `lion_pytorch.Lion` (the widely used reference) to float rounding, with the same state
layout (`exp_avg` only), plus a multi-tensor path, a fused (compiled) path and telemetry. Per
parameter with gradient g:

    c  = beta1 * m + (1 - beta1) * g
    p *= 1 - lr * weight_decay
    p -= lr * sign(c)
    m  = beta2 * m + (1 - beta2) * g

Every coordinate moves by exactly lr (or 0), so Lion wants an lr 3-10x below AdamW's and a weight
decay 3-10x above it to keep the same effective decay lr * weight_decay.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._base import GroupSums, MultiPathOptimizer
from ._common import acc_dtype, as_real, group_by_device_and_dtype, sum_to
from ._fused import (
    check_fused_and_foreach,
    check_fused_supported,
    count_partials,
    run_fused,
    scalars,
    sum_of_partials,
)

__all__ = ["Lion", "lion"]


class Lion(MultiPathOptimizer):
    """Lion optimizer (see the module docstring).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: step size, >= 0 (default 1e-4).
        betas: (beta1 for the update interpolation, beta2 for the momentum EMA), each in [0, 1).
        weight_decay: decoupled weight decay, >= 0.
        maximize, foreach, fused: as for `sophia.SophiaG`: ascend instead of descend, and the
            implementation path (reference, multi-tensor or compiled; None picks).
    """

    _STATE_KEYS = ("exp_avg",)

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
        *, maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
    ):
        super().__init__(params, dict(
            lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
            foreach=foreach, fused=fused,
        ))

    def _init_state(self, state: dict[str, Any], p: Tensor) -> dict[str, Any]:
        # lion_pytorch's layout (exp_avg only), so state dicts load both ways
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Lion update; `closure` optionally re-evaluates the model and returns the loss."""

        def group_update(group: dict[str, Any], tensors: list[list[Tensor]]) -> Callable[..., Any]:
            beta1, beta2 = group["betas"]
            return functools.partial(
                lion, *tensors, beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], maximize=group["maximize"],
            )

        return self._step(closure, group_update)

    def _telemetry_from(
        self, per_group: list[tuple[dict[str, Any], GroupSums]], numel: int, device: torch.device
    ) -> dict[str, Tensor]:
        # each moved coordinate contributes lr^2 to the squared update
        update_sq = sum_to([n_moved * group["lr"] ** 2 for group, n_moved in per_group], device)
        return {"update_rms": (update_sq / numel).sqrt()}

    def telemetry(self) -> dict[str, Tensor]:
        """Statistics of the last step as 0-d device tensors: `update_rms` (RMS of lr * sign(c),
        weight decay excluded). Empty before any step."""
        return super().telemetry()


# ----------------------------------------------------------------------------------------------
# functional API: the per-group maths, one function per implementation path


class _LionSettings(NamedTuple):
    """One param group's hyperparameters as the path functions read them."""

    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    maximize: bool


def lion(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, beta1: float,
    beta2: float, lr: float, weight_decay: float, maximize: bool, foreach: bool,
    fused: bool = False,
) -> Tensor:
    """Apply one Lion step to aligned tensor lists, in place.

    Returns the number of coordinates that moved (sign(c) != 0) as a float32 0-d tensor on the
    device of params[0], from which the caller derives the update RMS. `fused` selects the
    compiled path (it raises `FusedCompileError` if torch.compile fails, before touching any
    tensor).
    """
    check_fused_and_foreach(fused, foreach, None)
    if fused:
        func = _fused_lion
    else:
        func = _multi_tensor_lion if foreach else _single_tensor_lion
    # each path returns its partial counts (per tensor, or per device and dtype)
    moved = func(params, grads, exp_avgs, _LionSettings(lr, beta1, beta2, weight_decay, maximize))
    return sum_to(moved, params[0].device)


def _single_tensor_lion(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], settings: _LionSettings
) -> list[Tensor]:
    lr, beta1, beta2, weight_decay, maximize = settings
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
    return moved


def _multi_tensor_lion(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], settings: _LionSettings
) -> list[Tensor]:
    lr, beta1, beta2, weight_decay, maximize = settings
    grouped = group_by_device_and_dtype([params, grads, exp_avgs])
    moved: list[Tensor] = []
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
    return moved


def _fused_lion(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], settings: _LionSettings
) -> list[Tensor]:
    check_fused_supported(params, "Lion")
    lr, beta1, beta2, weight_decay, maximize = settings
    moved: list[Tensor] = []
    grouped = group_by_device_and_dtype([params, grads, exp_avgs])
    for (device, dtype), tensorlists in grouped.items():
        hyper = scalars(
            device, dtype, -1.0 if maximize else 1.0, 1 - lr * weight_decay, beta1, 1 - beta1,
            beta2, 1 - beta2, -lr,
        )
        moved.extend(run_fused(_fused_lion_kernel, tensorlists, hyper, optimizer="Lion"))
    return moved


def _fused_lion_kernel(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    grad_sign: Tensor, decay: Tensor, beta1: Tensor, one_minus_beta1: Tensor,
    beta2: Tensor, one_minus_beta2: Tensor, neg_lr: Tensor,
) -> Tensor:
    # Compiled by sophia._fused into one pass per parameter: reads p, g, m, writes p, m
    # (20 bytes per fp32 coordinate); maximize arrives as grad_sign = -1 / +1 (exact).
    moved = []
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        grad = grad * grad_sign
        param.mul_(decay)
        update = (exp_avg * beta1 + grad * one_minus_beta1).sign()
        param.add_(update * neg_lr)  # update is +-1 or 0: same as alpha=-lr
        exp_avg.mul_(beta2).add_(grad * one_minus_beta2)
        moved.append(count_partials(update != 0))
    return sum_of_partials(moved).float()
