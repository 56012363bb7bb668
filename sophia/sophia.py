"""The Sophia update, written once for SophiaG and SophiaH.

Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training". Per parameter with a gradient g, each step:

    p  *= 1 - lr * weight_decay                      # decoupled weight decay
    m   = beta1 * m + (1 - beta1) * g                # no bias correction
    r   = min(|m| / denominator(h), 1)
    p  -= lr * sign(m) * r

where h is an EMA of a diagonal Hessian estimate, refreshed every few steps by `update_hessian`.
The two variants differ only in the estimate behind h and in the denominator (`Denominator`):

    SophiaG (sophiag.py): rho * bs * h + 1e-15   h = EMA of g_hat^2 (GNB estimator, always >= 0)
    SophiaH (sophiah.py): max(rho * h, eps)      h = EMA of u * (H u) (Hutchinson, may be < 0)

When r is clipped the step is exactly lr * sign(m), Lion's step size; otherwise it is the
Newton-like lr * m / (rho * curvature). The class `SophiaBase` holds everything else the two
share (state layout `step` / `exp_avg` / `hessian`, the Hessian EMA, telemetry). Below it, the
update is written once per implementation path, side by side as in torch.optim:
`_single_tensor_sophia` (the reference, one tensor at a time), `_multi_tensor_sophia`
(torch._foreach_* over a group, the same roundings) and `_fused_sophia_kernel` (compiled into one
pass over memory by `sophia._fused`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._base import GroupSums, MultiPathOptimizer
from ._common import (
    acc_dtype,
    as_real,
    check_positive,
    default_foreach,
    group_by_device_and_dtype,
    l1_l2,
    sum_to,
)
from ._fused import (
    check_fused_and_foreach,
    check_fused_supported,
    count_partials,
    partial_sums,
    run_fused,
    scalars,
    sum_of_partials,
)

__all__ = ["Denominator", "SophiaBase", "SophiaSettings", "sophia"]


class Denominator(NamedTuple):
    """What |m| is divided by: max(scale * h + shift, floor), with floor=None meaning no floor.

    SophiaG: Denominator(rho * bs, shift=1e-15); SophiaH: Denominator(rho, floor=eps).
    """

    scale: float
    shift: float = 0.0
    floor: float | None = None


class SophiaSettings(NamedTuple):
    """One param group's hyperparameters as the update reads them."""

    lr: float
    beta1: float
    weight_decay: float
    maximize: bool
    denominator: Denominator


