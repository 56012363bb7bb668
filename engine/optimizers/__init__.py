"""Optimizer name + config -> an optimizer over the model's parameter groups.

Every optimizer gets the same weight-decay grouping rule (``optimizer.decay_rule``) so that a
comparison differs only in the update rule. AdamW is torch's own (fused on CUDA, foreach on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from engine.errors import HarnessError
from model import weight_decay_groups

OPTIMIZERS = ("adamw", "lion", "sophia", "sophiah", "muon")

# The keys build_optimizer reads for each optimizer; configs/optimizer/<name>.yaml declares exactly
# these (a config test holds them together), and any other key is refused as a likely typo.
_SOPHIA_KEYS = {"name", "lr", "betas", "rho", "weight_decay", "k", "hessian_micro_batches",
                "hessian_warm_start", "decay_rule", "foreach", "fused"}
OPTIMIZER_KEYS: dict[str, frozenset[str]] = {
    "adamw": frozenset({"name", "lr", "betas", "eps", "weight_decay", "decay_rule", "fused"}),
    "lion": frozenset({"name", "lr", "betas", "weight_decay", "decay_rule", "foreach", "fused"}),
    # SophiaG chooses between its two GNB estimators; SophiaH has no such key, since Hutchinson is
    # what makes it SophiaH (a key with one legal value would be a knob that does nothing).
    "sophia": frozenset(_SOPHIA_KEYS | {"hessian_estimator"}),
    "sophiah": frozenset(_SOPHIA_KEYS | {"eps"}),
    "muon": frozenset({"name", "lr", "adamw_lr", "momentum", "nesterov", "ns_steps",
                       "adjust_lr_fn", "weight_decay", "adamw_betas", "adamw_weight_decay",
                       "decay_rule", "muon_include", "muon_exclude"}),
}


def _no_telemetry() -> dict[str, torch.Tensor]:
    return {}


def _always_on(wanted: bool) -> None:
    pass


@dataclass(frozen=True)
class OptimizerSetup:
    """An optimizer and what the loop needs to know about it, decided once here so the loop never
    asks which optimizer it is driving.

    ``telemetry()`` returns 0-d tensors (clip fraction, update RMS, ...; no host sync) and
    ``want_telemetry(on)`` is called before each step with whether that step will be logged, for
    optimizers whose telemetry costs an extra pass (Muon's update RMS needs a parameter snapshot).
    """

    optimizer: torch.optim.Optimizer
    name: str
    hessian_estimator: str | None  # "gnb", "gnb_msq", "hutchinson" or None
    k: int  # Hessian refresh after steps with step % k == k - 1 (0: no Hessian)
    telemetry: Callable[[], Mapping[str, torch.Tensor]] = _no_telemetry
    want_telemetry: Callable[[bool], None] = _always_on


def _betas(cfg: Mapping[str, Any], key: str = "betas") -> tuple[float, float]:
    betas = cfg.get(key)
    if betas is None or len(betas) != 2:
        raise HarnessError(f"optimizer.{key}={betas!r} must be a pair like [0.9, 0.95].")
    return float(betas[0]), float(betas[1])


def _check_k(cfg: Mapping[str, Any]) -> int:
    k = cfg.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise HarnessError(
            f"optimizer.k={k!r}: the Hessian refresh interval must be an integer >= 1 "
            f"(the paper uses 10)."
        )
    return k


# optimizer.hessian_estimator for optimizer=sophia: the official GNB estimate (bs * g^2 of the
# loss averaged over the whole Hessian batch) or the mean of per-micro-batch squares (same passes,
# variance / m); see engine/hessian.py.
SOPHIA_ESTIMATORS = ("gnb", "gnb_msq")


def _sophia_estimator(cfg: Mapping[str, Any]) -> str:
    estimator = cfg.get("hessian_estimator", "gnb")
    if estimator not in SOPHIA_ESTIMATORS:
        hint = (" Hutchinson estimates feed SophiaH: use optimizer=sophiah." if estimator == "hutchinson"
                else "")
        raise HarnessError(
            f"optimizer.hessian_estimator={estimator!r} is not one of {', '.join(SOPHIA_ESTIMATORS)}: "
            f"gnb is the official estimate, gnb_msq the lower-variance mean of per-micro-batch "
            f"squares at the same cost.{hint}"
        )
    return estimator


def build_optimizer(cfg: Mapping[str, Any], model: torch.nn.Module,
                    device: torch.device) -> OptimizerSetup:
    """Build the optimizer named by ``cfg['name']``; constructor errors become HarnessErrors."""
    name = cfg.get("name")
    if name not in OPTIMIZERS:
        raise HarnessError(f"optimizer.name={name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}.")
    lr = cfg.get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise HarnessError(f"optimizer.lr={lr!r} must be a positive number.")
    wd = float(cfg.get("weight_decay", 0.0))
    rule = cfg.get("decay_rule", "linear_weights")
    try:
        if name == "muon":
            return _build_muon(cfg, model, rule)
        groups = weight_decay_groups(model, wd, rule=rule)
        if name == "adamw":
            fused = cfg.get("fused")
            if fused is None:
                fused = device.type == "cuda"
            opt = torch.optim.AdamW(groups, lr=lr, betas=_betas(cfg), eps=float(cfg.get("eps", 1e-8)),
                                    fused=bool(fused), foreach=None if fused else True)
            return OptimizerSetup(opt, name, None, 0)
        if name == "lion":
            from sophia import Lion

            opt = Lion(groups, lr=lr, betas=_betas(cfg), foreach=cfg.get("foreach"),
                       fused=cfg.get("fused"))
            return OptimizerSetup(opt, name, None, 0, telemetry=opt.telemetry)
        if name == "sophia":
            from sophia import SophiaG

            opt = SophiaG(groups, lr=lr, betas=_betas(cfg), rho=float(cfg.get("rho", 0.04)),
                          foreach=cfg.get("foreach"), fused=cfg.get("fused"))
            return OptimizerSetup(opt, name, _sophia_estimator(cfg), _check_k(cfg),
                                  telemetry=opt.telemetry)
        from sophia import SophiaH

        opt = SophiaH(groups, lr=lr, betas=_betas(cfg), rho=float(cfg.get("rho", 0.04)),
                      eps=float(cfg.get("eps", 1e-15)), foreach=cfg.get("foreach"),
                      fused=cfg.get("fused"))
        return OptimizerSetup(opt, name, "hutchinson", _check_k(cfg), telemetry=opt.telemetry)
    except ValueError as err:  # the constructors validate and name the bad value
        raise HarnessError(f"Invalid optimizer settings for optimizer={name}: {err}") from err


def _build_muon(cfg: Mapping[str, Any], model: torch.nn.Module, rule: str) -> OptimizerSetup:
    from model import muon_param_split
    from sophia import MuonAdamW

    muon_params, adamw_params = muon_param_split(
        model, include=tuple(cfg.get("muon_include", ("transformer.h.*",))),
        exclude=tuple(cfg.get("muon_exclude", ())))
    # The AdamW side keeps the shared weight-decay rule, restricted to the tensors Muon does not own.
    on_adamw = {id(p) for p in adamw_params}
    adamw_groups = [{**g, "params": [p for p in g["params"] if id(p) in on_adamw]}
                    for g in weight_decay_groups(model, float(cfg.get("adamw_weight_decay", 0.0)),
                                                 rule=rule)]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    if not hasattr(torch.optim, "Muon"):
        raise HarnessError(f"optimizer=muon needs torch.optim.Muon (torch >= 2.9); this is torch "
                           f"{torch.__version__}. Upgrade torch or pick another optimizer.")
    opt = MuonAdamW(
        muon_params, adamw_groups,
        lr=float(cfg["lr"]), momentum=cfg.get("momentum", 0.95),
        nesterov=bool(cfg.get("nesterov", True)), ns_steps=cfg.get("ns_steps", 5),
        adjust_lr_fn=cfg.get("adjust_lr_fn", "original"),
        weight_decay=float(cfg.get("weight_decay", 0.01)),
        adamw_lr=float(cfg.get("adamw_lr", 6e-4)), adamw_betas=_betas(cfg, "adamw_betas"),
    )

    def want_telemetry(wanted: bool) -> None:
        opt.track_update_rms = wanted

    return OptimizerSetup(opt, "muon", None, 0, telemetry=opt.telemetry,
                          want_telemetry=want_telemetry)
