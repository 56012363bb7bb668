"""Muon (torch.optim.Muon, torch >= 2.9) on the transformer blocks' hidden matrices, AdamW on the
rest: sophia.MuonAdamW. Its param groups carry ``"muon": True`` for Muon's side."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from engine.errors import HarnessError
from engine.optimizers import (BETAS, DECAY_RULE, LR, PATH_SCHEMA, WEIGHT_DECAY, OptimizerEntry,
                               ParamGroups, betas, register)
from engine.schema import Bool, Choice, Float, Int, List, Str
from model import muon_param_split, weight_decay_groups
from sophia import MuonAdamW


def groups(model: torch.nn.Module, cfg: Mapping[str, Any]) -> ParamGroups:
    """One Muon group of the matrices ``muon_include``/``muon_exclude`` select, then the shared
    weight-decay groups (at ``adamw_weight_decay``) of every other tensor."""
    muon, adamw = muon_param_split(model, include=tuple(cfg["muon_include"]),
                                   exclude=tuple(cfg["muon_exclude"]))
    on_adamw = {id(p) for p in adamw}
    rest = [{**g, "params": [p for p in g["params"] if id(p) in on_adamw]}
            for g in weight_decay_groups(model, float(cfg["adamw_weight_decay"]),
                                         rule=cfg["decay_rule"])]
    return [{"params": muon, "muon": True}] + [g for g in rest if g["params"]]


def make(param_groups: ParamGroups, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    if not hasattr(torch.optim, "Muon"):
        raise HarnessError(f"optimizer=muon needs torch.optim.Muon (torch >= 2.9); this is torch "
                           f"{torch.__version__}. Upgrade torch or pick another optimizer.")
    muon = [p for g in param_groups if g.get("muon") for p in g["params"]]
    adamw = [{k: v for k, v in g.items() if k != "muon"} for g in param_groups if not g.get("muon")]
    return MuonAdamW(
        muon, adamw, lr=float(cfg["lr"]), momentum=cfg["momentum"],
        nesterov=bool(cfg["nesterov"]), ns_steps=cfg["ns_steps"],
        adjust_lr_fn=cfg["adjust_lr_fn"], weight_decay=float(cfg["weight_decay"]),
        adamw_lr=float(cfg["adamw_lr"]), adamw_betas=betas(cfg, "adamw_betas"),
        foreach=cfg["foreach"], fused=cfg["fused"])


def want_telemetry(opt: torch.optim.Optimizer, wanted: bool) -> None:
    opt.track_update_rms = wanted  # the update RMS needs a parameter snapshot: log steps only


register(OptimizerEntry(name="muon", label="Muon", make=make, groups=groups,
                        paths=("foreach", "fused"), want_telemetry=want_telemetry,
                        summary="orthogonalised momentum on hidden matrices, AdamW elsewhere",
                        schema={"lr": LR, "weight_decay": WEIGHT_DECAY, "decay_rule": DECAY_RULE,
                                **PATH_SCHEMA, "adamw_lr": LR, "adamw_betas": BETAS,
                                "adamw_weight_decay": WEIGHT_DECAY,
                                "momentum": Float(min=0, lt=1, doc="0.95 is standard"),
                                "nesterov": Bool(),
                                "ns_steps": Int(min=1, max=99, doc="Newton-Schulz iterations; 5 "
                                                                   "is standard"),
                                "adjust_lr_fn": Choice("original", "match_rms_adamw"),
                                "muon_include": List(Str(), doc="parameter name patterns"),
                                "muon_exclude": List(Str(), doc="parameter name patterns")}))
