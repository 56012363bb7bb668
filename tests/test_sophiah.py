"""SophiaH: update rule against an independent transcription, update_hessian inputs, telemetry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sophia import SophiaH
from sophia.hessian import hutchinson


def _transcribed_step(p, g, m, h, *, lr, beta1, rho, wd, eps):
    """The SophiaH update (docs/optimizers.md#sophiah) on plain tensors: new p, m."""
    p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    ratio = torch.clamp(m.abs() / torch.clamp(rho * h, min=eps), max=1)
    return p - lr * torch.sign(m) * ratio, m


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_transcription_with_negative_curvature(foreach: bool) -> None:
    torch.manual_seed(0)
    hp = dict(lr=0.05, beta1=0.9, rho=0.5, wd=0.1, eps=1e-3)
    beta2 = 0.8
    p = nn.Parameter(torch.randn(20))
    opt = SophiaH(
        [p], lr=hp["lr"], betas=(hp["beta1"], beta2), rho=hp["rho"], weight_decay=hp["wd"],
        eps=hp["eps"], foreach=foreach,
    )
    ref_p, m, h = p.detach().clone(), torch.zeros(20), torch.zeros(20)
    for t in range(20):
        g = torch.randn(20)
        p.grad = g.clone()
        opt.step()
        ref_p, m = _transcribed_step(ref_p, g, m, h, **hp)
        if t % 3 == 2:
            est = torch.randn(20)  # includes negative "curvature": the eps floor must kick in
            opt.update_hessian([est])
            h = beta2 * h + (1 - beta2) * est
    assert (h < 0).any()
    torch.testing.assert_close(p.detach(), ref_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["hessian"], h, rtol=1e-5, atol=1e-7)


def _two_group_opt(foreach: bool):
    torch.manual_seed(1)
    a, b, c = (nn.Parameter(torch.randn(s)) for s in ((3, 4), (5,), (2, 2)))
    opt = SophiaH(
        [{"params": [a, b]}, {"params": [c], "lr": 0.02, "rho": 0.2, "betas": (0.9, 0.5)}],
        lr=0.01, foreach=foreach,
    )
    return opt, (a, b, c)


def test_update_hessian_sequence_dict_and_none() -> None:
    opt, (a, b, c) = _two_group_opt(False)
    ea, ec = torch.full_like(a, 2.0), torch.full_like(c, -4.0)
    opt.update_hessian([ea, None, ec])
    torch.testing.assert_close(opt.state[a]["hessian"], (1 - 0.99) * ea)
    torch.testing.assert_close(opt.state[c]["hessian"], (1 - 0.5) * ec)  # group's own beta2
    assert b not in opt.state
    opt.update_hessian({c: ec})
    torch.testing.assert_close(opt.state[c]["hessian"], (1 - 0.5**2) * ec)
    torch.testing.assert_close(opt.state[a]["hessian"], (1 - 0.99) * ea)  # untouched


def test_update_hessian_rejects_misaligned_input() -> None:
    opt, (a, b, c) = _two_group_opt(False)
    with pytest.raises(ValueError, match="2 estimates for 3 parameters"):
        opt.update_hessian([a, b])
    with pytest.raises(ValueError, match="shape"):
        opt.update_hessian([torch.zeros(3), None, None])
    with pytest.raises(ValueError, match="not a parameter"):
        opt.update_hessian({torch.zeros(2): torch.zeros(2)})


def test_paths_agree_with_hutchinson_and_telemetry() -> None:
    results = []
    for foreach in (False, True):
        opt, params = _two_group_opt(foreach)
        for t in range(12):
            loss = sum((p**4).sum() + (p**2).sum() for p in params)
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            if t % 4 == 3:
                loss = sum((p**4).sum() + (p**2).sum() for p in params)
                opt.update_hessian(hutchinson(loss, params, torch.Generator().manual_seed(t)))
        results.append(([p.detach().clone() for p in params], opt.telemetry()))
    (pa, ta), (pb, tb) = results
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k])


@pytest.mark.parametrize("foreach", [False, True])
def test_telemetry_matches_state(foreach: bool) -> None:
    opt, params = _two_group_opt(foreach)
    assert opt.telemetry() == {}
    opt.update_hessian([torch.rand_like(p) * 0.3 for p in params])
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    tel = opt.telemetry()
    clipped = sq = n = 0
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state[p]
            denom = (group["rho"] * s["hessian"]).clamp(min=group["eps"])
            ratio = (s["exp_avg"].abs() / denom).clamp(max=1)
            clipped += (s["exp_avg"].abs() >= denom).sum()
            sq += group["lr"] ** 2 * ratio.square().sum()
            n += p.numel()
    assert 0 < clipped < n
    h = torch.cat([opt.state[p]["hessian"].flatten() for p in params])
    torch.testing.assert_close(tel["clip_frac"], clipped / n)
    torch.testing.assert_close(tel["win_rate"], 1 - clipped / n)
    torch.testing.assert_close(tel["hessian_l1"], h.abs().sum())
    torch.testing.assert_close(tel["hessian_l2"], h.norm())
    torch.testing.assert_close(tel["update_rms"], (sq / n).sqrt())
    flat = [(g, p) for g in opt.param_groups for p in g["params"]]  # same order as `params`
    delta = torch.cat(
        [(b * (1 - g["lr"] * g["weight_decay"]) - p.detach()).flatten()
         for (g, p), b in zip(flat, before)]
    )
    torch.testing.assert_close(tel["update_rms"], delta.square().mean().sqrt(), rtol=1e-4, atol=0)


def test_minimises_a_quadratic_with_hutchinson() -> None:
    torch.manual_seed(0)
    diag = torch.tensor([100.0, 1.0, 0.01])
    x = nn.Parameter(torch.tensor([1.0, -1.0, 1.0]) * 0.05)
    opt = SophiaH([x], lr=0.02, rho=1.0, weight_decay=0.0, betas=(0.9, 0.9))
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = 0.5 * (diag * x**2).sum()
        (g,) = torch.autograd.grad(loss, [x])
        x.grad = g
        opt.step()
        opt.update_hessian(hutchinson(0.5 * (diag * x**2).sum(), [x], generator=gen))
    torch.testing.assert_close(opt.state[x]["hessian"], diag, rtol=1e-3, atol=0)
    assert x.abs().max() < 1e-3  # Newton-like in every direction, whatever the curvature


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, r"lr=-1\.0"),
        ({"rho": 0}, r"rho=0"),
        ({"eps": 0.0}, r"eps=0\.0"),
        ({"eps": -1e-8}, r"eps=-1e-08"),
        ({"betas": (0.9, 1.5)}, r"beta2=1\.5"),
        ({"weight_decay": -1}, r"weight_decay=-1"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SophiaH([nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradients_are_rejected() -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        SophiaH(emb.parameters()).step()