class SophiaBase(MultiPathOptimizer):
    """Everything SophiaG and SophiaH share; not usable on its own.

    A subclass supplies its constructor, its `update_hessian` (feeding `_update_hessian_ema`) and
    its `step`, which passes its denominator rule to `_sophia_step`.
    """

    _STATE_KEYS = ("exp_avg", "hessian", "step")

    def __init__(self, params: Any, defaults: dict[str, Any]):
        # (l1, l2) of h, cached because h only changes in update_hessian and load_state_dict:
        # recomputing them at every step would be a wasted read of h.
        self._hessian_norms: tuple[Tensor, Tensor] | None = None
        super().__init__(params, defaults)

    def _check_hyperparameters(self, group: dict[str, Any], group_index: int | None) -> None:
        super()._check_hyperparameters(group, group_index)
        check_positive("rho", group["rho"], group_index)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for s in self.state.values():
            if "step" in s and not torch.is_tensor(s["step"]):  # a plain number in old pickles
                s["step"] = torch.tensor(float(s["step"]))
        self._hessian_norms = None  # h may have changed under us

    def _init_state(self, state: dict[str, Any], p: Tensor) -> dict[str, Any]:
        # The official (non-capturable) layout, so state dicts load both ways: a 0-d float32 CPU
        # step counter. `hessian` is checked on its own so that a state holding only step and
        # exp_avg still gets one.
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "hessian" not in state:
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update_hessian_ema(
        self, per_group: Iterable[tuple[dict[str, Any], list[Tensor], list[Tensor]]], square: bool
    ) -> None:
        """h = beta2 * h + (1 - beta2) * v (v * v if `square`) for each (group, hs, vs) triple."""
        for group, hessians, values in per_group:
            if not values:
                continue
            beta2 = group["betas"][1]
            foreach = group["foreach"] if group["foreach"] is not None else default_foreach(values)
            hessians, values = as_real(hessians), as_real(values)
            if foreach:
                for d_hess, d_values in group_by_device_and_dtype([hessians, values]).values():
                    torch._foreach_mul_(d_hess, beta2)
                    if square:
                        torch._foreach_addcmul_(d_hess, d_values, d_values, value=1 - beta2)
                    else:
                        torch._foreach_add_(d_hess, d_values, alpha=1 - beta2)
            else:
                for h, v in zip(hessians, values):
                    h.mul_(beta2)
                    if square:  # addcmul rather than add(v * v): the official code's rounding
                        h.addcmul_(v, v, value=1 - beta2)
                    else:
                        h.add_(v, alpha=1 - beta2)
        self._hessian_norms = self._compute_hessian_norms()

    def _compute_hessian_norms(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        hessians = [s["hessian"] for s in self.state.values() if "hessian" in s]
        if device is None:
            device = hessians[0].device if hessians else torch.device("cpu")
        foreach = self.defaults["foreach"]
        if foreach is None:
            foreach = default_foreach(hessians)
        return l1_l2(hessians, foreach, device)

    def _sophia_step(
        self,
        closure: Callable[[], Any] | None,
        denominator: Callable[[dict[str, Any]], Denominator],
    ) -> Any:
        """One step of every group, dividing by `denominator(group)`."""

        def group_update(group: dict[str, Any], tensors: list[list[Tensor]]) -> Callable[..., Any]:
            settings = SophiaSettings(
                lr=group["lr"], beta1=group["betas"][0], weight_decay=group["weight_decay"],
                maximize=group["maximize"], denominator=denominator(group),
            )
            return functools.partial(sophia, *tensors, settings)

        return self._step(closure, group_update)

    def _telemetry_from(
        self, per_group: list[tuple[dict[str, Any], GroupSums]], numel: int, device: torch.device
    ) -> dict[str, Tensor]:
        clip_frac = sum_to([clipped for _, (clipped, _) in per_group], device) / numel
        # the path functions sum r^2; the update is lr * sign(m) * r
        update_sq = sum_to([sq * group["lr"] ** 2 for group, (_, sq) in per_group], device)
        if self._hessian_norms is None:
            self._hessian_norms = self._compute_hessian_norms(device)
        hessian_l1, hessian_l2 = self._hessian_norms
        return {
            "clip_frac": clip_frac,
            "win_rate": 1.0 - clip_frac,
            "hessian_l1": hessian_l1,
            "hessian_l2": hessian_l2,
            "update_rms": (update_sq / numel).sqrt(),
        }

    def _align(
        self, estimates: Sequence[Tensor | None] | Mapping[Tensor, Tensor]
    ) -> list[Tensor | None]:
        """One estimate (or None) per parameter in param_groups order, shapes checked."""
        params = [p for group in self.param_groups for p in group["params"]]
        if isinstance(estimates, Mapping):
            by_id = {id(p): est for p, est in estimates.items()}
            if not by_id.keys() <= {id(p) for p in params}:
                raise ValueError(
                    "update_hessian got an estimate for a tensor that is not a parameter of "
                    "this optimizer; key the dict by the optimizer's own parameters."
                )
            aligned = [by_id.get(id(p)) for p in params]
        else:
            aligned = list(estimates)
            if len(aligned) != len(params):
                raise ValueError(
                    f"update_hessian got {len(aligned)} estimates for {len(params)} "
                    "parameters; pass one entry (or None) per parameter, in param_groups order."
                )
        for i, (p, est) in enumerate(zip(params, aligned)):
            if est is not None and est.shape != p.shape:
                raise ValueError(
                    f"Hessian estimate of shape {tuple(est.shape)} does not match its "
                    f"parameter's shape {tuple(p.shape)} (entry {i})."
                )
        return aligned

    def telemetry(self) -> dict[str, Tensor]:
        """Statistics of the last step as 0-d device tensors (no host sync until you read them).

        clip_frac: fraction of coordinates whose ratio was clipped (|m| >= the denominator);
        win_rate: 1 - clip_frac; hessian_l1 / hessian_l2: norms of h over all parameters;
        update_rms: RMS of lr * sign(m) * r (weight decay excluded). Empty before any step.
        """
        return super().telemetry()


# ----------------------------------------------------------------------------------------------
# functional API: the per-group maths, one function per implementation path


def sophia(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    settings: SophiaSettings,
    *,
    foreach: bool,
    fused: bool = False,
) -> tuple[Tensor, Tensor]:
    """Apply one Sophia step to aligned tensor lists, in place.

    Returns (number of clipped coordinates, sum of r^2) as float32 0-d tensors on the device of
    params[0]; the caller turns them into telemetry. `fused` selects the compiled path (it raises
    `FusedCompileError` if torch.compile fails, before touching any tensor).

    SophiaG's rule is `Denominator(rho * bs, shift=1e-15)`, SophiaH's `Denominator(rho, floor=eps)`.
    The fused path assumes the denominator is positive, as both optimizers ensure; where it is
    not (a rule without floor fed a negative h), the fused step is clipped to lr per coordinate,
    while the other paths follow the official code's unclipped |m| / d.
    """
    check_fused_and_foreach(fused, foreach, None)
    if fused:
        func = _fused_sophia
    else:
        func = _multi_tensor_sophia if foreach else _single_tensor_sophia
    # each path returns its partial sums (per tensor, or per device and dtype)
    clipped, ratio_sq = func(params, grads, exp_avgs, hessians, state_steps, settings)
    device = params[0].device
    return sum_to(clipped, device), sum_to(ratio_sq, device)


def _single_tensor_sophia(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor],
    state_steps: list[Tensor], settings: SophiaSettings,
) -> tuple[list[Tensor], list[Tensor]]:
    lr, beta1, weight_decay, maximize, denominator = settings
    clipped: list[Tensor] = []
    ratio_sq: list[Tensor] = []
    for param, grad, exp_avg, hess, step_t in zip(params, grads, exp_avgs, hessians, state_steps):
        if maximize:
            grad = -grad
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, hess = torch.view_as_real(exp_avg), torch.view_as_real(hess)

        step_t += 1
        param.mul_(1 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        denom = hess * denominator.scale
        if denominator.shift:
            denom.add_(denominator.shift)
        if denominator.floor is not None:
            denom.clamp_(min=denominator.floor)
        ratio = (exp_avg.abs() / denom).clamp(None, 1)
        param.addcmul_(exp_avg.sign(), ratio, value=-lr)

        clipped.append((ratio >= 1).sum())
        ratio_sq.append(ratio.to(acc_dtype(ratio.dtype)).square().sum())
    return clipped, ratio_sq


def _multi_tensor_sophia(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor],
    state_steps: list[Tensor], settings: SophiaSettings,
) -> tuple[list[Tensor], list[Tensor]]:
    lr, beta1, weight_decay, maximize, denominator = settings
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, hessians, state_steps])
    clipped: list[Tensor] = []
    ratio_sq: list[Tensor] = []
    for (_, dtype), (d_params, d_grads, d_exp_avgs, d_hess, d_steps) in grouped.items():
        if maximize:
            d_grads = torch._foreach_neg(d_grads)
        d_params, d_grads = as_real(d_params), as_real(d_grads)
        d_exp_avgs, d_hess = as_real(d_exp_avgs), as_real(d_hess)

        torch._foreach_add_(d_steps, 1)
        if weight_decay != 0:
            torch._foreach_mul_(d_params, 1 - lr * weight_decay)
        # mul + add rather than lerp: the same roundings as the reference path
        torch._foreach_mul_(d_exp_avgs, beta1)
        torch._foreach_add_(d_exp_avgs, d_grads, alpha=1 - beta1)

        denom = torch._foreach_mul(d_hess, denominator.scale)
        if denominator.shift:
            torch._foreach_add_(denom, denominator.shift)
        if denominator.floor is not None:
            torch._foreach_clamp_min_(denom, denominator.floor)
        ratio = torch._foreach_abs(d_exp_avgs)
        torch._foreach_div_(ratio, denom)
        del denom
        torch._foreach_clamp_max_(ratio, 1.0)
        signs = torch._foreach_sign(d_exp_avgs)
        torch._foreach_addcmul_(d_params, signs, ratio, value=-lr)
        del signs

        ratio_sq.extend(n.square() for n in torch._foreach_norm(ratio, 2, dtype=acc_dtype(dtype)))
        # ratio is in [0, 1] with 1 exactly where clipped, so floor() is the clip indicator
        torch._foreach_floor_(ratio)
        clipped.extend(torch._foreach_norm(ratio, 1, dtype=acc_dtype(dtype)))
    return clipped, ratio_sq


