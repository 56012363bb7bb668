"""SophiaG: Sophia with the Gauss-Newton-Bartlett (GNB) diagonal Hessian estimator.

Reproduces the official implementation (PyPI `sophia-opt`) to float rounding, state-dict
compatible in both directions, and adds a multi-tensor path, a fused (compiled) path and
telemetry. The update itself is `sophia.sophia`'s; what makes it SophiaG is:

    r = min(|m| / (rho * B * h + 1e-15), 1)          # B = `step(bs=B)`

and `update_hessian()` doing `h = beta2 * h + (1 - beta2) * g * g` with whatever gradient the
caller left in `.grad`: the gradient of the loss against labels sampled from the model (see
`sophia.hessian.gnb_loss`). The GNB estimate is B * g_hat^2; the state keeps g_hat^2 and B enters
the denominator, so B must be the real number of tokens the sampled loss was averaged over.
`update_hessian(estimates, bs=B)` feeds a precomputed estimate instead (stored as estimate / B,
so the same `step(bs=B)` uses it as is): the harness's lower-variance mean of per-micro-batch
squares goes in this way.

About lr: the code's `lr` is the paper's rho * eta. When the ratio is clipped the update is
`lr * sign(m)`, exactly Lion's step size, so SophiaG learning rates are comparable with Lion's,
not AdamW's. `paper_to_code_lr` converts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import check_batch_size
from .sophia import Denominator, SophiaBase

__all__ = ["SophiaG", "paper_to_code_lr", "code_to_paper_lr"]


def paper_to_code_lr(eta: float, rho: float) -> float:
    """Convert the paper's step size eta to this code's `lr`.

    The paper's update is eta * clip(m / max(h, eps), rho) = eta * rho * clip(m / (rho * h), 1),
    so the code's lr is rho * eta (`code_to_paper_lr` is the inverse).
    """
    return rho * eta


def code_to_paper_lr(lr: float, rho: float) -> float:
    """Inverse of `paper_to_code_lr`: the paper's eta for this code's (lr, rho)."""
    return lr / rho


def _check_nonnegative(tensors: Iterable[Tensor], what: str) -> None:
    """Raise a ValueError if any entry is negative (one host synchronisation per device).

    SophiaG's h is an EMA of squares, so a negative entry can only come from outside (an
    estimate or a state dict). Refusing it keeps the denominator rho * bs * h + 1e-15 positive,
    which every path's clip relies on (the fused path computes clamp(m / denominator, -1, 1)).
    """
    lows: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            real = torch.view_as_real(t) if t.is_complex() else t
            lows.setdefault(t.device, []).append(real.detach().amin().float())
    for device_lows in lows.values():
        low = float(torch.stack(device_lows).amin())
        if low < 0:
            raise ValueError(
                f"SophiaG: {what} has a negative entry (minimum {low:.3g}). SophiaG's Hessian "
                "estimates are Gauss-Newton squares and must be >= 0: pass squares (e.g. the mean "
                "of per-micro-batch g^2), or use SophiaH for signed (Hutchinson) estimates."
            )


def _denominator(rho: float, bs: float) -> Denominator:
    # The 1e-15 is added exactly as the official code does; it keeps 0/0 at 0 while h is still 0.
    return Denominator(scale=rho * bs, shift=1e-15)


class SophiaG(SophiaBase):
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
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04, weight_decay: float = 0.1,
        *, maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
    ):
        super().__init__(params, dict(
            lr=lr, betas=betas, rho=rho, weight_decay=weight_decay,
            maximize=maximize, foreach=foreach, fused=fused,
        ))

    @torch.no_grad()
    def update_hessian(
        self, estimates: Sequence[Tensor | None] | Mapping[Tensor, Tensor] | None = None,
        *, bs: float | None = None,
    ) -> None:
        """Fold a diagonal Hessian estimate into h.

        Without arguments (the official call): h = beta2 * h + (1 - beta2) * g * g for every
        parameter whose .grad is set. Call it right after backward of the sampled-label loss
        (`sophia.hessian.gnb_loss`); the step's `bs` turns the EMA of g^2 into the estimate.

        With `estimates` (e.g. the mean of per-micro-batch GNB squares): h = beta2 * h +
        (1 - beta2) * estimate / bs, so that `step(bs=bs)` divides |m| by rho * (EMA of the
        estimates) exactly where the official path uses rho * bs * (EMA of g^2). Pass the same `bs`
        to `step`; h stays in the official units (comparable `hessian_l1`, state dicts).

        Args:
            estimates: estimates of the Hessian diagonal (the quantity bs * g^2 estimates), a
                sequence aligned with `[p for g in opt.param_groups for p in g["params"]]` (None
                entries are skipped) or a dict param -> tensor, as for `SophiaH.update_hessian`.
            bs: required with `estimates`: the `bs` the following steps are given.

        Raises:
            ValueError: an estimate has a negative entry (checked before h changes, at the cost
                of one host synchronisation per device); GNB estimates are squares.
        """
        if estimates is None:
            if bs is not None:
                raise ValueError(
                    f"update_hessian(bs={bs!r}) without estimates: bs only scales precomputed "
                    "estimates; call update_hessian() to square .grad, or pass estimates too."
                )
            per_group = []
            for group in self.param_groups:
                _, grads, _, hessians, _ = self._gather(group)
                per_group.append((group, hessians, grads))
            self._update_hessian_ema(per_group, square=True)
            return
        if bs is None:
            raise ValueError(
                "update_hessian(estimates) needs bs=, the batch size later passed to step(bs=...): "
                "h stores estimate / bs so that the step's rho * bs * h is the estimate."
            )
        check_batch_size(bs)
        # SophiaH's alignment only reads self.param_groups: shared rather than copied.
        aligned = self._align(estimates)
        _check_nonnegative((e for e in aligned if e is not None), "update_hessian's estimate")
        aligned = iter(aligned)
        per_group = []
        for group in self.param_groups:
            hessians, values = [], []
            for p in group["params"]:
                est = next(aligned)
                if est is not None:
                    values.append(est.detach() / bs)
                    hessians.append(self._init_state(self.state[p], p)["hessian"])
            per_group.append((group, hessians, values))
        self._update_hessian_ema(per_group, square=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load_state_dict, refusing a state whose h has a negative entry."""
        _check_nonnegative(
            (s["hessian"] for s in state_dict.get("state", {}).values()
             if torch.is_tensor(s.get("hessian"))),
            "the state dict's hessian",
        )
        super().load_state_dict(state_dict)

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
        return self._sophia_step(closure, lambda group: _denominator(group["rho"], bs))

