"""Diagonal Hessian estimators for Sophia.

GNB (Gauss-Newton-Bartlett, for SophiaG): sample labels y ~ softmax(logits) from the model itself,
backprop the cross-entropy against them, and keep g_hat^2. For one example with logits z(theta),
E_y[(d/dtheta CE(z, y))^2] = diag(J^T (diag(p) - p p^T) J), the diagonal of the Gauss-Newton
matrix, because the score dCE/dz = p - onehot(y) has mean 0 and covariance diag(p) - p p^T under
y ~ p. For a loss averaged over B tokens the estimate is B * g_hat^2 (SophiaG's `bs`).

Hutchinson (for SophiaH): for Rademacher u, E[u * (H u)] = diag(H), computed with a double
backward. The model must support double backward (math attention backend).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sample_labels", "gnb_loss", "hutchinson"]


@torch.no_grad()
def sample_labels(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw y ~ softmax(logits) independently at every position.

    Args:
        logits: (..., vocab) unnormalised log-probabilities, any leading shape.
        generator: optional torch.Generator on the logits' device, for reproducible draws.

    Returns:
        int64 tensor of shape logits.shape[:-1].
    """
    # softmax in float32: bf16 probabilities of rare tokens round to 0 or lose mass
    probs = torch.softmax(logits.detach().float().reshape(-1, logits.size(-1)), dim=-1)
    labels = torch.multinomial(probs, num_samples=1, generator=generator)
    return labels.view(logits.shape[:-1])


def gnb_loss(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mean cross-entropy of `logits` against labels sampled from the model (sampled without grad).

    Backpropagate it and call `SophiaG.update_hessian()`: the squared gradient times the number of
    positions averaged over (pass that number as `bs` to `SophiaG.step`) is the GNB estimate of
    the diagonal Gauss-Newton matrix of the mean loss.
    """
    labels = sample_labels(logits, generator=generator)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))


def hutchinson(
    loss: Tensor, params: Sequence[Tensor], generator: torch.Generator | None = None
) -> list[Tensor]:
    """Hutchinson estimates u * (H u) of diag(H), one per parameter, with Rademacher u.

    Args:
        loss: scalar loss whose graph is still alive (do not call backward on it first).
        params: parameters to estimate for; order is kept, so passing
            `[p for g in opt.param_groups for p in g["params"]]` gives what
            `SophiaH.update_hessian` expects.
        generator: optional torch.Generator (on the parameters' device) for the probe vectors.

    Returns:
        detached tensors shaped like `params`; a parameter the loss does not depend on gets zeros.
    """
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    probes = [
        torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
        for p in params
    ]
    # sum_i <g_i, u_i> differentiated once more gives H u for every parameter at once
    dot = sum(
        (g * u).sum() for g, u in zip(grads, probes) if g is not None and g.requires_grad
    )
    if torch.is_tensor(dot) and dot.requires_grad:
        hvps = torch.autograd.grad(dot, params, allow_unused=True)
    else:  # the loss is at most linear in params: H = 0
        hvps = [None] * len(params)
    return [
        torch.zeros_like(p) if hv is None else (u * hv).detach()
        for p, u, hv in zip(params, probes, hvps)
    ]
