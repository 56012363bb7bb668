"""MuonAdamW: the composite equals torch.optim.Muon + torch.optim.AdamW stepped separately."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from sophia.muon import MuonAdamW

# Small, non-default settings so a mix-up between the sides or a dropped setting shows.
MUON_KW = dict(
    lr=0.03, momentum=0.9, nesterov=True, ns_steps=4, adjust_lr_fn="original", weight_decay=0.05
)
ADAMW_KW = dict(adamw_lr=2e-3, adamw_betas=(0.8, 0.9), adamw_eps=1e-7, adamw_weight_decay=0.02)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    )


def _split(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = list(model.parameters())
    return [p for p in params if p.dim() == 2], [p for p in params if p.dim() != 2]


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 6, generator=g)
    return x, torch.sin(x[:, :3]) + 0.1 * x[:, 3:]


def _train(model: nn.Module, opt, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), f"{name} differs"


def _assert_each_group_drives_its_params(model: nn.Module, opt, step: int) -> None:
    """Every dict in opt.param_groups is the one its inner optimizer reads.

    Per group: lr 0 in that dict (torch's Muon and AdamW scale weight decay by lr too) must freeze
    exactly that group's parameters for one step while every other parameter moves.
    """
    for i, group in enumerate(opt.param_groups):
        lr, group["lr"] = group["lr"], 0.0
        before = [p.detach().clone() for p in model.parameters()]
        _train(model, opt, range(step + i, step + i + 1))
        group["lr"] = lr
        for (name, p), b in zip(model.named_parameters(), before, strict=True):
            in_group = any(p is q for q in group["params"])
            assert torch.equal(p, b) == in_group, f"group {i}: {name}"


def test_step_equals_separate_torch_optimizers():
    model, ref = _mlp(), _mlp()
    muon_p, adamw_p = _split(model)
    ref_muon, ref_adamw = _split(ref)
    opt = MuonAdamW(muon_p, adamw_p, **MUON_KW, **ADAMW_KW)
    ref_m = torch.optim.Muon(
        ref_muon,
        lr=0.03,
        momentum=0.9,
        nesterov=True,
        ns_steps=4,
        adjust_lr_fn="original",
        weight_decay=0.05,
    )
    ref_a = torch.optim.AdamW(ref_adamw, lr=2e-3, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.02)

    for step in range(5):
        x, y = _batch(step)
        for m, zero in (
            (model, opt.zero_grad),
            (ref, lambda: (ref_m.zero_grad(), ref_a.zero_grad())),
        ):
            zero()
            nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        ref_m.step()
        ref_a.step()
        _assert_same_params(model, ref)
    # It really trained: the parameters moved away from their initial values.
    assert not torch.equal(model[0].weight, _mlp()[0].weight)


def test_match_rms_adamw_and_param_group_dicts_pass_through():
    model, ref = _mlp(), _mlp()
    (w1, w2, w3), adamw_p = _split(model)
    (r1, r2, r3), ref_adamw = _split(ref)
    opt = MuonAdamW(
        [{"params": [w1, w2]}, {"params": [w3], "lr": 1e-3, "weight_decay": 0.0}],
        [{"params": adamw_p[:2], "weight_decay": 0.1}, {"params": adamw_p[2:]}],
        lr=6e-4,
        adjust_lr_fn="match_rms_adamw",
        weight_decay=0.1,
        adamw_lr=6e-4,
    )
    ref_m = torch.optim.Muon(
        [{"params": [r1, r2]}, {"params": [r3], "lr": 1e-3, "weight_decay": 0.0}],
        lr=6e-4,
        adjust_lr_fn="match_rms_adamw",
        weight_decay=0.1,
    )
    ref_a = torch.optim.AdamW(
        [{"params": ref_adamw[:2], "weight_decay": 0.1}, {"params": ref_adamw[2:]}],
        lr=6e-4,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    assert [g["base_lr"] for g in opt.param_groups] == [6e-4, 1e-3, 6e-4, 6e-4]
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        ref_m.zero_grad()
        ref_a.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
        ref_m.step()
        ref_a.step()
    _assert_same_params(model, ref)


def test_param_groups_are_the_inner_dicts_and_scheduling_reaches_both_sides():
    model = _mlp()
    opt = MuonAdamW(*_split(model), **MUON_KW, **ADAMW_KW)
    sides = [g["optimizer"] for g in opt.param_groups]
    assert sides == ["muon", "adamw"]
    _assert_each_group_drives_its_params(model, opt, step=100)
    assert [g["base_lr"] for g in opt.param_groups] == [0.03, 2e-3]

    # The engine's way: every group gets its own base lr times the schedule multiplier.
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * 0.25
    sd = opt.state_dict()  # what each inner optimizer holds
    assert sd["muon"]["param_groups"][0]["lr"] == pytest.approx(0.0075)
    assert sd["adamw"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    assert [g["base_lr"] for g in opt.param_groups] == [0.03, 2e-3]

    # A torch scheduler too, and it changes the step actually taken: a zero multiplier freezes
    # both sides (weight decay included, since torch scales it by lr).
    for g in opt.param_groups:
        g["lr"] = g["base_lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 if step == 0 else 0.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.015, 1e-3])
    _train(model, opt, range(1))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    frozen = copy.deepcopy(model)
    _train(model, opt, range(1, 3))
    _assert_same_params(model, frozen)


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_resumes_bit_exactly():
    # Uninterrupted run: 6 steps.
    model_a = _mlp()
    opt_a = MuonAdamW(*_split(model_a), **MUON_KW, **ADAMW_KW)
    _train(model_a, opt_a, range(6))

    # Interrupted run: 3 steps, checkpoint through torch.save / weights_only load, fresh objects.
    model_b = _mlp()
    opt_b = MuonAdamW(*_split(model_b), **MUON_KW, **ADAMW_KW)
    _train(model_b, opt_b, range(3))
    for g in opt_b.param_groups:  # an engine-style schedule position must survive too
        g["lr"] = g["base_lr"] * 0.5
    ckpt = _save_load({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    assert set(ckpt["opt"]) == {"muon", "adamw"}

    model_c = _mlp(seed=123)  # different init: everything must come from the checkpoint
    model_c.load_state_dict(ckpt["model"])
    opt_c = MuonAdamW(*_split(model_c), **MUON_KW, **ADAMW_KW)
    opt_c.load_state_dict(ckpt["opt"])
    assert [g["lr"] for g in opt_c.param_groups] == pytest.approx([0.015, 1e-3])
    assert [g["optimizer"] for g in opt_c.param_groups] == ["muon", "adamw"]
    assert len(opt_c.state) == len(list(model_c.parameters()))
    for g in opt_c.param_groups:
        g["lr"] = g["base_lr"]
    _train(model_c, opt_c, range(3, 6))
    _assert_same_params(model_a, model_c)
    # After loading, the composite's groups are again the dicts the inner optimizers read.
    _assert_each_group_drives_its_params(model_c, opt_c, step=100)


def test_load_state_dict_rejects_foreign_state_dicts():
    model = _mlp()
    opt = MuonAdamW(*_split(model))
    plain = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="keys 'muon' and 'adamw'"):
        opt.load_state_dict(plain)
    other = MuonAdamW(*_split(_mlp()))
    sd = other.state_dict()
    sd["adamw"]["param_groups"][0]["params"] = [0]  # wrong number of parameters
    with pytest.raises(ValueError, match="adamw part does not fit"):
        opt.load_state_dict(sd)


def test_loss_falls_on_a_small_mlp():
    model = _mlp()
    opt = MuonAdamW(*_split(model), lr=0.02, adamw_lr=3e-3)
    losses = _train(model, opt, [0] * 40)  # one fixed batch: the loss must drop
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], losses


def test_telemetry_is_the_rms_of_the_parameter_change():
    model = _mlp()
    muon_p, adamw_p = _split(model)
    opt = MuonAdamW(muon_p, adamw_p, **MUON_KW, **ADAMW_KW)
    assert opt.telemetry() == {}
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        _train(model, opt, range(step, step + 1))
        t = opt.telemetry()
        assert set(t) == {"update_rms/muon", "update_rms/adamw"}
        for side, params in (("muon", muon_p), ("adamw", adamw_p)):
            idx = [i for i, p in enumerate(model.parameters()) if any(p is q for q in params)]
            delta = torch.cat(
                [(list(model.parameters())[i] - before[i]).flatten().double() for i in idx]
            )
            expected = delta.square().mean().sqrt()
            value = t[f"update_rms/{side}"]
            assert value.dim() == 0 and value.dtype == torch.float32
            assert value.item() > 0
            assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # Different sides move by different amounts (lr 0.03 Muon vs 2e-3 AdamW).
    assert t["update_rms/muon"] > 3 * t["update_rms/adamw"]

    opt.track_update_rms = False
    _train(model, opt, range(3, 4))
    assert opt.telemetry() == {}


def test_telemetry_counts_only_stepped_parameters():
    model = _mlp()
    muon_p, adamw_p = _split(model)
    opt = MuonAdamW(muon_p, adamw_p)
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    frozen = muon_p[0]
    frozen.grad = None  # this matrix takes no step, so it must not dilute the RMS
    frozen_before = frozen.detach().clone()
    before = [p.detach().clone() for p in muon_p[1:]]
    opt.step()
    assert torch.equal(frozen, frozen_before)
    delta = torch.cat([(p - b).flatten() for p, b in zip(muon_p[1:], before, strict=True)])
    assert opt.telemetry()["update_rms/muon"].item() == pytest.approx(
        delta.square().mean().sqrt().item(), rel=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # What torch.optim.Muon does not check at construction: MuonAdamW's own checks.
        (dict(ns_steps=0), r"ns_steps=0.*int in \[1, 100\)"),
        (dict(ns_steps=2.5), r"ns_steps=2.5"),
        (dict(momentum=1.0), r"momentum=1.0.*below 1"),
        (dict(adjust_lr_fn="rms"), r"adjust_lr_fn='rms'.*'original', 'match_rms_adamw'"),
        # torch's own checks pass through, prefixed with the side they concern.
        (dict(momentum=-0.1), r"Muon refused a Muon setting.*momentum should be >= 0 but is: -0.1"),
        (dict(lr=float("nan")), r"Muon refused.*Learning rate should be >= 0 but is: nan"),
        (dict(weight_decay=-1.0), r"Muon refused.*weight decay should be >= 0 but is: -1.0"),
        (dict(adamw_lr=-3e-4), r"AdamW refused an adamw_\* setting.*learning rate: -0.0003"),
        (dict(adamw_betas=(0.9, 1.0)), r"AdamW refused.*beta parameter at index 1: 1.0"),
        (dict(adamw_weight_decay=-0.1), r"AdamW refused.*weight_decay value: -0.1"),
        (dict(adamw_eps=-1.0), r"AdamW refused.*epsilon value: -1.0"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MuonAdamW(*_split(_mlp()), **kwargs)


def test_foreach_with_fused_is_refused_by_torch():
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        MuonAdamW(*_split(_mlp()), foreach=True, fused=True)


def test_invalid_params_raise_clear_errors():
    model = _mlp()
    muon_p, adamw_p = _split(model)
    bias = adamw_p[0]
    with pytest.raises(ValueError, match=r"shape \(16,\) \(1-D\).*adamw_params"):
        MuonAdamW(muon_p + [bias], adamw_p[1:])
    named = [(n, p) for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match=r"'0.bias'.*shape \(16,\)"):
        MuonAdamW(named, adamw_p)
    with pytest.raises(ValueError, match="in both muon_params and adamw_params"):
        MuonAdamW(muon_p, adamw_p + [muon_p[0]])
    with pytest.raises(ValueError, match="adamw_params is empty"):
        MuonAdamW(muon_p, [])
    with pytest.raises(ValueError, match=r"ns_steps=0 \(muon param group 1\)"):
        MuonAdamW([{"params": muon_p[:1]}, {"params": muon_p[1:], "ns_steps": 0}], adamw_p)
    with pytest.raises(ValueError, match="tagged optimizer='adamw'"):
        MuonAdamW([{"params": muon_p, "optimizer": "adamw"}], adamw_p)


def test_named_params_are_accepted():
    model, ref = _mlp(), _mlp()
    named = list(model.named_parameters())
    opt = MuonAdamW(
        [(n, p) for n, p in named if p.dim() == 2], [(n, p) for n, p in named if p.dim() != 2]
    )
    ref_opt = MuonAdamW(*_split(ref))
    _train(model, opt, range(2))
    _train(ref, ref_opt, range(2))
    _assert_same_params(model, ref)


def test_add_param_group_routes_by_tag():
    model = _mlp()
    muon_p, adamw_p = _split(model)
    opt = MuonAdamW(muon_p[:2], adamw_p)
    opt.add_param_group({"params": [muon_p[2]], "optimizer": "muon", "lr": 0.01})
    assert [g["optimizer"] for g in opt.param_groups] == ["muon", "muon", "adamw"]
    assert opt.param_groups[1]["base_lr"] == 0.01
    assert opt.state_dict()["muon"]["param_groups"][1]["lr"] == 0.01
    _assert_each_group_drives_its_params(model, opt, step=0)
    with pytest.raises(ValueError, match="'optimizer' key"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "optimizer": "muon"})


def test_missing_torch_muon_names_the_minimum_version(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(RuntimeError, match=r"torch\.optim\.Muon.*torch 2\.9"):
        MuonAdamW(*_split(_mlp()))


def test_deepcopy_keeps_a_working_composite():
    model = _mlp()
    opt = MuonAdamW(*_split(model))
    _train(model, opt, range(2))
    # Deep-copy the pair together so the copied optimizer points at the copied parameters.
    model2, opt2 = copy.deepcopy((model, opt))
    _train(model, opt, range(2, 4))
    _train(model2, opt2, range(2, 4))
    _assert_same_params(model, model2)
    _assert_each_group_drives_its_params(model2, opt2, step=4)
