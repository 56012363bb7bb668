"""The optimizer registry: ``optimizer=<name>`` -> an :class:`OptimizerEntry`.

Each optimizer is one module in this package that calls :func:`register`, plus
``configs/optimizer/<name>.yaml``, the single declaration of its config keys and their defaults:
the config check accepts exactly the yaml's keys, and :func:`build_optimizer` fills any key a
caller leaves out from the same file. The entry's ``schema`` gives each of those keys' type and
range (engine/schema.py), which the config check and :func:`build_optimizer` apply. The modules are discovered on first use, so adding an
optimizer edits nothing here; training, the benchmarks, the GPU pack and the toy problems all
list and build optimizers through this registry.

Every optimizer gets the same weight-decay grouping rule (``optimizer.decay_rule``) so that a
comparison differs only in the update rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from engine.errors import HarnessError
from engine.registry import add_unique, import_modules
from engine.schema import Bool, Choice, Float, Int, Optional, Pair, Spec, check_values
from model import WEIGHT_DECAY_RULES, weight_decay_groups

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "optimizer"
# Code paths an optimizer may offer, as the benchmarks name them: the per-tensor loop, torch's
# multi-tensor ops, a single compiled pass.
PATHS = ("reference", "foreach", "fused")

ParamGroups = list[dict[str, Any]]

# Specs of the keys most optimizers share, for their entries' schemas.
LR = Float(gt=0)
BETAS = Pair(Float(min=0, lt=1))
WEIGHT_DECAY = Float(min=0)
EPS = Float(gt=0)
DECAY_RULE = Choice(*WEIGHT_DECAY_RULES)
# lr, betas, weight decay and the shared decay rule: an element-wise optimizer's core keys.
BASE_SCHEMA: dict[str, Spec] = {"lr": LR, "betas": BETAS, "weight_decay": WEIGHT_DECAY,
                                "decay_rule": DECAY_RULE}
# The code-path switches (null: the optimizer picks by device and size).
PATH_SCHEMA: dict[str, Spec] = {"foreach": Optional(Bool(), doc="null: chosen by device"),
                                "fused": Optional(Bool(), doc="null: chosen by device")}
# The keys of a Sophia fed a Hessian estimate (engine/hessian.py reads all but rho).
HESSIAN_SCHEMA: dict[str, Spec] = {
    "rho": Float(gt=0, doc="the clipping scale of the update"),
    "k": Int(min=1, doc="the Hessian refresh interval; the paper uses 10"),
    "hessian_micro_batches": Optional(Int(min=1), doc="micro-batches per rank feeding the "
                                                      "estimate; null: all"),
    "hessian_warm_start": Bool(),
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


def default_groups(model: torch.nn.Module, cfg: Mapping[str, Any]) -> ParamGroups:
    """The shared weight-decay grouping: ``optimizer.weight_decay`` on the tensors
    ``optimizer.decay_rule`` selects, none on the rest."""
    return weight_decay_groups(model, float(cfg["weight_decay"]), rule=cfg["decay_rule"])


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer as the harness knows it.

    ``make(groups, cfg)`` builds it over param groups (each with its ``weight_decay``) from the
    optimizer's full config; ``groups(model, cfg)`` makes those groups from a model (default: the
    shared weight-decay rule). ``hessian(cfg)`` names the diagonal-Hessian estimate the loop must
    feed it (None: it needs none); then ``cfg["k"]`` is the refresh interval. ``paths`` are the
    code paths a config can force through its ``foreach``/``fused`` keys (the benchmarks time each
    one), and ``access`` the (tensors read, tensors written) per parameter of one ideal single-pass
    step, the floor the benchmarks compare its time with (None: not an elementwise step).
    ``compiled`` says its fused path is the library's own compiled single pass (sophia._fused),
    whose generated code benchmarks/cuda_kernels.py reads; torch's own fused kernels are not.
    ``schema`` gives the type and range of every key its yaml declares but ``name``.
    """

    name: str
    label: str
    make: Callable[[ParamGroups, Mapping[str, Any]], torch.optim.Optimizer]
    groups: Callable[[torch.nn.Module, Mapping[str, Any]], ParamGroups] = default_groups
    hessian: Callable[[Mapping[str, Any]], str] | None = None
    paths: tuple[str, ...] = ()
    access: tuple[int, int] | None = None
    compiled: bool = False
    want_telemetry: Callable[[torch.optim.Optimizer, bool], None] | None = None
    summary: str = field(default="", compare=False)  # one line for listings and tables
    schema: Mapping[str, Spec] = field(default_factory=dict, compare=False)


