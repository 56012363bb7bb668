"""SOAP: equality with pytorch_optimizer.SOAP, the set-up step, state-dict round trip, errors."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from sophia import SOAP

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

# float64 throughout the comparisons: both implementations then run the same float64 kernels on
# the same inputs, and the one float32 step (the QR of the refresh, which both do in float32)
# sees identical inputs, so the results agree to rounding on any CPU.
DTYPE = torch.float64


def _reference(params, **kwargs):
    """pytorch_optimizer.SOAP with our argument names (it spells two of them differently)."""
    renamed = {"max_precond_dim": "max_precondition_dim", "normalize_grads": "normalize_gradient"}
    return pytorch_optimizer.SOAP(params, **{renamed.get(k, k): v for k, v in kwargs.items()})


def _mlp(seed: int = 0) -> nn.Module:
    # 12 -> 16 -> 24 -> 5: with max_precond_dim=20 the 24-wide sides get no factor (identity).
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 5)
    ).to(DTYPE)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    # batch 64 > every preconditioned width, so the factors are full rank and well separated
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + t)
        x = torch.randn(64, 12, generator=g, dtype=DTYPE)
        y = torch.randn(64, 5, generator=g, dtype=DTYPE)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14, msg=name)


_SETTINGS = {
    "default": dict(),
    "1d_normalized": dict(precondition_1d=True, normalize_grads=True),
    "shampoo_beta_no_bias_correction": dict(shampoo_beta=0.8, correct_bias=False,
                                            betas=(0.9, 0.99)),
}


@pytest.mark.parametrize("extra", _SETTINGS.values(), ids=_SETTINGS.keys())
def test_matches_pytorch_optimizer(extra: dict) -> None:
    settings = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, precondition_frequency=3,
                    max_precond_dim=20) | extra
    a, b = _mlp(), _mlp()
    groups_a = [{"params": [a[0].weight, a[2].weight, a[4].weight]},
                {"params": [a[0].bias, a[2].bias, a[4].bias], "weight_decay": 0.0}]
    groups_b = [{"params": [b[0].weight, b[2].weight, b[4].weight]},
                {"params": [b[0].bias, b[2].bias, b[4].bias], "weight_decay": 0.0}]
    ours, ref = SOAP(groups_a, **settings), _reference(groups_b, **settings)
    # 13 steps: the set-up, then 12 updates, with basis refreshes after updates 3, 6, 9 and 12
    for t in range(13):
        _train(a, ours, 1, start=t)
        _train(b, ref, 1, start=t)
        _assert_same(a, b)
    assert not torch.equal(a[2].weight, _mlp()[2].weight)
    state = ours.state[a[2].weight]  # 24 x 16: a factor for the 16 side only
    assert int(state["step"]) == 12
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "GG1", "Q1"}
    torch.testing.assert_close(state["exp_avg_sq"], ref.state[b[2].weight]["exp_avg_sq"],
                               rtol=1e-12, atol=1e-14)


def test_merge_dims_matches_pytorch_optimizer() -> None:
    # (4, 8, 6) merges into (32, 6) and (8, 10) stays, in both implementations; pytorch_optimizer
    # fails on tensors that merge into a single dimension, so none is used here.
    torch.manual_seed(0)
    init = [torch.randn(4, 8, 6, dtype=DTYPE), torch.randn(8, 10, dtype=DTYPE)]
    ours_params = [nn.Parameter(t.clone()) for t in init]
    ref_params = [nn.Parameter(t.clone()) for t in init]
    settings = dict(lr=1e-2, weight_decay=0.1, precondition_frequency=3, max_precond_dim=40,
                    merge_dims=True)
    ours, ref = SOAP(ours_params, **settings), _reference(ref_params, **settings)
    for t in range(13):
        g = torch.Generator().manual_seed(t)
        grads = [torch.randn(t.shape, generator=g, dtype=DTYPE) for t in init]
        for params, opt in ((ours_params, ours), (ref_params, ref)):
            for p, grad in zip(params, grads):
                p.grad = grad + 0.1 * p.detach()  # a gradient that depends on the parameter
            opt.step()
    for p, q in zip(ours_params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert {k: tuple(v.shape) for k, v in ours.state[ours_params[0]].items() if k[0] in "GQ"} == {
        "GG0": (32, 32), "GG1": (6, 6), "Q0": (32, 32), "Q1": (6, 6)}


def test_merge_dims_into_one_factor() -> None:
    # a matrix with rows * cols <= max_precond_dim merges into one vector with one full factor
    p = nn.Parameter(torch.randn(6, 5, dtype=DTYPE))
    opt = SOAP([p], merge_dims=True, max_precond_dim=40)
    for _ in range(3):
        p.grad = torch.randn(6, 5, dtype=DTYPE)
        opt.step()
    assert {k: tuple(v.shape) for k, v in opt.state[p].items() if k[0] in "GQ"} == {
        "GG0": (30, 30), "Q0": (30, 30)}


def test_first_step_only_sets_up() -> None:
    model = _mlp()
    before = copy.deepcopy(model)
    opt = SOAP(model.parameters(), lr=1e-2, weight_decay=0.5, max_precond_dim=20)
    _train(model, opt, 1)
    _assert_same(model, before)  # no update and no weight decay on the set-up call
    state = opt.state[model[0].weight]  # 16 x 12: factors on both sides
    assert int(state["step"]) == 0
    for i, n in enumerate((16, 12)):
        q = state[f"Q{i}"]
        torch.testing.assert_close(q.T @ q, torch.eye(n, dtype=DTYPE))  # orthonormal columns
        eigenvalues = torch.diagonal(q.T @ state[f"GG{i}"] @ q)
        assert torch.all(eigenvalues[:-1] >= eigenvalues[1:] - 1e-12)  # decreasing
    assert set(opt.state[model[0].bias]) == {"step", "exp_avg", "exp_avg_sq"}  # identity on 1-D
    assert "GG0" not in opt.state[model[2].weight]  # 24 > max_precond_dim: no factor that side


def test_state_dict_round_trip() -> None:
    settings = dict(lr=1e-2, weight_decay=0.1, precondition_frequency=3, max_precond_dim=20)
    a = _mlp()
    opt_a = SOAP(a.parameters(), **settings)
    _train(a, opt_a, 5)  # the set-up, 4 updates, one refresh
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors and plain containers only

    b = copy.deepcopy(a)
    opt_b = SOAP(b.parameters(), **settings)
    opt_b.load_state_dict(saved)
    _train(a, opt_a, 7, start=5)  # two more refreshes after the load
    _train(b, opt_b, 7, start=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), r"lr=-0\.001"),
    (dict(betas=(1.0, 0.95)), r"beta1=1\.0"),
    (dict(betas=(0.9,)), r"betas=\(0\.9,\)"),
    (dict(shampoo_beta=-1), r"shampoo_beta=-1.*None"),
    (dict(shampoo_beta=1.0), r"shampoo_beta=1\.0"),
    (dict(eps=-1e-8), r"eps=-1e-08"),
    (dict(weight_decay=-0.1), r"weight_decay=-0\.1"),
    (dict(precondition_frequency=0), r"precondition_frequency=0.*integer >= 1"),
    (dict(precondition_frequency=2.5), r"precondition_frequency=2\.5"),
    (dict(max_precond_dim=0), r"max_precond_dim=0"),
    (dict(merge_dims="yes"), r"merge_dims='yes'.*True or False"),
    (dict(precondition_1d=1), r"precondition_1d=1"),
])
def test_constructor_errors_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SOAP(_mlp().parameters(), **kwargs)


def test_param_group_error_names_the_group() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=r"precondition_frequency=-3 \(param group 1\)"):
        SOAP([{"params": model[0].parameters()},
              {"params": model[2].parameters(), "precondition_frequency": -3}])


def test_decreases_loss() -> None:
    # a small tanh MLP fitting a tanh teacher, at the default hyperparameters but lr
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g, dtype=DTYPE)
    y = torch.tanh(x @ torch.randn(10, 4, generator=g, dtype=DTYPE))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).to(DTYPE)

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    opt = SOAP(model.parameters(), lr=1e-2)
    initial = loss().item()
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    assert loss().item() < 0.2 * initial  # 0.83 -> 0.08 when written


def test_closure_and_errors_at_step() -> None:
    p = nn.Parameter(torch.ones(3, dtype=DTYPE))
    opt = SOAP([p])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = (p**2).sum()
        out.backward()
        return out

    assert opt.step(closure).item() == 3.0
    c = nn.Parameter(torch.ones(2, dtype=torch.complex128))
    c.grad = torch.ones_like(c)
    with pytest.raises(RuntimeError, match="complex"):
        SOAP([c]).step()
