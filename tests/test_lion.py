"""Lion: equality with lion_pytorch, state-dict interchange, paths, telemetry, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sophia import Lion

lion_pytorch = pytest.importorskip("lion_pytorch")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))


def _groups(model: nn.Module) -> list[dict]:
    return [
        {"params": [model[0].weight]},
        {"params": [model[0].bias, model[2].bias], "lr": 3e-3, "weight_decay": 0.0},
        {"params": [model[2].weight], "lr": 5e-4, "weight_decay": 0.5, "betas": (0.95, 0.98)},
    ]


def _train(model, opt, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + t)
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_lion_pytorch(foreach: bool) -> None:
    a, b = _model(), _model()
    ours = Lion(_groups(a), lr=1e-3, weight_decay=0.1, foreach=foreach)
    ref = lion_pytorch.Lion(_groups(b), lr=1e-3, weight_decay=0.1)
    _train(a, ours, 30)
    _train(b, ref, 30)
    _assert_same(a, b)
    assert not torch.equal(a[0].weight, _model()[0].weight)
    for sa, sb in zip(ours.state.values(), ref.state.values()):
        assert set(sa) == set(sb) == {"exp_avg"}
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_both_directions(foreach: bool) -> None:
    ref_model = _model()
    ref = lion_pytorch.Lion(_groups(ref_model), lr=1e-3)
    _train(ref_model, ref, 10)
    ours_model = copy.deepcopy(ref_model)
    ours = Lion(_groups(ours_model), lr=1e-3, foreach=foreach)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    _train(ref_model, ref, 10, start=10)
    _train(ours_model, ours, 10, start=10)
    _assert_same(ours_model, ref_model)

    ref2_model = copy.deepcopy(ours_model)
    ref2 = lion_pytorch.Lion(_groups(ref2_model), lr=1e-3)
    ref2.load_state_dict(copy.deepcopy(ours.state_dict()))
    _train(ours_model, ours, 10, start=20)
    _train(ref2_model, ref2, 10, start=20)
    _assert_same(ours_model, ref2_model)


def test_paths_agree_with_maximize() -> None:
    a, b = _model(), _model()
    oa = Lion(_groups(a), lr=1e-3, maximize=True, foreach=False)
    ob = Lion(_groups(b), lr=1e-3, maximize=True, foreach=True)
    _train(a, oa, 15)
    _train(b, ob, 15)
    _assert_same(a, b)
    torch.testing.assert_close(oa.telemetry()["update_rms"], ob.telemetry()["update_rms"])


def test_maximize_is_minimize_of_negated_loss() -> None:
    p, q = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    up, down = Lion([p], lr=0.1, maximize=True), Lion([q], lr=0.1)
    g = torch.tensor([1.0, -2.0, 3.0, 0.5])
    p.grad, q.grad = g.clone(), -g
    up.step()
    down.step()
    torch.testing.assert_close(p, q)
    torch.testing.assert_close(p.detach(), 1 + 0.1 * g.sign())


@pytest.mark.parametrize("foreach", [False, True])
def test_telemetry_is_rms_of_update(foreach: bool) -> None:
    model = _model()
    lr, wd = 1e-2, 0.2
    opt = Lion(model.parameters(), lr=lr, weight_decay=wd, foreach=foreach)
    assert opt.telemetry() == {}
    _train(model, opt, 3)
    for p in model.parameters():  # exact zeros: those coordinates must not count as moved
        p.grad = torch.zeros_like(p)
    model[2].bias.grad = torch.zeros_like(model[2].bias)
    opt.state[model[2].bias]["exp_avg"].zero_()
    before = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad = torch.randn_like(model[0].weight)
    opt.step()
    delta = torch.cat(
        [(b * (1 - lr * wd) - p.detach()).flatten() for b, p in zip(before, model.parameters())]
    )
    tel = opt.telemetry()
    assert set(tel) == {"update_rms"} and tel["update_rms"].dim() == 0
    assert (delta.abs() < 1e-9).any()
    torch.testing.assert_close(tel["update_rms"], delta.square().mean().sqrt(), rtol=1e-4, atol=0)


def test_skips_params_without_grad_and_rejects_sparse() -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = Lion([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and b not in opt.state
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        Lion(emb.parameters()).step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, r"lr=-1\.0"),
        ({"betas": (0.9, 1.0)}, r"beta2=1\.0.*\[0, 1\)"),
        ({"betas": (-0.1, 0.99)}, r"beta1=-0\.1"),
        ({"weight_decay": -1e-2}, r"weight_decay=-0\.01"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Lion([nn.Parameter(torch.zeros(2))], **kwargs)
