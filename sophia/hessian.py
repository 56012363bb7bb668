"""Diagonal Hessian estimators for Sophia.

GNB (Gauss-Newton-Bartlett, for SophiaG): sample labels y ~ softmax(logits) from the model itself,
backprop the cross-entropy against them, and keep g_hat^2. For one example with logits z(theta),
E_y[(d/dtheta CE(z, y))^2] = diag(J^T (diag(p) - p p^T) J), the diagonal of the Gauss-Newton
matrix, because the score dCE/dz = p - onehot(y) has mean 0 and covariance diag(p) - p p^T under
y ~ p. For a loss averaged over B tokens the estimate is B * g_hat^2 (SophiaG's `bs`).

`gnb_loss` samples and forms the loss and its gradient in one chunked custom autograd function
(`fused=True`, the default) with bounded float32 temporaries; `fused=False` is the plain reference
(`sample_labels`, then `F.cross_entropy`). Both take their randomness from one float64 uniform per
position, drawn first, so they sample the same labels from the same generator state.

Hutchinson (for SophiaH): for Rademacher u, E[u * (H u)] = diag(H), computed with a double
backward. The model must support double backward (math attention backend).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sample_labels", "gnb_loss", "hutchinson"]


# Columns per block of the two-level inverse-CDF draw (see `_draw_rows`).
_BLOCK = 256


def _chunk_rows(rows: int, vocab: int, device: torch.device, chunk_rows: int | None) -> int:
    """Rows per chunk, so that a float32 [chunk, vocab] temporary stays bounded.

    2**26 elements (256 MiB) on accelerators keeps kernel launches a small share of the time;
    2**22 (16 MiB) on CPUs, where a smaller working set is as fast and lighter on RAM.
    """
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(
                f"chunk_rows={chunk_rows} must be >= 1 (or None to choose automatically)"
            )
        return min(chunk_rows, max(rows, 1))
    budget = 1 << (22 if device.type == "cpu" else 26)
    return max(1, min(rows, budget // vocab))


def _uniforms(rows: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """One float64 uniform per position: the only randomness of a label draw.

    Both `sample_labels` (and so the reference `gnb_loss`) and the fused path draw exactly these
    numbers first, which is why they sample the same labels from the same generator state. 53
    bits keep the inverse CDF exact for tokens far rarer than float32's 2**-24 resolution.
    """
    return torch.rand(rows, dtype=torch.float64, device=device, generator=generator)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit logits (bf16 probabilities of rare tokens round to 0), else their own."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _last_positive(weights: Tensor) -> Tensor:
    """Index of the last strictly positive entry along the last dim (0 if there is none)."""
    width = weights.size(-1)
    return width - 1 - (weights > 0).flip(-1).to(torch.int32).argmax(-1)


def _draw_rows(logits: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Sample one label per row of `logits` [n, V] by inverse CDF at `u` [n]; also return logsumexp.

    Two levels instead of one cumsum over V: the masses of 256-column blocks pick the block (a
    float64 cumsum over V/256 entries), then a float64 cumsum of that block alone picks the token.
    This is exact to float32 rounding of each probability (a float32 cumsum over 50k entries
    would blur every token's probability by about 6e-8 absolute) and cheaper (no [n, V] cumsum).
    One float32 [n, V] temporary, reused in place: logits - max, exp, block sums.

    Returns:
        labels (int64 [n]) and logsumexp (float32, or float64 for float64 logits, [n]) of each row.
    """
    n, vocab = logits.shape
    width = min(_BLOCK, vocab)  # small vocabularies: one block, no padding
    blocks = -(-vocab // width)
    dtype = _work_dtype(logits.dtype)
    m = logits.amax(-1, keepdim=True).to(dtype)  # exact in any dtype; the stabiliser of exp
    work = torch.empty(n, blocks * width, dtype=dtype, device=logits.device)
    torch.sub(logits, m, out=work[:, :vocab])
    work[:, vocab:] = float("-inf")  # padding: probability exactly 0, never drawn
    e = work.exp_().view(n, blocks, width)  # unnormalised probabilities
    mass = e.sum(-1).double()  # [n, blocks]; a float32 sum of 256 terms is accurate and fast
    cdf = mass.cumsum(-1)
    total = cdf[:, -1]
    target = u * total
    # right=True: a zero-mass block (or token) never contains the target; the clamps only act on
    # rounding ties at the very top of the distribution (and keep indices valid for NaN rows)
    j = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    j = torch.minimum(j, _last_positive(mass))
    before = torch.where(j > 0, cdf.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    inner = e.gather(1, j[:, None, None].expand(n, 1, width)).squeeze(1).double()  # [n, block]
    inner_cdf = inner.cumsum(-1)
    # rescale the residual to the block's own float64 cumsum, which sums in another order than
    # the block mass did, so the two levels partition [0, 1) consistently
    residual = (target - before) * (inner_cdf[:, -1] / mass.gather(1, j[:, None]).squeeze(1))
    k = torch.searchsorted(inner_cdf, residual[:, None], right=True).squeeze(1)
    k = torch.minimum(k, _last_positive(inner))
    labels = (j * width + k).clamp_(max=vocab - 1)
    lse = (m.squeeze(1).double() + total.log()).to(dtype)
    return labels, lse


@torch.no_grad()
def sample_labels(
    logits: Tensor, generator: torch.Generator | None = None, *, chunk_rows: int | None = None
) -> Tensor:
    """Draw y ~ softmax(logits) independently at every position.

    The draw is the inverse CDF of softmax(logits) at one float64 uniform per position,
    `torch.rand(n, dtype=torch.float64, generator=generator)` for the n positions in row-major
    order, and nothing else random; `gnb_loss` draws the same numbers, so both sample the same
    labels from the same generator state. Probabilities are computed in float32 (bf16
    probabilities of rare tokens round to 0 or lose mass) a chunk of rows at a time, so memory
    stays bounded whatever the number of positions. Tokens of probability 0 are never drawn.

    Args:
        logits: (..., vocab) unnormalised log-probabilities, any leading shape and float dtype.
        generator: optional torch.Generator on the logits' device, for reproducible draws.
        chunk_rows: positions per chunk; None picks a bounded size (the result does not depend
            on it).

    Returns:
        int64 tensor of shape logits.shape[:-1].
    """
    flat = logits.detach().reshape(-1, logits.size(-1))
    u = _uniforms(flat.size(0), flat.device, generator)
    step = _chunk_rows(flat.size(0), flat.size(1), flat.device, chunk_rows)
    labels = torch.empty(flat.size(0), dtype=torch.int64, device=flat.device)
    for r in range(0, flat.size(0), step):
        labels[r:r + step] = _draw_rows(flat[r:r + step], u[r:r + step])[0]
    return labels.view(logits.shape[:-1])


class _SampledCrossEntropy(torch.autograd.Function):
    """Mean CE against labels sampled from the logits themselves, in one chunked pass each way.

    Forward reads the logits once per chunk to get the logsumexp and the label (the CE of a row is
    lse - logit[y], so no log-softmax is ever materialised). Backward recomputes
    p = exp(logit - lse) chunk by chunk and writes (p - onehot(y)) * grad / N straight into the
    gradient, in the logits' dtype. Saved for backward: the logits (the caller holds them anyway),
    and lse and y, a few bytes per position; saving p instead would cost a full [N, V] tensor and
    save no memory traffic (backward reads one [N, V] tensor either way).

    Peak extra memory: forward, one float32 [chunk, V] temporary; backward, the [N, V] gradient in
    the logits' dtype (which any implementation returns) plus one float32 [chunk, V] temporary
    (none for float32 logits, whose gradient chunk is worked on in place).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, u: Tensor, chunk_rows: int | None) -> tuple[Tensor, Tensor]:
        n, vocab = logits.shape
        step = _chunk_rows(n, vocab, logits.device, chunk_rows)
        labels = torch.empty(n, dtype=torch.int64, device=logits.device)
        lse = torch.empty(n, dtype=_work_dtype(logits.dtype), device=logits.device)
        for r in range(0, n, step):
            labels[r:r + step], lse[r:r + step] = _draw_rows(logits[r:r + step], u[r:r + step])
        picked = logits.gather(1, labels[:, None]).squeeze(1).to(lse.dtype)
        loss = (lse - picked).mean()
        ctx.save_for_backward(logits, lse, labels)
        ctx.step = step
        ctx.mark_non_differentiable(labels)
        return loss, labels

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_labels: Tensor | None):
        logits, lse, labels = ctx.saved_tensors
        n = logits.size(0)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        scale = (grad_loss.to(lse.dtype) / n).reshape(1, 1)  # stays on device: no host sync
        in_place = grad.dtype == lse.dtype
        for r in range(0, n, ctx.step):
            rows = slice(r, r + ctx.step)
            # float32/64 logits: build the chunk in the gradient itself; else in a float32 temporary
            work = torch.sub(logits[rows], lse[rows, None], out=grad[rows] if in_place else None)
            work.exp_().mul_(scale)
            idx = labels[rows, None]
            work.scatter_add_(1, idx, (-scale).expand(idx.size(0), 1))
            if not in_place:
                grad[rows] = work
        return grad, None, None


def gnb_loss(
    logits: Tensor,
    generator: torch.Generator | None = None,
    *,
    fused: bool = True,
    chunk_rows: int | None = None,
) -> Tensor:
    """Mean cross-entropy of `logits` against labels sampled from the model (sampled without grad).

    Backpropagate it and call `SophiaG.update_hessian()`: the squared gradient times the number of
    positions averaged over (pass that number as `bs` to `SophiaG.step`) is the GNB estimate of
    the diagonal Gauss-Newton matrix of the mean loss.

    Args:
        logits: (..., vocab) logits of any leading shape, float32 / bfloat16 / float16.
        generator: optional torch.Generator on the logits' device, for reproducible labels.
        fused: True (default) samples and forms the loss and its gradient in a custom autograd
            function that works on float32 chunks of rows: no float32 copy of the whole logits,
            no saved log-softmax. False is the plain reference: `sample_labels` then
            `F.cross_entropy` on a float32 (float64 for float64 logits) copy. Both draw the
            same labels from the same generator state, so their gradients agree to float
            rounding.
        chunk_rows: positions per chunk of the fused path (and of the sampling); None picks a
            bounded size. Results do not depend on it beyond float rounding.
    """
    if not fused:
        labels = sample_labels(logits, generator=generator, chunk_rows=chunk_rows)
        work = logits.to(_work_dtype(logits.dtype)).reshape(-1, logits.size(-1))
        return F.cross_entropy(work, labels.reshape(-1))
    flat = logits.reshape(-1, logits.size(-1))
    u = _uniforms(flat.size(0), flat.device, generator)
    # The function picks its own precisions; autocast (the engine calls this right after an
    # autocast forward) must not recast its reductions.
    no_autocast = (
        torch.autocast(flat.device.type, enabled=False)
        if torch.amp.is_autocast_available(flat.device.type)
        else contextlib.nullcontext()
    )
    with no_autocast:
        loss, _ = _SampledCrossEntropy.apply(flat, u, chunk_rows)
    return loss


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