_REGISTRY: dict[str, OptimizerEntry] = {}


def register(entry: OptimizerEntry) -> OptimizerEntry:
    """Add ``entry`` to the registry (called once by its module); its yaml must exist."""
    if not (CONFIG_DIR / f"{entry.name}.yaml").is_file():
        raise ValueError(f"optimizer {entry.name!r} has no config file {CONFIG_DIR}/{entry.name}.yaml")
    bad = set(entry.paths) - set(PATHS)
    if bad:
        raise ValueError(f"optimizer {entry.name!r}: unknown paths {sorted(bad)}; use {PATHS}")
    return add_unique(_REGISTRY, "optimizer", entry.name, entry)


def _discover() -> None:
    import_modules(__name__, __path__)


def entries() -> dict[str, OptimizerEntry]:
    """Every registered optimizer, by config name, in name order."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_entry(name: Any) -> OptimizerEntry:
    """The entry of ``optimizer=<name>``; an unknown name is a :class:`HarnessError`."""
    known = entries()
    if name not in known:
        raise HarnessError(f"optimizer.name={name!r} is unknown; choose one of {', '.join(known)}.")
    return known[name]


@cache
def _yaml_defaults(name: str) -> DictConfig:
    # OmegaConf, as Hydra reads it: plain YAML 1.1 would read 6e-4 as a string
    return OmegaConf.load(CONFIG_DIR / f"{name}.yaml")


def optimizer_defaults(name: str) -> dict[str, Any]:
    """``configs/optimizer/<name>.yaml`` as a dict: every key the optimizer reads, with its
    default (a fresh copy each call)."""
    return OmegaConf.to_container(_yaml_defaults(get_entry(name).name))


def declared_keys(name: str) -> frozenset[str]:
    """The keys ``optimizer=<name>`` accepts: those of its yaml."""
    return frozenset(_yaml_defaults(get_entry(name).name))


def path_config(entry: OptimizerEntry, path: str) -> dict[str, Any]:
    """The ``foreach``/``fused`` values that force code path ``path`` (one of ``entry.paths``)."""
    if path not in entry.paths:
        raise ValueError(f"{entry.name} has no {path!r} path; it has {', '.join(entry.paths) or 'none'}")
    flags = {"foreach": path == "foreach", "fused": path == "fused"}
    return {k: v for k, v in flags.items() if k in declared_keys(entry.name)}


def betas(cfg: Mapping[str, Any], key: str = "betas") -> tuple[float, float]:
    """``cfg[key]`` (a pair, checked by the entry's schema) as a tuple of floats."""
    first, second = cfg[key]
    return float(first), float(second)


def build_optimizer(cfg: Mapping[str, Any], model: torch.nn.Module) -> OptimizerSetup:
    """Build the optimizer named by ``cfg['name']`` over ``model``'s parameters; keys missing
    from ``cfg`` take their yaml defaults. A value the entry's schema refuses is a HarnessError
    (as in the config check, for callers that build without one: benchmarks, tools); so are
    constructor errors."""
    entry = get_entry(cfg.get("name"))
    cfg = {**optimizer_defaults(entry.name), **cfg}
    check_values(cfg, entry.schema, prefix="optimizer.")
    k = 0
    estimator = None
    if entry.hessian is not None:
        estimator = entry.hessian(cfg)
        k = cfg["k"]
    try:
        opt = entry.make(entry.groups(model, cfg), cfg)
    except ValueError as err:  # the constructors validate and name the bad value
        raise HarnessError(f"Invalid optimizer settings for optimizer={entry.name}: {err}") from err
    want = _always_on
    if entry.want_telemetry is not None:
        def want(on: bool, _hook=entry.want_telemetry) -> None:
            _hook(opt, on)
    return OptimizerSetup(opt, entry.name, estimator, k,
                          telemetry=getattr(opt, "telemetry", _no_telemetry), want_telemetry=want)
