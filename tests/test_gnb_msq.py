"""The mean-of-squares GNB estimator (`optimizer.hessian_estimator=gnb_msq`) against the official one.

What is checked, and why the numbers asserted are what they are:

Let the Hessian batch be m micro-batches j of t tokens each (B = m t), with fixed inputs. For one
coordinate, token n's sampled-label gradient is s_n = J_n^T (p_n - onehot(y_n)), independent across
tokens, mean 0 and variance sigma_n^2 = GN_n (that token's Gauss-Newton diagonal). g_j is the mean
of s_n over micro-batch j, g the mean over all B tokens.

- official ``gnb``: est = B g^2;   ``gnb_msq``: est = mean_j (t g_j^2).
- Both have expectation D = (1/B) sum_n GN_n, the Gauss-Newton diagonal of the mean loss.
- For a sum S of independent mean-zero terms, Var(S^2) = 2 (sum sigma_n^2)^2 + sum kappa_n with
  kappa_n = E s_n^4 - 3 sigma_n^4 (the fourth cumulant). So
      Var(gnb)     = [2 (sum_all sigma^2)^2 + sum_all kappa] / B^2
      Var(gnb_msq) = (1/m^2) sum_j [2 (sum_{n in j} sigma^2)^2 + sum_{n in j} kappa] / t^2.
  With equal micro-batches: Var/D^2 = 2 + K/B for gnb and (2 + K/t) / m for gnb_msq, where
  K = mean kappa / mean(sigma^2)^2: relative noise ~sqrt(2) for gnb whatever B, ~sqrt(2/m) for
  gnb_msq; the K terms are the finite-batch (non-Gaussian) corrections.

The model is a linear softmax layer z = W x + b, whose per-token moments are exact:
for W_kj, s = (p_k - 1[y = k]) x_j, so sigma^2 = p_k q_k x_j^2 and
E s^4 = x_j^4 (p_k q_k^4 + q_k p_k^4) with q = 1 - p (b_k: the same with x_j = 1).

The Monte Carlo runs the engine's own `HessianRefresher` feeding a real `SophiaG` with beta2 = 0,
so bs * h after a refresh is exactly the estimate the optimizer will use. Tolerances are 5 Monte
Carlo standard errors, estimated from the draws, on fixed seeds: deterministic, never flaky.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from engine.batching import plan_batches
from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.distributed import DistEnv
from engine.errors import HarnessError
from engine.hessian import HessianRefresher
from engine.optimizers import build_optimizer
from engine.run import run
from sophia import SophiaG
from train_helpers import compose_cfg, read_metrics, tiny_overrides

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class _Softmax(nn.Module):
    """z = W x + b on float inputs [rows, T, d]; returns (logits, None) like the GPT."""

    def __init__(self, d: int, vocab: int, scale: float):
        super().__init__()
        self.lin = nn.Linear(d, vocab).double()
        with torch.no_grad():
            self.lin.weight.mul_(scale)
            self.lin.bias.mul_(scale)

    def forward(self, x):
        return self.lin(x), None


def _setup(m: int, rows: int, T: int, *, d: int = 3, vocab: int = 4, scale: float = 0.5,
           same_inputs: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = _Softmax(d, vocab, scale)
    gen = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(rows, T, d, dtype=torch.float64, generator=gen) for _ in range(m)]
    if same_inputs:
        xs = [xs[0]] * m
    plan = plan_batches(m * rows * T, T, rows, 1)

    def get_batch(step, micro, stream):
        return xs[micro], None  # the inputs never change; only the sampled labels do

    return model, xs, plan, get_batch


def _estimates(estimator: str, model, plan, get_batch, draws: int, grad_clip: float = 0.0):
    """`draws` refreshes; row r is the estimate bs * h the optimizer holds after refresh r."""
    opt = SophiaG(model.parameters(), betas=(0.9, 0.0))  # beta2 = 0: h is the last estimate
    ref = HessianRefresher(estimator, 1, plan, None, CPU, seed=7, flops_per_token=1.0,
                           grad_clip=grad_clip)
    bs = ref.step_kwargs()["bs"]
    params = list(model.parameters())
    out = []
    for step in range(draws):  # the step keys the label draw: independent labels per refresh
        ref.refresh(step, model, model, opt, get_batch, contextlib.nullcontext)
        out.append(torch.cat([bs * opt.state[p]["hessian"].flatten() for p in params]))
    return torch.stack(out)


def _token_moments(model, x):
    """Per token and coordinate (W then b, flattened like the parameters): sigma^2 and kappa."""
    W, b = model.lin.weight.detach(), model.lin.bias.detach()
    xt = x.reshape(-1, x.size(-1))  # [n, d]
    p = torch.softmax(xt @ W.T + b, -1)  # [n, V]
    q = 1 - p
    var = p * q
    m4 = p * q**4 + q * p**4
    kappa = m4 - 3 * var**2
    sig_W = (var[:, :, None] * xt[:, None, :] ** 2).flatten(1)
    kap_W = (kappa[:, :, None] * xt[:, None, :] ** 4).flatten(1)
    return torch.cat([sig_W, var], 1), torch.cat([kap_W, kappa], 1)


def _exact(model, xs):
    """(D, Var(gnb), Var(gnb_msq)) per coordinate, from the formulas in the module docstring."""
    moments = [_token_moments(model, x) for x in xs]
    t = xs[0].shape[0] * xs[0].shape[1]
    m, B = len(xs), len(xs) * t
    sig_all = sum(s.sum(0) for s, _ in moments)
    kap_all = sum(k.sum(0) for _, k in moments)
    D = sig_all / B
    var_gnb = (2 * sig_all**2 + kap_all) / B**2
    var_msq = sum((2 * s.sum(0) ** 2 + k.sum(0)) / t**2 for s, k in moments) / m**2
    return D, var_gnb, var_msq


def _check_mean_and_variance(est: torch.Tensor, D: torch.Tensor, var: torch.Tensor) -> None:
    R = est.shape[0]
    mean, se = est.mean(0), est.std(0) / R**0.5
    assert ((mean - D).abs() < 5 * se).all(), (mean, D, se)  # unbiased, per coordinate
    assert (se < 0.1 * D).all()  # ... with power to see a missing factor
    # The variance, pooled over coordinates: q_r = mean_i (est_ri - D_i)^2 / Var_i has expectation
    # exactly 1 (D is known, not estimated), and its draws are i.i.d., so their spread gives the SE.
    q = ((est - D) ** 2 / var).mean(1)
    q_se = q.std() / R**0.5
    assert abs(q.mean() - 1) < 5 * q_se, (q.mean(), q_se)
    assert q_se < 0.05  # a 25% error in the variance formula would fail


@pytest.mark.parametrize("m", [1, 4])
def test_msq_is_unbiased_with_the_predicted_variance(m: int) -> None:
    model, xs, plan, get_batch = _setup(m, rows=2, T=4)
    D, var_gnb, var_msq = _exact(model, xs)
    est = _estimates("gnb_msq", model, plan, get_batch, draws=1500)
    _check_mean_and_variance(est, D, var_msq)
    if m == 1:  # one micro-batch: the two estimators are the same estimate
        torch.testing.assert_close(var_msq, var_gnb)


def test_official_gnb_has_the_predicted_variance() -> None:
    model, xs, plan, get_batch = _setup(4, rows=2, T=4)
    D, var_gnb, _ = _exact(model, xs)
    _check_mean_and_variance(_estimates("gnb", model, plan, get_batch, draws=1500), D, var_gnb)


def test_relative_noise_is_2_for_gnb_and_2_over_m_for_msq() -> None:
    """The headline: relative variance ~2 for gnb at any batch size, ~2/m for gnb_msq.

    Equal micro-batches (the same inputs in each), so the docstring's closed forms apply:
    Var/D^2 = 2 + K/B (gnb) and (2 + K/t)/m (gnb_msq). Near-uniform predictions keep K of order 1
    (for p = 1/4, kappa/sigma^4 = (1 - 6pq)/(pq) = -2/3; the spread of x adds to it), so with
    t = 32 tokens per micro-batch both sit within 5% of 2 and 2/m; the Monte Carlo must agree with
    the exact values (5 SE of the pooled relative variance).
    """
    m = 4
    model, xs, plan, get_batch = _setup(m, rows=4, T=8, same_inputs=True, scale=0.2)
    D, var_gnb, var_msq = _exact(model, xs)
    rel_gnb, rel_msq = (var_gnb / D**2).mean(), (var_msq / D**2).mean()
    assert rel_gnb == pytest.approx(2.0, rel=0.05) and rel_msq == pytest.approx(2.0 / m, rel=0.05)
    for estimator, rel in (("gnb", rel_gnb), ("gnb_msq", rel_msq)):
        est = _estimates(estimator, model, plan, get_batch, draws=1500)
        per_draw = ((est - D) ** 2 / D**2).mean(1)  # i.i.d. over draws, mean = rel
        se = per_draw.std() / len(per_draw) ** 0.5
        assert abs(per_draw.mean() - rel) < 5 * se, (estimator, per_draw.mean(), rel, se)
        assert se < 0.1 * rel


def test_msq_with_one_micro_batch_equals_gnb() -> None:
    model, _, plan, get_batch = _setup(1, rows=3, T=5)
    a = _estimates("gnb", model, plan, get_batch, draws=3)
    b = _estimates("gnb_msq", model, plan, get_batch, draws=3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)  # same labels, same number


def test_msq_accounting_and_bs_are_gnb_s() -> None:
    model, _, plan, get_batch = _setup(4, rows=2, T=4)
    costs = {}
    for estimator in ("gnb", "gnb_msq"):
        ref = HessianRefresher(estimator, 3, plan, 2, CPU, seed=0, flops_per_token=10.0)
        opt = SophiaG(model.parameters())
        ref.refresh(2, model, model, opt, get_batch, contextlib.nullcontext)
        costs[estimator] = (ref.step_kwargs(), ref.cost.tokens, ref.cost.flops)
    # 2 micro-batches of 8 tokens: bs 16, the same forward/backward passes
    assert costs["gnb"] == costs["gnb_msq"] == ({"bs": 16}, 16, 160.0)


def test_msq_clip_mirrors_the_official_clip() -> None:
    """The official clip scales g to norm <= c, so sum(stored g^2) <= c^2; gnb_msq applies the same
    rule to its stored estimate / bs. A loose clip leaves the estimate alone."""
    model, _, plan, get_batch = _setup(4, rows=2, T=4)
    free = _estimates("gnb_msq", model, plan, get_batch, draws=2)
    bs = plan.global_batch_tokens
    norms = (free.sum(1) / bs).sqrt()
    c = 0.5 * norms.min().item()
    clipped = _estimates("gnb_msq", model, plan, get_batch, draws=2, grad_clip=c)
    # clip_grad_norm_'s coefficient c / (norm + 1e-6): c^2 up to that 1e-6
    torch.testing.assert_close(clipped.sum(1) / bs, torch.full((2,), c**2, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(clipped / clipped.sum(1, keepdim=True), free / free.sum(1, keepdim=True))
    loose = _estimates("gnb_msq", model, plan, get_batch, draws=2, grad_clip=10 * norms.max().item())
    torch.testing.assert_close(loose, free)


# ----------------------------------------------------------------- SophiaG.update_hessian(estimates)
def test_update_hessian_with_estimates_stores_estimate_over_bs() -> None:
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    opt = SophiaG([p, q], betas=(0.9, 0.8))
    est = torch.tensor([4.0, 8.0, 0.0])
    opt.update_hessian([est, None], bs=4)
    opt.update_hessian({p: est}, bs=4)
    torch.testing.assert_close(opt.state[p]["hessian"], (1 - 0.8**2) * est / 4)
    assert q not in opt.state  # None entries are skipped, as for SophiaH


def test_update_hessian_estimates_step_like_the_official_squares() -> None:
    """Feeding estimate e with bs gives the same step as the official path whose g^2 = e / bs."""
    torch.manual_seed(0)
    est = torch.rand(5) * 3
    bs = 7
    runs = []
    for feed in ("official", "estimates"):
        p = nn.Parameter(torch.ones(5))
        opt = SophiaG([p], lr=0.1, rho=0.5, betas=(0.9, 0.5))
        if feed == "official":
            p.grad = (est / bs).sqrt()
            opt.update_hessian()
        else:
            opt.update_hessian([est], bs=bs)
        p.grad = torch.tensor([0.3, -0.2, 0.1, 0.05, -1.0])
        opt.step(bs=bs)
        runs.append((p.detach().clone(), opt.state[p]["hessian"].clone()))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_update_hessian_refuses_inconsistent_arguments() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = SophiaG([p])
    with pytest.raises(ValueError, match="needs bs="):
        opt.update_hessian([torch.ones(3)])
    with pytest.raises(ValueError, match=r"bs=4\) without estimates"):
        opt.update_hessian(bs=4)
    with pytest.raises(ValueError, match="Invalid bs=0"):
        opt.update_hessian([torch.ones(3)], bs=0)
    with pytest.raises(ValueError, match="2 estimates for 1"):
        opt.update_hessian([torch.ones(3), torch.ones(3)], bs=1)
    with pytest.raises(ValueError, match="does not match"):
        opt.update_hessian([torch.ones(4)], bs=1)


def test_negative_estimates_and_state_are_refused_before_anything_changes() -> None:
    # A negative h could make SophiaG's denominator negative, where the clip is undefined.
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    opt = SophiaG([p, q])
    opt.update_hessian([torch.ones(3), torch.ones(2)], bs=2)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"estimate has a negative entry \(minimum -0.5\).*"
                       r"SophiaH for signed"):
        opt.update_hessian([torch.ones(3), torch.tensor([1.0, -0.5])], bs=2)
    assert torch.equal(opt.state[q]["hessian"], before["state"][1]["hessian"])
    opt.update_hessian({p: torch.zeros(3)}, bs=2)  # zeros are fine

    bad = SophiaG([p, q]).state_dict()
    bad["state"] = {i: {k: v.clone() for k, v in st.items()} for i, st in before["state"].items()}
    bad["state"][0]["hessian"][1] = -1e-3
    fresh = SophiaG([p, q])
    with pytest.raises(ValueError, match=r"state dict's hessian has a negative entry"):
        fresh.load_state_dict(bad)
    assert fresh.state_dict()["state"] == {}
    fresh.load_state_dict(before)
    assert torch.equal(fresh.state[p]["hessian"], before["state"][0]["hessian"])


# ------------------------------------------------------------------------------ config, end to end
def test_the_estimator_key_is_checked() -> None:
    model = nn.Linear(3, 2)
    cfg = {"name": "sophia", "lr": 1e-3, "betas": [0.9, 0.99], "k": 10}
    assert build_optimizer(cfg, model).hessian_estimator == "gnb"  # default
    setup = build_optimizer({**cfg, "hessian_estimator": "gnb_msq"}, model)
    assert setup.hessian_estimator == "gnb_msq"
    with pytest.raises(HarnessError, match=r"hessian_estimator='gnb2' is not one of gnb, gnb_msq"):
        build_optimizer({**cfg, "hessian_estimator": "gnb2"}, model)
    with pytest.raises(HarnessError, match="use optimizer=sophiah"):
        build_optimizer({**cfg, "hessian_estimator": "hutchinson"}, model)


def test_training_with_gnb_msq_runs_end_to_end(tiny_data, tmp_path) -> None:
    finals = {}
    for estimator in ("gnb", "gnb_msq"):
        run_dir = tmp_path / estimator
        run(compose_cfg(tiny_overrides(tiny_data, "sophia", **{
            "optimizer.hessian_estimator": estimator, "train.max_steps": 20})), run_dir)
        rows = read_metrics(run_dir)
        last = rows[-1]
        assert last["step"] == 20 and 0 < last["val/loss"] < 6
        assert last["hessian/l1"] > 0 and 0 <= last["sophia/win_rate"] <= 1
        ckpt = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
        assert ckpt["config"]["optimizer"]["hessian_estimator"] == estimator
        finals[estimator] = last
    # 4 refreshes (k = 5) of all 2 micro-batches x 128 tokens, billed identically
    for key in ("tokens", "tokens_hessian", "flops"):
        assert finals["gnb"][key] == finals["gnb_msq"][key], key
    assert finals["gnb"]["tokens_hessian"] == 4 * 256
