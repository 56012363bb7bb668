"""Hessian estimators: label sampling, the GNB identity, Hutchinson unbiasedness.

Expectations checked, precisely:
- GNB, one example: for logits z = W x + b and y ~ softmax(z),
  E_y[(d CE(z, y) / d theta)^2] = diag(J^T (diag(p) - p p^T) J)  (the Gauss-Newton diagonal),
  checked exactly by enumerating y and by Monte Carlo through `gnb_loss`.
- GNB, a batch of B examples: with g_hat the gradient of the mean sampled loss,
  E[B * g_hat^2] = (1/B) sum_i GN_diag_i (cross terms vanish: the score p - onehot(y) has mean 0),
  i.e. the GN diagonal of the mean loss, which is what SophiaG's rho * bs * h divides by.
- Hutchinson: E_u[u * (H u)] = diag(H) for Rademacher u, with or without off-diagonal terms.
"""
from __future__ import annotations

import torch
from torch import nn

from sophia.hessian import gnb_loss, hutchinson, sample_labels


def test_sample_labels_shape_and_distribution() -> None:
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0])
    batch = logits.expand(2, 3, 20000, 4).to(torch.bfloat16)  # any leading shape, low precision
    y = sample_labels(batch, generator=torch.Generator().manual_seed(0))
    assert y.shape == (2, 3, 20000) and y.dtype == torch.int64
    freq = torch.bincount(y.flatten(), minlength=4).double() / y.numel()
    p = torch.softmax(logits.double(), -1)
    se = (p * (1 - p) / y.numel()).sqrt()
    assert ((freq - p).abs() < 5 * se).all(), (freq, p)
    same = sample_labels(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, same)


def test_gnb_loss_is_ce_against_sampled_labels() -> None:
    logits = torch.randn(2, 5, 7, requires_grad=True)
    loss = gnb_loss(logits, generator=torch.Generator().manual_seed(3))
    y = sample_labels(logits, generator=torch.Generator().manual_seed(3))
    expected = nn.functional.cross_entropy(logits.reshape(-1, 7), y.reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def _gn_diag(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Exact diag(J^T (diag(p) - p p^T) J) for z = W x + b.

    Entries: p_k (1 - p_k) x_j^2 for W_kj and p_k (1 - p_k) for b_k.
    """
    p = torch.softmax(W @ x + b, -1)
    var = p * (1 - p)
    return var[:, None] * x[None, :] ** 2, var


def test_gnb_identity_single_example_exact_enumeration() -> None:
    torch.manual_seed(0)
    W = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, dtype=torch.float64)
    z = W @ x + b
    p = torch.softmax(z, -1).detach()
    eW, eb = torch.zeros_like(W), torch.zeros_like(b)
    for y in range(4):
        gW, gb = torch.autograd.grad(
            nn.functional.cross_entropy(z[None], torch.tensor([y])), [W, b], retain_graph=True
        )
        eW += p[y] * gW**2
        eb += p[y] * gb**2
    dW, db = _gn_diag(W.detach(), b.detach(), x)
    torch.testing.assert_close(eW, dW)
    torch.testing.assert_close(eb, db)


def test_gnb_monte_carlo_matches_gauss_newton_diagonal_of_mean_loss() -> None:
    torch.manual_seed(0)
    B, n_draws = 4, 3000
    model = nn.Linear(3, 4).double()
    x = torch.randn(B, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    samples_W, samples_b = [], []
    for _ in range(n_draws):
        model.zero_grad()
        gnb_loss(model(x), generator=gen).backward()
        samples_W.append(B * model.weight.grad**2)
        samples_b.append(B * model.bias.grad**2)
    exact = [_gn_diag(model.weight.detach(), model.bias.detach(), xi) for xi in x]
    exact_W = sum(e[0] for e in exact) / B
    exact_b = sum(e[1] for e in exact) / B
    for samples, target in ((samples_W, exact_W), (samples_b, exact_b)):
        s = torch.stack(samples)
        mean, se = s.mean(0), s.std(0) / n_draws**0.5
        # 5 standard errors per entry (fixed seed): loose enough for MC, tight enough to catch a
        # missing factor B or a wrong distribution (both are off by many standard errors)
        assert ((mean - target).abs() < 5 * se + 1e-12).all(), (mean, target, se)
        assert (se < 0.1 * target).all()  # the test has power


def test_hutchinson_exact_for_diagonal_hessian() -> None:
    x = torch.randn(6, requires_grad=True, dtype=torch.float64)
    y = torch.randn(2, 3, requires_grad=True, dtype=torch.float64)
    unused = torch.randn(2, requires_grad=True, dtype=torch.float64)
    loss = torch.sin(x).sum() + (y**3).sum()
    est_x, est_y, est_unused = hutchinson(loss, [x, y, unused], torch.Generator().manual_seed(0))
    # u_i^2 = 1, so with a diagonal Hessian every single estimate is exact
    torch.testing.assert_close(est_x, -torch.sin(x).detach())
    torch.testing.assert_close(est_y, 6 * y.detach())
    assert torch.equal(est_unused, torch.zeros(2, dtype=torch.float64))
    assert not est_x.requires_grad


def test_hutchinson_unbiased_with_off_diagonal_terms() -> None:
    torch.manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64)
    H = A + A.T  # symmetric, off-diagonal terms couple coordinates
    C = torch.randn(5, 3, dtype=torch.float64)  # couples the two parameters
    x = torch.randn(5, requires_grad=True, dtype=torch.float64)
    z = torch.randn(3, requires_grad=True, dtype=torch.float64)
    n = 4000
    gen = torch.Generator().manual_seed(2)
    draws_x, draws_z = [], []
    for _ in range(n):
        loss = 0.5 * x @ H @ x + x @ C @ z + (z**2).sum()
        ex, ez = hutchinson(loss, [x, z], generator=gen)
        draws_x.append(ex)
        draws_z.append(ez)
    z_diag = torch.full((3,), 2.0, dtype=torch.float64)
    for draws, target in ((draws_x, H.diagonal()), (draws_z, z_diag)):
        s = torch.stack(draws)
        mean, se = s.mean(0), s.std(0) / n**0.5
        assert (s.std(0) > 0).all()  # genuinely noisy: off-diagonal terms are present
        assert ((mean - target).abs() < 5 * se).all(), (mean, target, se)
