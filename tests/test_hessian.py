"""Hessian estimators: label sampling, the GNB identity, Hutchinson unbiasedness.

Expectations checked, precisely:
- GNB, one example: for logits z = W x + b and y ~ softmax(z),
  E_y[(d CE(z, y) / d theta)^2] = diag(J^T (diag(p) - p p^T) J)  (the Gauss-Newton diagonal),
  checked exactly by enumerating y and by Monte Carlo through `gnb_loss`.
- GNB, a batch of B examples: with g_hat the gradient of the mean sampled loss,
  E[B * g_hat^2] = (1/B) sum_i GN_diag_i (cross terms vanish: the score p - onehot(y) has mean 0),
  i.e. the GN diagonal of the mean loss, which is what SophiaG's rho * bs * h divides by.
- Hutchinson: E_u[u * (H u)] = diag(H) for Rademacher u, with or without off-diagonal terms.

The fused `gnb_loss` (the default) is checked against the plain reference (`fused=False`:
`sample_labels` then `F.cross_entropy`): same labels from the same generator state, gradients
equal to float rounding in every dtype, results independent of the chunking; and the label draw
itself against an exact float64 inverse CDF.
"""
from __future__ import annotations

import importlib

import json
from pathlib import Path

import pytest
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


# ------------------------------------------------------------------ fused path vs the reference
def _grad(logits: torch.Tensor, seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().clone().requires_grad_()
    loss = gnb_loss(x, generator=torch.Generator().manual_seed(seed), **kw)
    (grad,) = torch.autograd.grad(loss * 3.0, x)  # a non-unit upstream gradient
    return loss.detach(), grad


def _labels_of(grad: torch.Tensor) -> torch.Tensor:
    """The label of each row, read off the gradient (p - onehot(y)) * c: its only negative entry."""
    return grad.argmin(-1)


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)],
)
def test_fused_gradient_equals_reference(dtype: torch.dtype, tol: float) -> None:
    # vocab 700: three 256-column blocks, the last one padded; logits spread like an LM's
    logits = (4 * torch.randn(3, 11, 700, generator=torch.Generator().manual_seed(0))).to(dtype)
    loss, grad = _grad(logits, seed=5)
    ref_loss, ref_grad = _grad(logits, seed=5, fused=False)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert torch.equal(_labels_of(grad), _labels_of(ref_grad))  # the same draw
    assert torch.equal(_labels_of(grad), sample_labels(logits, torch.Generator().manual_seed(5)))
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), rtol=tol, atol=tol)
    # relative to the largest entry (1/N * 3): bf16/fp16 round the gradient itself
    scale = ref_grad.abs().max().double()
    assert ((grad.double() - ref_grad.double()).abs().max() / scale) < tol
    if dtype == torch.float64:  # and both equal CE against those labels, computed in float64
        y = _labels_of(grad).reshape(-1)
        x = logits.detach().clone().requires_grad_()
        exact = nn.functional.cross_entropy(x.reshape(-1, 700), y)
        torch.testing.assert_close(loss, exact.detach(), rtol=1e-13, atol=0)
        (exact_grad,) = torch.autograd.grad(3 * exact, x)
        torch.testing.assert_close(grad, exact_grad, rtol=1e-12, atol=1e-15)


def test_fused_and_reference_consume_the_generator_alike() -> None:
    logits = torch.randn(4, 300)
    states = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(9)
        gnb_loss(logits, generator=gen, fused=fused)
        states.append(gen.get_state())
    assert torch.equal(states[0], states[1])
    # and the draws genuinely depend on the generator state
    a = sample_labels(torch.zeros(64, 300), torch.Generator().manual_seed(0))
    b = sample_labels(torch.zeros(64, 300), torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("shape", [(700,), (5, 700), (2, 3, 4, 700)])
def test_fused_any_leading_shape(shape: tuple[int, ...]) -> None:
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    loss, grad = _grad(logits, seed=2)
    ref_loss, ref_grad = _grad(logits, seed=2, fused=False)
    assert loss.shape == () and grad.shape == shape
    assert sample_labels(logits).shape == shape[:-1]
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_does_not_change_the_result(dtype: torch.dtype) -> None:
    logits = (3 * torch.randn(37, 600, generator=torch.Generator().manual_seed(4))).to(dtype)
    whole_loss, whole_grad = _grad(logits, seed=8, chunk_rows=10**6)  # one chunk
    for rows in (1, 5, 36):  # 5 and 36 leave a ragged last chunk
        loss, grad = _grad(logits, seed=8, chunk_rows=rows)
        assert torch.equal(_labels_of(grad), _labels_of(whole_grad))
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, whole_grad, rtol=1e-6, atol=1e-9)
        labels = sample_labels(logits, torch.Generator().manual_seed(8), chunk_rows=rows)
        assert torch.equal(labels, _labels_of(whole_grad))
    with pytest.raises(ValueError, match="chunk_rows=0"):
        gnb_loss(logits, chunk_rows=0)


