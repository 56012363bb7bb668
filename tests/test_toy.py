"""scripts/toy.py runs end to end at reduced size and shows the curvature-independence of Sophia."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_toy():
    spec = importlib.util.spec_from_file_location("toy", REPO / "scripts" / "toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_writes_plots_and_table(tmp_path: Path, capsys) -> None:
    toy = _load_toy()
    results = toy.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("trajectories.png", "steps_vs_condition.png"):
        png = tmp_path / name
        assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "kappa=1000" in out and "SophiaG" in out and "lr=" in out
    assert set(results) == set(toy.OPTIMIZERS)

    (_, g1), (_, g1000) = results["sophiag"]
    (_, gd1), (_, gd1000) = results["gd"]
    (_, h1), (_, h1000) = results["sophiah"]
    assert g1 is not None and g1000 is not None and h1 is not None and h1000 is not None
    # Sophia's step count barely depends on the condition number ...
    assert g1000 <= 1.5 * g1 and h1000 <= 1.5 * h1
    # ... while GD's grows with it: at kappa=1e3 it needs more steps than SophiaG (or misses).
    assert gd1 is not None and gd1 < g1
    assert gd1000 is None or gd1000 > g1000


def test_toy_hessian_estimates_are_unbiased() -> None:
    """SophiaG's input (squared GNB gradient) averages to diag(H); SophiaH's Hutchinson is exact."""
    import torch

    toy = _load_toy()
    kappa, n = 50.0, 4000
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    sq = torch.stack([toy.gnb_gradient(theta, kappa, gen) ** 2 for _ in range(n)])
    diag = torch.tensor([kappa, 1.0], dtype=torch.float64)
    # B * g^2 is chi-square(1) * H here: relative standard error sqrt(2 / n) ~ 2.2%
    assert ((sq.mean(0) - diag).abs() < 5 * (2 / n) ** 0.5 * diag).all(), sq.mean(0)

    theta.requires_grad_(True)
    (est,) = toy.hutchinson(toy.loss_fn(theta, kappa), [theta])
    torch.testing.assert_close(est, diag)
