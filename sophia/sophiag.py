"""SophiaG: Sophia with the Gauss-Newton-Bartlett (GNB) diagonal Hessian estimator.

Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training". This file reproduces the official implementation (PyPI `sophia-opt`) to float
rounding, state-dict compatible in both directions, and adds a multi-tensor path, a fused
(compiled) path and telemetry.

Per parameter with a gradient g, each `step(bs=B)`:

    p  *= 1 - lr * weight_decay                      # decoupled weight decay
    m   = beta1 * m + (1 - beta1) * g                # no bias correction
    r   = min(|m| / (rho * B * h + 1e-15), 1)
    p  -= lr * sign(m) * r

and `update_hessian()` does `h = beta2 * h + (1 - beta2) * g * g` with whatever gradient the caller
left in `.grad`: the gradient of the loss against labels sampled from the model (see
`sophia.hessian.gnb_loss`). The GNB estimate is B * g_hat^2; the state keeps g_hat^2 and B enters
the denominator, so B must be the real number of tokens the sampled loss was averaged over.

About lr: the code's `lr` is the paper's rho * eta. When the ratio is clipped the update is
`lr * sign(m)`, exactly Lion's step size, so SophiaG learning rates are comparable with Lion's,
not AdamW's. `paper_to_code_lr` converts.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (
    acc_dtype,
    as_real,
    check_batch_size,
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

__all__ = ["SophiaG", "sophiag", "paper_to_code_lr", "code_to_paper_lr"]

# Added to the denominator exactly as the official code does; keeps 0/0 at 0 while h is still 0.
_DENOM_EPS = 1e-15


def paper_to_code_lr(eta: float, rho: float) -> float:
    """Convert the paper's step size eta to this code's `lr`.

    The paper's update is eta * clip(m / max(h, eps), rho) = eta * rho * clip(m / (rho * h), 1),
    so the code's lr is rho * eta (`code_to_paper_lr` is the inverse).
    """
    return rho * eta


def code_to_paper_lr(lr: float, rho: float) -> float:
    """Inverse of `paper_to_code_lr`: the paper's eta for this code's (lr, rho)."""
    return lr / rho


class SophiaG(Optimizer):
    """SophiaG optimizer (official semantics, see the module docstring).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: step size; a clipped coordinate moves by exactly `lr` (default 1e-4).
        betas: (beta1 for the gradient EMA, beta2 for the Hessian EMA), each in [0, 1).
        rho: clipping threshold scale, > 0 (paper: 0.03-0.08 at GPT-2 scale).
        weight_decay: decoupled weight decay, >= 0.
        maximize: ascend the objective instead of descending it.
        foreach: use the multi-tensor path; None picks it when all parameters sit on one
            accelerator type (torch.optim's rule).
        fused: use the compiled single-pass step (torch.compile; telemetry in the same pass).
            None picks it per param group on CUDA (with Triton), and on CPU for groups of at
            least 2**24 parameters, where it repays its compile time (docs/benchmarks.md);
            otherwise `foreach`'s rule applies. Under None a compile failure warns and falls
            back; fused=True raises instead. Excludes foreach=True.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        _check_hyperparameters(lr, betas, rho, weight_decay)
        check_fused_and_foreach(fused, foreach, None)
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay,
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
            group["lr"], group["betas"], group["rho"], group["weight_decay"],
            group_index=len(self.param_groups) - 1,
        )
        check_fused_and_foreach(group["fused"], group["foreach"], len(self.param_groups) - 1)
        if group["fused"]:
            check_fused_supported(group["params"], "SophiaG")

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict and unpickling; groups saved by the official code lack our keys.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
        for s in self.state.values():
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]))
        self._telemetry = {}
        self._hessian_norms = None  # h may have changed under us
        self._fused_failed = getattr(self, "_fused_failed", False)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        hessians: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "SophiaG does not support sparse gradients; use dense gradients "
                    "(e.g. nn.Embedding(sparse=False))."
                )
            state = _init_state(self.state[p], p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            hessians.append(state["hessian"])
            state_steps.append(state["step"])

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h = beta2 * h + (1 - beta2) * g * g for every parameter whose .grad is set.

        Call it right after backward of the sampled-label loss (`sophia.hessian.gnb_loss`).
        """
        for group in self.param_groups:
            _, beta2 = group["betas"]
            grads, hessians = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients.")
                state = _init_state(self.state[p], p)
                grads.append(p.grad)
                hessians.append(state["hessian"])
            if not grads:
                continue
            foreach = group["foreach"] if group["foreach"] is not None else default_foreach(grads)
            grads, hessians = as_real(grads), as_real(hessians)
            if foreach:
                grouped = group_by_device_and_dtype([grads, hessians])
                for (_, _), (d_grads, d_hess) in grouped.items():
                    torch._foreach_mul_(d_hess, beta2)
                    torch._foreach_addcmul_(d_hess, d_grads, d_grads, value=1 - beta2)
            else:
                for g, h in zip(grads, hessians):
                    h.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        self._hessian_norms = self._compute_hessian_norms()

    def _compute_hessian_norms(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        # Cached between Hessian refreshes: h only changes in update_hessian / load_state_dict, so
        # recomputing its norms at every step would be a wasted read of h.
        hessians = [s["hessian"] for s in self.state.values() if "hessian" in s]
        if device is None:
            device = hessians[0].device if hessians else torch.device("cpu")
        foreach = self.defaults["foreach"]
        if foreach is None:
            foreach = default_foreach(hessians)
        return l1_l2(hessians, foreach, device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, bs: int = 5120) -> Any:
        """One SophiaG update.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            bs: number of tokens the sampled-label loss of the last `update_hessian` was averaged
                over (the B of the GNB estimator B * g_hat^2). Derive it from the real Hessian
                batch; the official default 5120 is only a placeholder.
        """
        check_batch_size(bs)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        clipped: list[Tensor] = []
        update_sq: list[Tensor] = []
        numel = 0
        device: torch.device | None = None
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            hessians: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, hessians, state_steps)
            if not params:
                continue
            beta1, _ = group["betas"]
            foreach, fused = choose_path(group, params, allow_fused=not self._fused_failed)

            update = functools.partial(
                sophiag,
                params, grads, exp_avgs, hessians, state_steps,
                bs=bs, beta1=beta1, rho=group["rho"], lr=group["lr"],
                weight_decay=group["weight_decay"], maximize=group["maximize"],
            )

            try:
                n_clipped, ratio_sq = update(foreach=foreach, fused=fused)
            except FusedCompileError as err:
                if group["fused"]:  # asked for explicitly: the caller should know
                    raise
                warn_fallback("SophiaG", err)
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

        clip_frac: fraction of coordinates whose update was clipped (|m| >= rho * bs * h);
        win_rate: 1 - clip_frac; hessian_l1 / hessian_l2: norms of h over all parameters;
        update_rms: RMS of lr * sign(m) * ratio (weight decay excluded). Empty before any step.
        """
        return dict(self._telemetry)


def _check_hyperparameters(
    lr: Any, betas: Any, rho: Any, weight_decay: Any, group_index: int | None = None
) -> None:
    check_nonnegative("lr", lr, group_index)
    check_betas(betas, group_index)
    check_positive("rho", rho, group_index)
    check_nonnegative("weight_decay", weight_decay, group_index)


def _init_state(state: dict[str, Any], p: Tensor) -> dict[str, Any]:
    # Same layout as the official (non-capturable) code: a 0-d float32 CPU step counter.
    if len(state) == 0:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if "hessian" not in state:
        state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


# ----------------------------------------------------------------------------------------------
# functional API: the per-group maths, one function per implementation path


def sophiag(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    bs: float,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool,
    fused: bool = False,
) -> tuple[Tensor, Tensor]:
    """Apply one SophiaG step to aligned tensor lists, in place.

    Returns (number of clipped coordinates, sum of ratio^2) as float32 0-d tensors on the device
    of params[0]; the caller turns them into telemetry. `fused` selects the compiled path (it
    raises `FusedCompileError` if torch.compile fails, before touching any tensor).
    """
    check_fused_and_foreach(fused, foreach, None)
    if fused:
        func = _fused_sophiag
    else:
        func = _multi_tensor_sophiag if foreach else _single_tensor_sophiag
    return func(
        params, grads, exp_avgs, hessians, state_steps,
        bs=bs, beta1=beta1, rho=rho, lr=lr, weight_decay=weight_decay, maximize=maximize,
    )


def _single_tensor_sophiag(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    bs: float,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
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
        ratio = (exp_avg.abs() / (rho * bs * hess + _DENOM_EPS)).clamp(None, 1)
        param.addcmul_(exp_avg.sign(), ratio, value=-lr)

        clipped.append((ratio >= 1).sum())
        ratio_sq.append(ratio.to(acc_dtype(ratio.dtype)).square().sum())
    device = params[0].device
    return sum_to(clipped, device), sum_to(ratio_sq, device)


def _multi_tensor_sophiag(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    bs: float,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
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
        # mul + add rather than lerp: the same roundings as the official per-tensor code
        torch._foreach_mul_(d_exp_avgs, beta1)
        torch._foreach_add_(d_exp_avgs, d_grads, alpha=1 - beta1)

        denom = torch._foreach_mul(d_hess, rho * bs)
        torch._foreach_add_(denom, _DENOM_EPS)
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


def _fused_sophiag(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    state_steps: list[Tensor],
    *,
    bs: float,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
    maximize: bool,
) -> tuple[Tensor, Tensor]:
    check_fused_supported(params, "SophiaG")
    clipped: list[Tensor] = []
    ratio_sq: list[Tensor] = []
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, hessians])
    for (device, dtype), tensorlists in grouped.items():
        # the scalars the reference path hands its eager ops, computed the same way in Python
        hyper = scalars(
            device, dtype, -1.0 if maximize else 1.0, 1 - lr * weight_decay, beta1, 1 - beta1,
            rho * bs, -lr,
        )
        n, sq = run_fused(_fused_sophiag_kernel, tensorlists, hyper, optimizer="SophiaG")
        clipped.append(n)
        ratio_sq.append(sq)
    # after the kernels, so that a compile failure leaves every tensor as it was
    torch._foreach_add_(state_steps, 1)
    device = params[0].device
    return sum_to(clipped, device), sum_to(ratio_sq, device)


def _fused_sophiag_kernel(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    grad_sign: Tensor,
    decay: Tensor,
    beta1: Tensor,
    one_minus_beta1: Tensor,
    denom_scale: Tensor,
    neg_lr: Tensor,
) -> tuple[Tensor, Tensor]:
    # Compiled by sophia._fused: inductor turns each parameter's chain, telemetry sums included,
    # into one loop that reads p, g, m, h once and writes p, m once (24 bytes per fp32 coordinate).
    # maximize arrives as grad_sign = -1 / +1 (exact), so groups differing only in maximize share
    # one compiled kernel.
    clipped = []
    ratio_sq = []
    for param, grad, exp_avg, hess in zip(params, grads, exp_avgs, hessians):
        param.mul_(decay)
        exp_avg.mul_(beta1).add_(grad * grad_sign * one_minus_beta1)
        ratio = (exp_avg.abs() / (hess * denom_scale + _DENOM_EPS)).clamp(max=1)
        param.addcmul_(exp_avg.sign(), ratio * neg_lr)  # sign is +-1 or 0: same as value=-lr
        clipped.append(count_true(ratio >= 1))
        ratio_sq.append(ratio.to(acc_dtype(ratio.dtype)).square().sum())
    return torch.stack(clipped).sum().float(), torch.stack(ratio_sq).sum().float()
