"""SophiaH: Sophia with the Hutchinson diagonal Hessian estimator.

Same clipped sign-momentum update as SophiaG, but h is an EMA of Hutchinson estimates u * (H u)
(u Rademacher, see `sophia.hessian.hutchinson`) of the Hessian of the mean loss. Those estimates
can be negative, so the denominator is floored at eps, and no batch-size factor applies:

    p  *= 1 - lr * weight_decay
    m   = beta1 * m + (1 - beta1) * g
    r   = min(|m| / max(rho * h, eps), 1)
    p  -= lr * sign(m) * r

`update_hessian(estimates)` does `h = beta2 * h + (1 - beta2) * estimate` per parameter.
State keys (`step`, `exp_avg`, `hessian`) and layout are SophiaG's.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (
    acc_dtype,
    as_real,
    check_betas,
    check_nonnegative,
    check_positive,
    default_foreach,
    group_by_device_and_dtype,
    l1_l2,
    sophia_telemetry,
    sum_to,
)
from ._fused import (
    FusedCompileError,
    check_fused_and_foreach,
    check_fused_supported,
    choose_path,
    count_true,
    run_fused,
    scalars,
    warn_fallback,
)

__all__ = ["SophiaH", "sophiah"]


class SophiaH(Optimizer):
    """SophiaH optimizer (see the module docstring).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: step size; a clipped coordinate moves by exactly `lr` (default 1e-4).
        betas: (beta1 for the gradient EMA, beta2 for the Hessian EMA), each in [0, 1).
        rho: clipping threshold scale, > 0. It multiplies the Hessian of the mean loss, the same
            quantity SophiaG's rho * bs * g_hat^2 estimates, so values carry over.
        weight_decay: decoupled weight decay, >= 0.
        eps: floor of the denominator, > 0; guards against zero and negative curvature.
        maximize: ascend the objective instead of descending it.
        foreach: use the multi-tensor path; None picks it when all parameters sit on one
            accelerator type (torch.optim's rule).
        fused: use the compiled single-pass step (torch.compile; telemetry in the same pass).
            None picks it on CUDA and for big CPU groups (see `sophia.SophiaG`); fused=True
            raises if it cannot compile, None warns and falls back. Excludes foreach=True.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        _check_hyperparameters(lr, betas, rho, weight_decay, eps)
        check_fused_and_foreach(fused, foreach, None)
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
            maximize=maximize, foreach=foreach, fused=fused,
        )
        self._telemetry: dict[str, Tensor] = {}
        self._hessian_norms: tuple[Tensor, Tensor] | None = None
        self._fused_failed = False  # fused=None saw a compile failure: stop trying
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(
            group["lr"], group["betas"], group["rho"], group["weight_decay"], group["eps"],
            group_index=len(self.param_groups) - 1,
        )
        check_fused_and_foreach(group["fused"], group["foreach"], len(self.param_groups) - 1)
        if group["fused"]:
            check_fused_supported(group["params"], "SophiaH")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("eps", 1e-15)
        for s in self.state.values():
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]))
        self._telemetry = {}
        self._hessian_norms = None
        self._fused_failed = getattr(self, "_fused_failed", False)

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
        all_params = [p for group in self.param_groups for p in group["params"]]
        if isinstance(estimates, Mapping):
            known = {id(p) for p in all_params}
            for p in estimates:
                if id(p) not in known:
                    raise ValueError(
                        "update_hessian got an estimate for a tensor that is not a parameter of "
                        "this optimizer; key the dict by the optimizer's own parameters."
                    )
            by_id = {id(p): est for p, est in estimates.items()}
            aligned = [by_id.get(id(p)) for p in all_params]
        else:
            aligned = list(estimates)
            if len(aligned) != len(all_params):
                raise ValueError(
                    f"update_hessian got {len(aligned)} estimates for {len(all_params)} "
                    "parameters; pass one entry (or None) per parameter, in param_groups order."
                )

        i = 0
        for group in self.param_groups:
            _, beta2 = group["betas"]
            ests, hessians = [], []
            for p in group["params"]:
                est = aligned[i]
                i += 1
                if est is None:
                    continue
                if est.shape != p.shape:
                    raise ValueError(
                        f"Hessian estimate of shape {tuple(est.shape)} does not match its "
                        f"parameter's shape {tuple(p.shape)} (entry {i - 1})."
                    )
                ests.append(est.detach())
                hessians.append(_init_state(self.state[p], p)["hessian"])
            if not ests:
                continue
            foreach = group["foreach"] if group["foreach"] is not None else default_foreach(ests)
            ests, hessians = as_real(ests), as_real(hessians)
            if foreach:
                for (_, _), (d_hess, d_ests) in group_by_device_and_dtype([hessians, ests]).items():
                    torch._foreach_mul_(d_hess, beta2)
                    torch._foreach_add_(d_hess, d_ests, alpha=1 - beta2)
            else:
                for h, est in zip(hessians, ests):
                    h.mul_(beta2).add_(est, alpha=1 - beta2)
        self._hessian_norms = self._compute_hessian_norms()

    def _compute_hessian_norms(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        # Cached between Hessian refreshes, as in SophiaG: h changes only in update_hessian.
        hessians = [s["hessian"] for s in self.state.values() if "hessian" in s]
        if device is None:
            device = hessians[0].device if hessians else torch.device("cpu")
        foreach = self.defaults["foreach"]
        if foreach is None:
            foreach = default_foreach(hessians)
        return l1_l2(hessians, foreach, device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SophiaH update; `closure` optionally re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        clipped: list[Tensor] = []
        update_sq: list[Tensor] = []
        numel = 0
        device: torch.device | None = None
        for group in self.param_groups:
            params, grads, exp_avgs, hessians, state_steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "SophiaH does not support sparse gradients; use dense gradients "
                        "(e.g. nn.Embedding(sparse=False))."
                    )
                state = _init_state(self.state[p], p)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                hessians.append(state["hessian"])
                state_steps.append(state["step"])
            if not params:
                continue
            beta1, _ = group["betas"]
            foreach, fused = choose_path(group, params, allow_fused=not self._fused_failed)

            update = functools.partial(
                sophiah,
                params, grads, exp_avgs, hessians, state_steps,
                beta1=beta1, rho=group["rho"], lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"],
            )

            try:
                n_clipped, ratio_sq = update(foreach=foreach, fused=fused)
            except FusedCompileError as err:
                if group["fused"]:  # asked for explicitly: the caller should know
                    raise
                warn_fallback("SophiaH", err)
                self._fused_failed = True
                foreach, _ = choose_path(group, params, allow_fused=False)
                n_clipped, ratio_sq = update(foreach=foreach, fused=False)
            device = device or params[0].device
            clipped.append(n_clipped)
            update_sq.append(ratio_sq * group["lr"] ** 2)
            numel += sum(2 * p.numel() if torch.is_complex(p) else p.numel() for p in params)

        if numel == 0:
            self._telemetry = {}
            return loss
        if self._hessian_norms is None:
            self._hessian_norms = self._compute_hessian_norms(device)
        self._telemetry = sophia_telemetry(
            sum_to(clipped, device), sum_to(update_sq, device), numel, *self._hessian_norms
        )
        return loss

    def telemetry(self) -> dict[str, Tensor]:
        """Statistics of the last step as 0-d device tensors (no host sync until you read them).

        clip_frac: fraction of coordinates whose update was clipped (|m| >= max(rho * h, eps));
        win_rate: 1 - clip_frac; hessian_l1 / hessian_l2: norms of h over all parameters;
        update_rms: RMS of lr * sign(m) * ratio (weight decay excluded). Empty before any step.
        """
        return dict(self._telemetry)


def _check_hyperparameters(
    lr: Any, betas: Any, rho: Any, weight_decay: Any, eps: Any, group_index: int | None = None
) -> None:
    check_nonnegative("lr", lr, group_index)
    check_betas(betas, group_index)
    check_positive("rho", rho, group_index)
    check_nonnegative("weight_decay", weight_decay, group_index)
    check_positive("eps", eps, group_index)


def _init_state(state: dict[str, Any], p: Tensor) -> dict[str, Any]:
    if len(state) == 0:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if "hessian" not in state:
        state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


# ----------------------------------------------------------------------------------------------
# functional API: the per-group maths, one function per implementation path


def sophiah(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    foreach: bool,
    fused: bool = False,
) -> tuple[Tensor, Tensor]:
    """Apply one SophiaH step to aligned tensor lists, in place.

    Returns (number of clipped coordinates, sum of ratio^2) as float32 0-d tensors on the device
    of params[0]; the caller turns them into telemetry. `fused` selects the compiled path (it
    raises `FusedCompileError` if torch.compile fails, before touching any tensor).
    """
    check_fused_and_foreach(fused, foreach, None)
    if fused:
        func = _fused_sophiah
    else:
        func = _multi_tensor_sophiah if foreach else _single_tensor_sophiah
    return func(
        params, grads, exp_avgs, hessians, state_steps,
        beta1=beta1, rho=rho, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize,
    )


def _single_tensor_sophiah(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> tuple[Tensor, Tensor]:
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
        ratio = (exp_avg.abs() / (rho * hess).clamp(min=eps)).clamp(None, 1)
        param.addcmul_(exp_avg.sign(), ratio, value=-lr)

        clipped.append((ratio >= 1).sum())
        ratio_sq.append(ratio.to(acc_dtype(ratio.dtype)).square().sum())
    device = params[0].device
    return sum_to(clipped, device), sum_to(ratio_sq, device)


def _multi_tensor_sophiah(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> tuple[Tensor, Tensor]:
    clipped: list[Tensor] = []
    ratio_sq: list[Tensor] = []
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, hessians, state_steps])
    for (_, dtype), (d_params, d_grads, d_exp_avgs, d_hess, d_steps) in grouped.items():
        if maximize:
            d_grads = torch._foreach_neg(d_grads)
        d_params, d_grads = as_real(d_params), as_real(d_grads)
        d_exp_avgs, d_hess = as_real(d_exp_avgs), as_real(d_hess)

        torch._foreach_add_(d_steps, 1)
        if weight_decay != 0:
            torch._foreach_mul_(d_params, 1 - lr * weight_decay)
        torch._foreach_mul_(d_exp_avgs, beta1)
        torch._foreach_add_(d_exp_avgs, d_grads, alpha=1 - beta1)

        denom = torch._foreach_mul(d_hess, rho)
        torch._foreach_clamp_min_(denom, eps)
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
    device = params[0].device
    return sum_to(clipped, device), sum_to(ratio_sq, device)


def _fused_sophiah(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> tuple[Tensor, Tensor]:
    check_fused_supported(params, "SophiaH")
    clipped: list[Tensor] = []
    ratio_sq: list[Tensor] = []
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, hessians])
    for (device, dtype), tensorlists in grouped.items():
        hyper = scalars(
            device, dtype, -1.0 if maximize else 1.0, 1 - lr * weight_decay, beta1, 1 - beta1,
            rho, eps, -lr,
        )
        n, sq = run_fused(_fused_sophiah_kernel, tensorlists, hyper, optimizer="SophiaH")
        clipped.append(n)
        ratio_sq.append(sq)
    torch._foreach_add_(state_steps, 1)  # after the kernels: a compile failure changes nothing
    device = params[0].device
    return sum_to(clipped, device), sum_to(ratio_sq, device)


def _fused_sophiah_kernel(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    grad_sign: Tensor,
    decay: Tensor,
    beta1: Tensor,
    one_minus_beta1: Tensor,
    rho: Tensor,
    eps: Tensor,
    neg_lr: Tensor,
) -> tuple[Tensor, Tensor]:
    # Compiled by sophia._fused into one pass per parameter (see _fused_sophiag_kernel).
    clipped = []
    ratio_sq = []
    for param, grad, exp_avg, hess in zip(params, grads, exp_avgs, hessians):
        param.mul_(decay)
        exp_avg.mul_(beta1).add_(grad * grad_sign * one_minus_beta1)
        ratio = (exp_avg.abs() / (hess * rho).clamp(min=eps)).clamp(max=1)
        param.addcmul_(exp_avg.sign(), ratio * neg_lr)
        clipped.append(count_true(ratio >= 1))
        ratio_sq.append(ratio.to(acc_dtype(ratio.dtype)).square().sum())
    return torch.stack(clipped).sum().float(), torch.stack(ratio_sq).sum().float()