def test_label_draw_is_the_exact_inverse_cdf(monkeypatch) -> None:
    """Against searchsorted on a float64 CDF: same label unless u sits on a float32 rounding tie.

    u is what `sample_labels` documents as its only randomness: one torch.rand float64 per row.
    """
    gen = torch.Generator().manual_seed(0)
    vocab, n = 600, 4000  # two full blocks and a padded one
    row = 5 * torch.randn(vocab, generator=gen)
    impossible = torch.tensor([0, 17, 255, 256, 599])
    row[impossible] = float("-inf")  # impossible tokens, at block edges too
    logits = row.expand(n, vocab)
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = sample_labels(logits, generator=torch.Generator().manual_seed(1))
    cdf = torch.softmax(row.double(), -1).cumsum(-1)
    exact = torch.searchsorted(cdf, u, right=True).clamp(max=vocab - 1)
    near_tie = (cdf[None, :] - u[:, None]).abs().min(-1).values < 1e-6
    assert (labels == exact)[~near_tie].all()
    assert not torch.isin(labels, impossible).any()
    # The logsumexp of every row, recovered from gnb_loss's gradient (p - onehot(y)) / n with
    # p = exp(logits - lse): the sum of p over a row is exp(true lse - computed lse).
    leaf = logits.clone().requires_grad_()
    gnb_loss(leaf, generator=torch.Generator().manual_seed(1)).backward()
    p = leaf.grad.double() * n
    p[torch.arange(n), labels] += 1
    lse = torch.logsumexp(row.double(), -1) - p.sum(-1).log()
    torch.testing.assert_close(lse.float(), torch.logsumexp(row, -1).expand(n))
    # the extremes of u map to the first and the last possible token
    extremes = torch.tensor([0.0, 1.0 - 2**-53], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: extremes.clone())
    lo_hi = sample_labels(logits[:2])
    possible = torch.isfinite(row).nonzero().squeeze(1)
    assert lo_hi.tolist() == [possible[0].item(), possible[-1].item()]


def test_non_finite_logits_give_a_non_finite_loss_not_a_crash() -> None:
    logits = torch.randn(4, 300)
    logits[1, 7] = float("nan")
    labels = sample_labels(logits, torch.Generator().manual_seed(0))
    assert ((labels >= 0) & (labels < 300)).all()
    assert gnb_loss(logits, torch.Generator().manual_seed(0)).isnan()


def test_fused_under_autocast_matches_reference() -> None:
    lin = nn.Linear(16, 300)
    x = torch.randn(2, 6, 16)
    grads = []
    for fused in (True, False):
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = lin(x)
        assert logits.dtype == torch.bfloat16
        gnb_loss(logits, generator=torch.Generator().manual_seed(3), fused=fused).backward()
        grads.append(lin.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=1e-4)


# ------------------------------------------------------------------------ benchmarks/bench_hessian.py
def test_bench_hessian_runs_and_reports(tmp_path: Path) -> None:
    bench = importlib.import_module("benchmarks.bench_hessian")
    out = tmp_path / "bench.json"
    rc = bench.main(["--batch", "2", "--seq", "8", "--vocab", "1000", "--repeats", "1",
                     "--no-cpu-memory", "--data", "random", "--mb-rows", "2", "--mb-seq", "8",
                     "--train-steps", "2", "--micro-batches", "1,2", "--accum", "4",
                     "--ref-micro-batches", "4", "--trials", "2", "--threads", "1",
                     "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["loss"]] == list(bench.VARIANTS)
    assert all(r["ms"] > 0 and r["peak_extra_bytes"] is None for r in result["loss"])
    rows = result["micro_batches"]["rows"]
    assert {(r["estimator"], r["micro_batches"]) for r in rows} == {
        (e, m) for e in ("gnb", "gnb_msq") for m in (1, 2)}
    for r in rows:
        assert r["cost_vs_all"] == r["micro_batches"] / 4 and r["tokens"] == r["micro_batches"] * 16
        assert 0 < r["rel_l2_err"] < float("inf") and r["rel_l2_err_denoised"] <= r["rel_l2_err"]
    # with one micro-batch the two estimators are the same number
    one = [r["rel_l2_err"] for r in rows if r["micro_batches"] == 1]
    assert one[0] == pytest.approx(one[1])
    with pytest.raises(SystemExit):
        bench.main(["--micro-batches", "16", "--accum", "8"])
    with pytest.raises(SystemExit):
        bench.main(["--estimators", "gnb,hutchinson"])
    only = bench.parse_args(["--estimators", "gnb_msq"])
    assert only.estimators == ["gnb_msq"]