def _fused_sophia(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor],
    state_steps: list[Tensor], settings: SophiaSettings,
) -> tuple[list[Tensor], list[Tensor]]:
    check_fused_supported(params, "Sophia")
    lr, beta1, weight_decay, maximize, denominator = settings
    floor = float("-inf") if denominator.floor is None else denominator.floor
    # which parts of the denominator rule apply, exactly as the reference path decides
    flags = (bool(denominator.shift), denominator.floor is not None)
    clipped: list[Tensor] = []
    ratio_sq: list[Tensor] = []
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, hessians])
    for (device, dtype), tensorlists in grouped.items():
        # the scalars the reference path hands its eager ops, computed the same way in Python
        hyper = scalars(
            device, dtype, -1.0 if maximize else 1.0, 1 - lr * weight_decay, beta1, 1 - beta1,
            denominator.scale, denominator.shift, floor, -lr,
        )
        for n, sq in run_fused(_fused_sophia_kernel, tensorlists, hyper, flags, "Sophia"):
            clipped.append(n)
            ratio_sq.append(sq)
    # after the kernels, so that a compile failure leaves every tensor as it was
    torch._foreach_add_(state_steps, 1)
    return clipped, ratio_sq


def _fused_sophia_kernel(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor],
    grad_sign: Tensor, decay: Tensor, beta1: Tensor, one_minus_beta1: Tensor,
    denom_scale: Tensor, denom_shift: Tensor, denom_floor: Tensor, neg_lr: Tensor,
    has_shift: bool, has_floor: bool,
) -> tuple[Tensor, Tensor]:
    # Compiled by sophia._fused: inductor turns each parameter's chain, telemetry sums included,
    # into one loop that reads p, g, m, h once and writes p, m once (24 bytes per fp32 coordinate).
    # Every hyperparameter is a tensor so that a changing lr or bs, other betas or rho, and
    # maximize (grad_sign = -1 / +1, exact) reuse the compiled kernel. The shift and the floor
    # are Python flags, as in the reference path: a no-op clamp at -inf still costs a max, a NaN
    # check and a blend per vector.
    # For a positive denominator d, u = clamp(m / d, -1, 1) equals sign(m) * min(|m| / d, 1)
    # bit for bit ((-a) / d == -(a / d)), and it saves the sign's two compares and blends.
    # Both optimizers keep d > 0: SophiaH floors it at eps > 0, SophiaG
    # refuses negative estimates and state (its h is otherwise an EMA of squares).
    # A coordinate was clipped exactly when u^2 >= 1 (|u| = 1; the largest float below 1
    # squares to below 1), so the clip count reuses the square the r^2 sum needs.
    # Under inductor's default heuristics, exact rewrites such as grad * (grad_sign * (1 -
    # beta1)) made it store m from a second loop that read g and m again; sophia._fused
    # compiles with a handler that prevents that, and tests/test_fused.py checks that every
    # tensor is read once and written once.
    clipped = []
    ratio_sq = []
    for param, grad, exp_avg, hess in zip(params, grads, exp_avgs, hessians):
        exp_avg.mul_(beta1).add_(grad * grad_sign * one_minus_beta1)
        denom = hess * denom_scale
        if has_shift:
            denom = denom + denom_shift
        if has_floor:
            denom = denom.clamp(min=denom_floor)
        u = (exp_avg / denom).clamp(-1, 1)
        param.mul_(decay).add_(u * neg_lr)
        u_sq = u.to(acc_dtype(u.dtype)).square()
        clipped.append(count_partials(u_sq >= 1))
        ratio_sq.append(partial_sums(u_sq))
    return sum_of_partials(clipped).float(), sum_of_partials(ratio_sq).float()
