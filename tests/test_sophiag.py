"""SophiaG: equality with the official implementation, state-dict interchange, telemetry, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sophia import SophiaG
from sophia.hessian import gnb_loss

sophia_opt = pytest.importorskip("sophia_opt")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))


def _groups(model: nn.Module) -> list[dict]:
    # three groups with their own lr / rho / weight decay / betas
    first, act, last = model[0], model[1], model[2]
    del act
    return [
        {"params": [first.weight]},
        {"params": [first.bias, last.bias], "lr": 3e-2, "rho": 0.1, "weight_decay": 0.0},
        {"params": [last.weight], "lr": 5e-3, "weight_decay": 0.3, "betas": (0.9, 0.95)},
    ]


def _train(model, opt, steps: int, start: int = 0, hessian_every: int = 3, official=False):
    """Real gradients of a small classifier; GNB refresh every few steps with varying bs."""
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + t)
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step(bs=16 + t)
        if t % hessian_every == hessian_every - 1:
            opt.zero_grad(set_to_none=True)
            gnb_loss(model(x), generator=torch.Generator().manual_seed(t)).backward()
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_official(foreach: bool, maximize: bool) -> None:
    ours_model, ref_model = _model(), _model()
    ours = SophiaG(_groups(ours_model), lr=1e-2, maximize=maximize, foreach=foreach)
    ref = sophia_opt.SophiaG(_groups(ref_model), lr=1e-2, maximize=maximize)
    _train(ours_model, ours, 30)
    _train(ref_model, ref, 30)
    # bit for bit: both paths apply the official code's operations in its order (on CPU a
    # torch._foreach_* op is the per-tensor op in a loop)
    for pa, pb in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for p in ours_model.parameters():
        assert not torch.equal(p, _model().state_dict()[_name(ours_model, p)])  # it did move
    for (sa, sb) in zip(ours.state.values(), ref.state.values(), strict=True):
        assert set(sa) == set(sb) == {"step", "exp_avg", "hessian"}
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["hessian"], sb["hessian"])
        assert sa["step"].shape == sb["step"].shape and sa["step"].dtype == sb["step"].dtype
        assert sa["step"].item() == sb["step"].item() == 30


def _name(model: nn.Module, p: torch.Tensor) -> str:
    return next(n for n, q in model.named_parameters() if q is p)


def test_reference_and_foreach_paths_agree() -> None:
    a, b = _model(), _model()
    oa = SophiaG(_groups(a), lr=1e-2, foreach=False)
    ob = SophiaG(_groups(b), lr=1e-2, foreach=True)
    _train(a, oa, 25, hessian_every=2)
    _train(b, ob, 25, hessian_every=2)
    _assert_same(a, b)
    for k in oa.telemetry():
        torch.testing.assert_close(oa.telemetry()[k], ob.telemetry()[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_official_into_ours_and_back(foreach: bool) -> None:
    # official -> ours: train theirs, load their state into ours, continue both equally
    ref_model = _model()
    ref = sophia_opt.SophiaG(_groups(ref_model), lr=1e-2)
    _train(ref_model, ref, 10)
    ours_model = copy.deepcopy(ref_model)
    ours = SophiaG(_groups(ours_model), lr=1e-2, foreach=foreach)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # as if through torch.save/load
    _train(ref_model, ref, 10, start=10)
    _train(ours_model, ours, 10, start=10)
    _assert_same(ours_model, ref_model)

    # ours -> official
    ref2_model = copy.deepcopy(ours_model)
    ref2 = sophia_opt.SophiaG(_groups(ref2_model), lr=1e-2)
    ref2.load_state_dict(copy.deepcopy(ours.state_dict()))
    _train(ours_model, ours, 10, start=20)
    _train(ref2_model, ref2, 10, start=20)
    _assert_same(ours_model, ref2_model)
    assert set(next(iter(ours.state.values()))) == {"step", "exp_avg", "hessian"}


def test_update_hessian_is_ema_of_squared_grad() -> None:
    p = nn.Parameter(torch.zeros(4))
    opt = SophiaG([p], betas=(0.9, 0.8))
    g = torch.tensor([1.0, -2.0, 0.5, 0.0])
    p.grad = g.clone()
    opt.update_hessian()
    opt.update_hessian()
    torch.testing.assert_close(opt.state[p]["hessian"], (1 - 0.8**2) * g * g)


@pytest.mark.parametrize("foreach", [False, True])
def test_telemetry_matches_state(foreach: bool) -> None:
    model = _model()
    lr, rho, wd, bs = 2e-2, 0.05, 0.1, 40
    opt = SophiaG(model.parameters(), lr=lr, rho=rho, weight_decay=wd, foreach=foreach)
    assert opt.telemetry() == {}
    _train(model, opt, 6, hessian_every=2)  # h set, not zero
    x = torch.randn(16, 6)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(bs=bs)
    tel = opt.telemetry()
    assert set(tel) == {"clip_frac", "win_rate", "hessian_l1", "hessian_l2", "update_rms"}
    assert all(v.dim() == 0 and v.device == before[0].device for v in tel.values())

    ps = list(model.parameters())
    m = torch.cat([opt.state[p]["exp_avg"].flatten() for p in ps])
    h = torch.cat([opt.state[p]["hessian"].flatten() for p in ps])
    ratio = (m.abs() / (rho * bs * h + 1e-15)).clamp(max=1)
    clip_frac = (m.abs() >= rho * bs * h).float().mean()
    assert 0.0 < clip_frac < 1.0  # the check below is not trivially 0 or 1
    torch.testing.assert_close(tel["clip_frac"], clip_frac)
    torch.testing.assert_close(tel["win_rate"], 1 - clip_frac)
    torch.testing.assert_close(tel["hessian_l1"], h.abs().sum())
    torch.testing.assert_close(tel["hessian_l2"], h.norm())
    torch.testing.assert_close(tel["update_rms"], lr * ratio.square().mean().sqrt())
    # and it is the RMS of the actual parameter change without weight decay
    delta = torch.cat([(b * (1 - lr * wd) - p.detach()).flatten() for b, p in zip(before, ps)])
    torch.testing.assert_close(tel["update_rms"], delta.square().mean().sqrt(), rtol=1e-4, atol=0)


def test_telemetry_hessian_norms_follow_load_state_dict() -> None:
    model = _model()
    opt = SophiaG(model.parameters(), lr=1e-2)
    _train(model, opt, 4, hessian_every=2)
    sd = opt.state_dict()
    for s in sd["state"].values():
        s["hessian"] = s["hessian"] * 2
    opt.load_state_dict(sd)
    assert opt.telemetry() == {}
    _train(model, opt, 1, start=4)  # step 4: no Hessian refresh
    h = torch.cat([s["hessian"].flatten() for s in opt.state.values()])
    torch.testing.assert_close(opt.telemetry()["hessian_l1"], h.abs().sum())


def test_params_without_grad_are_skipped() -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = SophiaG([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and b not in opt.state
    assert not torch.equal(a, torch.ones(3))


def test_sparse_gradients_are_rejected() -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        SophiaG(emb.parameters()).step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1e-3}, r"lr=-0\.001"),
        ({"rho": 0.0}, r"rho=0\.0.*> 0"),
        ({"rho": -0.1}, r"rho=-0\.1"),
        ({"betas": (1.0, 0.99)}, r"beta1=1\.0.*\[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"beta2=-0\.1"),
        ({"betas": (0.9,)}, r"betas"),
        ({"weight_decay": -0.1}, r"weight_decay=-0\.1"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SophiaG([nn.Parameter(torch.zeros(2))], **kwargs)


def test_invalid_group_and_bs() -> None:
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"lr=-1.*param group 1"):
        SophiaG([{"params": [p]}, {"params": [q], "lr": -1}])
    opt = SophiaG([p])
    p.grad = torch.ones(2)
    for bad in (0, -5):
        with pytest.raises(ValueError, match=rf"bs={bad}"):
            opt.step(bs=bad)


def test_lr_conversion_reproduces_the_paper_update() -> None:
    from sophia import code_to_paper_lr, paper_to_code_lr

    eta, rho, bs = 0.5, 0.04, 10
    g = torch.tensor([0.5, -0.01, 3e-4, 0.0, -2.0])
    h_hat = torch.tensor([1.0, 1.0, 0.01, 1.0, 0.0])  # the GNB estimate bs * g_hat^2
    p = nn.Parameter(torch.zeros(5))
    opt = SophiaG([p], lr=paper_to_code_lr(eta, rho), betas=(0.0, 0.0), rho=rho, weight_decay=0)
    opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros(5), hessian=h_hat / bs)
    p.grad = g.clone()
    opt.step(bs=bs)
    # paper (Algorithm 3): theta -= eta * clip(m / max(h, eps), rho), with m = g when beta1 = 0
    paper = -eta * torch.clamp(g / h_hat.clamp(min=1e-15), -rho, rho)
    torch.testing.assert_close(p.detach(), paper)
    assert code_to_paper_lr(paper_to_code_lr(eta, rho), rho) == pytest.approx(eta)


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_official_where_the_denominator_eps_matters(foreach: bool) -> None:
    # h = 0 (no refresh yet) and |m| ~ 1e-15: the ratio is decided by the 1e-15 in the denominator
    grads = torch.tensor([1e-16, -3e-15, 2e-14, 0.0, 5e-17]).repeat(3, 1)
    a, b = nn.Parameter(torch.ones(3, 5)), nn.Parameter(torch.ones(3, 5))
    ours = SophiaG([a], lr=0.1, weight_decay=0.0, foreach=foreach)
    ref = sophia_opt.SophiaG([b], lr=0.1, weight_decay=0.0)
    for scale in (1.0, 0.5, 3.0):
        a.grad, b.grad = grads * scale, grads * scale
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert 0 < ours.telemetry()["clip_frac"] < 1
