"""SOAP: Shampoo with Adam in the Preconditioner's eigenbasis (Vyas et al. 2024, arXiv 2409.11321).

Shampoo with power 1/2 equals Adafactor run in the eigenbasis of Shampoo's two Kronecker factors;
SOAP runs full Adam in that eigenbasis instead and refreshes the basis only every
`precondition_frequency` updates, by one power-iteration step followed by a QR decomposition. For
a weight matrix W (m x n) with gradient G, one update is:

    G' = Q_L^T G Q_R                                 rotate the gradient into the eigenbasis
    M  = beta1 * M + (1 - beta1) * G                 first moment, kept in W's own basis
    V  = beta2 * V + (1 - beta2) * G'^2              second moment, kept in the eigenbasis
    U  = Q_L ((Q_L^T M Q_R) / (sqrt(V) + eps)) Q_R^T Adam's direction, rotated back
    W -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * U
    W *= 1 - lr * weight_decay                       decoupled decay, after the update
    L  = s * L + (1 - s) * G G^T,   R = s * R + (1 - s) * G^T G     (s = shampoo_beta)
    every precondition_frequency updates: Q <- qr(L Q) for Q_L, likewise for Q_R

The factors are updated after the parameter, so a gradient never enters its own projection. A
parameter's first gradient only builds L, R and their eigenvectors (torch.linalg.eigh) and moves
nothing: the official implementation and pytorch_optimizer's both skip the update there, and so
does this one. A side longer than `max_precond_dim` (GPT-2's 50257-token embedding) has no
factor and keeps the identity basis; so do 1-D tensors (biases, norm gains) unless
`precondition_1d` is set, which makes SOAP plain Adam (with the decay above) on them. Every
dimension of a tensor gets its own factor, or every run of adjacent dimensions with `merge_dims`.

Reproduces `pytorch_optimizer.SOAP` (4.1.0): the same operations in the same order, which
tests/test_soap.py checks (with merge_dims, pytorch_optimizer fails on a tensor that merges into
a single dimension; this file merges it as the official code does). The official code
(github.com/nikhilvyas/SOAP) computes the same update, except that it keeps the factors in
float32 whatever the parameter's dtype and divides `normalize_grads` by RMS + 1e-30 where this
file, like pytorch_optimizer, uses RMS + eps. The defaults are the official code's; its README
recommends the same lr 3e-3, betas (0.95, 0.95), weight decay 0.01, precondition_frequency 10.

Cost per m x n matrix: the factors and their bases take 2 (m^2 + n^2) extra floats; each update
does eight matrix products (G and M into the eigenbasis, the update back, two factor updates) and
each refresh two more plus two QR decompositions. Keeping M in the parameter's basis costs the
two products of its rotation per update but nothing at a refresh. There is no multi-tensor or
compiled path: the matrix products dominate the step.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import _where, check_betas, check_nonnegative, evaluate_closure

__all__ = ["SOAP"]

# eigh and QR need at least float32 (torch.linalg has no bfloat16 / float16 kernels).
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# argument validation (messages follow sophia._common: name, bad value, what is allowed)


def _check_shampoo_beta(value: Any, group_index: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"Invalid shampoo_beta={value!r}{_where(group_index)}: it must be in [0, 1), or None "
            "to use beta2 (the official code's shampoo_beta=-1 means None here)."
        )


def _check_positive_int(name: str, value: Any, group_index: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"Invalid {name}={value!r}{_where(group_index)}: it must be an integer >= 1."
        )


def _check_flag(name: str, value: Any, group_index: int | None) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"Invalid {name}={value!r}{_where(group_index)}: it must be True or False."
        )


def _check_hyperparameters(group: Mapping[str, Any], group_index: int | None) -> None:
    """Raise a ValueError naming the first invalid setting (of the defaults if index None)."""
    check_nonnegative("lr", group["lr"], group_index)
    check_betas(group["betas"], group_index)
    _check_shampoo_beta(group["shampoo_beta"], group_index)
    check_nonnegative("eps", group["eps"], group_index)
    check_nonnegative("weight_decay", group["weight_decay"], group_index)
    _check_positive_int("precondition_frequency", group["precondition_frequency"], group_index)
    _check_positive_int("max_precond_dim", group["max_precond_dim"], group_index)
    for flag in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias"):
        _check_flag(flag, group[flag], group_index)


# --------------------------------------------------------------------------------------------
# the optimizer


class SOAP(Optimizer):
    """SOAP optimizer (see the module docstring).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: step size, >= 0 (default 3e-3, the official README's).
        betas: (beta1, beta2) of Adam's two moments, each in [0, 1).
        shampoo_beta: EMA factor of the Shampoo factors L and R, in [0, 1); None uses beta2.
        eps: added to sqrt(V) in the denominator, >= 0.
        weight_decay: decoupled weight decay, >= 0, applied as p *= 1 - lr * weight_decay after
            the update.
        precondition_frequency: refresh the eigenbasis every this many updates (integer >= 1).
        max_precond_dim: a (merged) dimension longer than this gets no factor, i.e. the
            identity basis on that side (integer >= 1; the default 10000 leaves vocabulary-sized
            embedding sides out).
        merge_dims: merge adjacent dimensions of a tensor with 2+ dimensions while their product
            stays <= max_precond_dim: fewer, larger factors (meant for convolution kernels; a
            matrix with rows * cols <= max_precond_dim becomes one vector with one full factor).
        precondition_1d: give 1-D tensors of length <= max_precond_dim a factor too (default:
            Adam on them).
        normalize_grads: divide each tensor's update by its RMS (+ eps).
        correct_bias: Adam's bias correction of the step size.

    State per parameter (tensors only, so a state dict loads with torch.load(weights_only=True)):
    `step` (updates taken, a float32 CPU scalar as in torch.optim; the set-up call is not
    counted), `exp_avg` (M, in the parameter's basis), `exp_avg_sq` (V, in the eigenbasis, with
    the parameter's shape), and for each (merged) dimension i that has a factor, `GG{i}` (the
    factor) and `Q{i}` (its eigenvectors, columns by decreasing eigenvalue).
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95), shampoo_beta: float | None = None,
        eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
        max_precond_dim: int = 10000, merge_dims: bool = False, precondition_1d: bool = False,
        normalize_grads: bool = False, correct_bias: bool = True,
    ):
        defaults = dict(
            lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
            merge_dims=merge_dims, precondition_1d=precondition_1d,
            normalize_grads=normalize_grads, correct_bias=correct_bias,
        )
        # Checked before the groups so that a bad constructor argument is reported as such,
        # not as an error of "param group 0".
        _check_hyperparameters(defaults, None)
        defaults["betas"] = tuple(betas)  # lists from config files
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        _check_hyperparameters(group, index)
        group["betas"] = tuple(group["betas"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SOAP update; `closure` optionally re-evaluates the model and returns the loss.

        A parameter's first gradient only sets up its preconditioner (see the module docstring).
        """
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                _check_tensor(p)
                state = self.state[p]
                if not state:
                    self._init_state(state, p, group)
                else:
                    _update(p, state, group)
        return loss

    @staticmethod
    def _init_state(state: dict[str, Any], p: Tensor, group: Mapping[str, Any]) -> None:
        grad = p.grad
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        shape = _factored_shape(p, group)
        dims = _factored_dims(p, shape, group)
        for i in dims:
            state[f"GG{i}"] = torch.zeros(shape[i], shape[i], dtype=p.dtype, device=p.device)
        _accumulate_factors(state, grad.reshape(shape), _shampoo_beta(group))
        for i in dims:
            state[f"Q{i}"] = _eigenvectors(state[f"GG{i}"])


def _check_tensor(p: Tensor) -> None:
    if p.grad.is_sparse:
        raise RuntimeError(
            "SOAP does not support sparse gradients; use dense gradients "
            "(e.g. nn.Embedding(sparse=False))."
        )
    if torch.is_complex(p):
        raise RuntimeError(
            "SOAP does not support complex parameters; optimize torch.view_as_real(p) instead."
        )


# --------------------------------------------------------------------------------------------
# shapes: which dimensions get a factor


def _merge_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Merge runs of adjacent dimensions while their product stays <= max_dim.

    A dimension longer than max_dim stays on its own (and gets no factor). This is the official
    code's rule: (4, 8, 6) with max_dim 40 becomes (32, 6).
    """
    merged: list[int] = []
    run = 1
    for size in shape:
        if run * size <= max_dim:
            run *= size
        elif run > 1:
            merged.append(run)
            run = size
        else:
            merged.append(size)
    if run > 1 or not merged:
        merged.append(run)
    return tuple(merged)


def _factored_shape(p: Tensor, group: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape whose dimensions SOAP preconditions: p's own, or merged (2+ dimensions)."""
    shape = tuple(p.shape)
    if group["merge_dims"] and len(shape) >= 2:
        return _merge_shape(shape, group["max_precond_dim"])
    return shape


def _factored_dims(p: Tensor, shape: tuple[int, ...], group: Mapping[str, Any]) -> list[int]:
    """Indices of the dimensions of `shape` (p's factored shape) that get a factor; the others
    keep the identity basis. A matrix merged into one vector keeps its factor: only tensors that
    are 1-D themselves depend on precondition_1d."""
    max_dim = group["max_precond_dim"]
    if p.dim() == 1 and not group["precondition_1d"]:
        return []
    return [i for i, size in enumerate(shape) if size <= max_dim]


def _shampoo_beta(group: Mapping[str, Any]) -> float:
    return group["betas"][1] if group["shampoo_beta"] is None else group["shampoo_beta"]


# --------------------------------------------------------------------------------------------
# the maths


def _bases(state: Mapping[str, Any], ndim: int) -> list[Tensor | None]:
    """Q of each dimension of the factored shape, None where the basis is the identity."""
    return [state.get(f"Q{i}") for i in range(ndim)]


def _rotate(x: Tensor, bases: list[Tensor | None], back: bool = False) -> Tensor:
    """Q_0^T, Q_1^T, ... applied along dimensions 0, 1, ... of x (Q_i instead when `back`).

    Each step contracts the leading dimension and appends the result as the last one, so after
    all of them the dimensions are back in their original order; an identity basis only moves its
    dimension to the back.
    """
    for q in bases:
        if q is None:
            x = x.movedim(0, -1)
        else:
            x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
    return x


def _accumulate_factors(state: dict[str, Any], grad: Tensor, shampoo_beta: float) -> None:
    """GG_i <- shampoo_beta * GG_i + (1 - shampoo_beta) * (G times G summed over all dims but i),
    i.e. G G^T for i = 0 and G^T G for i = 1 of a matrix."""
    ndim = grad.dim()
    for i in range(ndim):
        factor = state.get(f"GG{i}")
        if factor is None:
            continue
        others = [d for d in range(ndim) if d != i]
        factor.lerp_(torch.tensordot(grad, grad, dims=(others, others)), 1.0 - shampoo_beta)


def _eigenvectors(factor: Tensor) -> Tensor:
    """Eigenvectors of a symmetric factor, as columns by decreasing eigenvalue (the set-up)."""
    work = factor.float() if factor.dtype in _LOW_PRECISION else factor
    try:
        vectors = _eigh_vectors(work)
    except RuntimeError:  # eigh did not converge: once more in float64, as the reference does
        vectors = _eigh_vectors(work.double())
    return vectors.flip(1).to(factor.dtype)


def _eigh_vectors(matrix: Tensor) -> Tensor:
    # The 1e-30 * I is the reference's: it only matters where the diagonal is exactly zero.
    eye = torch.eye(matrix.shape[0], device=matrix.device, dtype=matrix.dtype)
    return torch.linalg.eigh(matrix + 1e-30 * eye).eigenvectors


def _refresh_bases(state: dict[str, Any], shape: tuple[int, ...]) -> None:
    """One power-iteration step + QR per factor: Q <- qr(GG Q), columns sorted by the eigenvalue
    estimate diag(Q^T GG Q); V's entries are permuted along with the columns they belong to."""
    exp_avg_sq = state["exp_avg_sq"].reshape(shape)
    for i in range(len(shape)):
        factor, q = state.get(f"GG{i}"), state.get(f"Q{i}")
        if factor is None:
            continue
        power = factor @ q
        order = torch.argsort((q * power).sum(dim=0), descending=True)
        exp_avg_sq = exp_avg_sq.index_select(i, order)
        # QR in float32 whatever the dtype, like both reference implementations: torch.linalg.qr
        # has no bfloat16 kernel, and one power-iteration step only approximates the
        # eigenvectors anyway.
        new_q, _ = torch.linalg.qr(power.index_select(1, order).to(torch.float32))
        q.copy_(new_q)
    state["exp_avg_sq"].copy_(exp_avg_sq.reshape(state["exp_avg_sq"].shape))


def _update(p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
    """One SOAP update of p from p.grad (state already set up), then the factor update."""
    grad = p.grad
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    shape = _factored_shape(p, group)
    bases = _bases(state, len(shape))
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

    state["step"] += 1
    step = int(state["step"].item())  # a CPU scalar: no device sync

    grad_rotated = _rotate(grad.reshape(shape), bases).reshape(p.shape)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.lerp_(grad_rotated.square(), 1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    exp_avg_rotated = _rotate(exp_avg.reshape(shape), bases).reshape(p.shape)
    update = _rotate((exp_avg_rotated / denom).reshape(shape), bases, back=True).reshape(p.shape)
    if group["normalize_grads"]:
        update.div_(update.square().mean().sqrt_().add_(eps))

    step_size = lr
    if group["correct_bias"]:
        step_size *= math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    p.add_(update, alpha=-step_size)
    if weight_decay != 0:
        p.mul_(1.0 - weight_decay * lr)

    _accumulate_factors(state, grad.reshape(shape), _shampoo_beta(group))
    if step % group["precondition_frequency"] == 0:
        _refresh_bases(state, shape)
