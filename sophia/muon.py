"""MuonAdamW: torch.optim.Muon on the hidden weight matrices, torch.optim.AdamW on the rest.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) orthogonalises the
Nesterov momentum of each 2-D weight matrix with a few Newton-Schulz iterations. It is defined for
matrices only, and its authors recommend AdamW for embeddings, the output head, gains and biases.
This file composes the two *torch* implementations into one optimizer object, so the training
engine can treat "Muon" like any other `torch.optim.Optimizer`: one `step`, one `zero_grad`, one
`param_groups` list for the LR schedule, one state dict in the checkpoint. Neither algorithm is
re-implemented here; the update is bit-for-bit that of the two torch optimizers stepped in turn.

Learning rates. torch.optim.Muon scales its step per matrix (`adjust_lr_fn`):
- "original" (Keller Jordan's muon.py, the default here): lr * sqrt(max(1, rows / cols)); the
  reference settings are lr=0.02, momentum=0.95, Nesterov, 5 Newton-Schulz steps, with AdamW at
  lr=3e-4, betas=(0.9, 0.95) on the other parameters (github.com/KellerJordan/Muon README).
- "match_rms_adamw" (Moonshot's "Muon is Scalable for LLM Training", arXiv 2502.16982):
  lr * 0.2 * sqrt(max(rows, cols)), which matches AdamW's update RMS, so lr and weight decay
  tuned for AdamW (e.g. 6e-4 and 0.1 at 125M) carry over. Do not combine it with lr=0.02.

Weight decay on the Muon side is torch's `p *= 1 - lr * weight_decay` with the *unscaled* lr, so
its strength per step is lr * weight_decay: 2e-4 at the defaults (lr 0.02, weight decay 0.01, the
Muon README's values). The paper-scale AdamW setting (6e-4 * 0.1) is 6e-5.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import evaluate_closure

__all__ = ["MuonAdamW", "MUON_MIN_TORCH", "ADJUST_LR_FNS"]

# torch.optim.Muon first shipped in torch 2.9 (pytorch PR #160213, merged August 2025); this file
# was written and tested against torch 2.13.
MUON_MIN_TORCH = "2.9"
ADJUST_LR_FNS = ("original", "match_rms_adamw")
SIDES = ("muon", "adamw")

# torch.optim.Muon refuses (at step time) to run this many Newton-Schulz iterations or more.
_MAX_NS_STEPS = 100


# --------------------------------------------------------------------------------------------
# argument validation
#
# torch.optim.Muon and AdamW check their constructor's lr, weight decay, momentum >= 0, betas and
# eps, with errors that name the value; those are left to them (see `_torch_optimizer`). Checked
# here is what torch does not check, or checks only at step time, after a whole forward and
# backward: momentum below 1, ns_steps, the Newton-Schulz settings, and adjust_lr_fn with its
# choices (torch's error does not list them). These are checked for the constructor and for each
# param group, whose own settings torch never checks.


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# setting -> (test, what is allowed)
_MUON_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "momentum": (
        lambda v: _is_number(v) and v < 1.0, "momentum must be below 1 (0.95 is standard)"
    ),
    "ns_steps": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v < _MAX_NS_STEPS,
        f"the number of Newton-Schulz iterations must be an int in [1, {_MAX_NS_STEPS}) "
        "(5 is standard)",
    ),
    "adjust_lr_fn": (
        lambda v: v in ADJUST_LR_FNS, f"choose one of {', '.join(map(repr, ADJUST_LR_FNS))}"
    ),
    "eps": (
        lambda v: _is_number(v) and v > 0.0,
        "the Newton-Schulz normalisation eps must be a number > 0",
    ),
    "nesterov": (lambda v: isinstance(v, bool), "nesterov must be True or False"),
    "ns_coefficients": (
        lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(map(_is_number, v)),
        "expected three numbers (a, b, c)",
    ),
}


def _check_muon_settings(settings: Mapping[str, Any], where: str) -> None:
    """Raise a ValueError naming the first invalid Muon setting (defaults or a group's)."""
    for name, (ok, allowed) in _MUON_RULES.items():
        value = settings[name]
        if not ok(value):
            raise ValueError(f"MuonAdamW: invalid {name}={value!r}{where}: {allowed}.")


def _torch_optimizer(cls: type[Optimizer], groups: list[dict[str, Any]], settings: str,
                     **kwargs: Any) -> Optimizer:
    """``cls(groups, **kwargs)``, its ValueError saying which side's settings it refused."""
    try:
        return cls(groups, **kwargs)
    except ValueError as err:
        raise ValueError(
            f"MuonAdamW: torch.optim.{cls.__name__} refused {settings}: {err}"
        ) from err


# --------------------------------------------------------------------------------------------
# parameter plumbing


def _as_groups(params: Any, arg: str) -> list[dict[str, Any]]:
    """Normalise tensors / (name, tensor) pairs / param-group dicts into fresh group dicts."""
    if isinstance(params, Tensor):
        raise TypeError(
            f"MuonAdamW: {arg} must be an iterable of tensors or param-group dicts, got a single "
            f"tensor of shape {tuple(params.shape)}; wrap it in a list."
        )
    items = list(params)
    if not items:
        raise ValueError(
            f"MuonAdamW: {arg} is empty. MuonAdamW needs parameters on both sides; with no "
            "hidden matrices use torch.optim.AdamW, with nothing else use torch.optim.Muon."
        )
    if all(isinstance(it, dict) for it in items):
        # Copies, so routing tags never leak into the caller's dicts.
        return [{**g, "params": _as_list(g["params"])} for g in items]
    if any(isinstance(it, dict) for it in items):
        raise TypeError(f"MuonAdamW: {arg} mixes param-group dicts with bare parameters.")
    return [{"params": items}]


def _as_list(params: Any) -> list[Any]:
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, set):
        raise TypeError("MuonAdamW: parameters must come in an ordered collection, not a set.")
    return list(params)


def _as_tuple(value: Any) -> Any:
    # Config systems hand over list-likes (e.g. OmegaConf's ListConfig); torch stores tuples.
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Tensor, Mapping)):
        return tuple(value)
    return value


def _unnamed(p: Any) -> Tensor:
    return p[1] if isinstance(p, tuple) else p


def _check_muon_shapes(group: dict[str, Any], where: str) -> None:
    for i, p in enumerate(group["params"]):
        t = _unnamed(p)
        if isinstance(t, Tensor) and t.dim() != 2:
            label = f"'{p[0]}'" if isinstance(p, tuple) else f"number {i}"
            raise ValueError(
                f"MuonAdamW: parameter {label}{where} has shape {tuple(t.shape)} ({t.dim()}-D), "
                "but Muon orthogonalises 2-D matrices only. Pass it in adamw_params instead "
                "(model.param_groups.muon_param_split routes every non-2-D tensor there)."
            )


class _ChainedState(Mapping):
    """Read-only view of both inner optimizers' per-parameter state (disjoint parameters)."""

    def __init__(self, *states: Mapping[Tensor, Any]):
        self._states = states

    def __getitem__(self, p: Tensor) -> Any:
        for s in self._states:
            if p in s:  # `in` first: the inner states are defaultdicts that would insert on a miss
                return s[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator[Tensor]:
        for s in self._states:
            yield from s

    def __len__(self) -> int:
        return sum(len(s) for s in self._states)


# --------------------------------------------------------------------------------------------


class MuonAdamW(Optimizer):
    """torch.optim.Muon on the hidden 2-D weights and torch.optim.AdamW on everything else.

    To the engine it is one torch optimizer:
    - `param_groups` is the Muon groups followed by the AdamW groups, the very dicts the inner
      optimizers read, so `g["lr"] = g["base_lr"] * mult` or any torch LR scheduler reaches both.
      Each group carries `"optimizer": "muon" | "adamw"` and `"base_lr"`, its lr at construction
      (Muon and AdamW learning rates differ by ~100x, so a schedule must multiply each group's
      own base lr, never assign one lr to all groups).
    - `step(closure=None)`, `zero_grad(set_to_none=True)`.
    - `state_dict()` returns `{"muon": ..., "adamw": ...}`, the two inner state dicts (plain
      tensors, numbers and strings: loads with `torch.load(weights_only=True)`).
    - `telemetry()` returns `update_rms/muon` and `update_rms/adamw` (see `telemetry`).

    Args:
        muon_params: 2-D hidden weight matrices, as tensors, (name, tensor) pairs or param-group
            dicts (which may override any Muon setting below, e.g. "lr" or "weight_decay").
        adamw_params: everything else (embeddings, output head, norms, biases), same forms; the
            engine passes weight-decay groups here as dicts.
        lr: Muon learning rate before the per-matrix adjustment of `adjust_lr_fn`.
        momentum: Muon momentum in [0, 1).
        nesterov: Nesterov momentum for Muon.
        ns_steps: Newton-Schulz iterations, an int in [1, 100).
        adjust_lr_fn: "original" (Keller Jordan's sqrt(max(1, rows/cols)) scale, default, pairs
            with lr 0.02) or "match_rms_adamw" (Moonshot's 0.2 * sqrt(max(rows, cols)) scale, pairs
            with an AdamW-like lr). See the module docstring.
        weight_decay: Muon decoupled weight decay, applied as `p *= 1 - lr * weight_decay`.
        ns_coefficients, eps: Newton-Schulz polynomial and normalisation (torch's defaults).
        adamw_lr, adamw_betas, adamw_eps: AdamW settings.
        adamw_weight_decay: AdamW decoupled weight decay (default 0: the AdamW side holds
            embeddings, norms and biases, which the project's default rule does not decay).
        foreach, fused: AdamW implementation choice, passed to torch.optim.AdamW. With both None,
            the fused kernel is used when every AdamW parameter is on CUDA, otherwise torch's
            default. (torch.optim.Muon has no multi-tensor path; its cost is the matmuls.)
        track_update_rms: measure `update_rms/*` in each step (cost in `telemetry`). A public
            attribute: the engine may turn it on only for steps it logs.

    Raises:
        RuntimeError: torch is older than 2.9 (no torch.optim.Muon), or torch's own refusal of
            foreach=True with fused=True.
        ValueError: an invalid setting (torch's own checks of lr, weight decay, betas and eps
            pass through, prefixed with the side), an empty side, a parameter on both sides, or
            a non-2-D parameter in `muon_params`.
    """

    def __init__(
        self,
        muon_params: Iterable[Tensor] | Iterable[dict[str, Any]],
        adamw_params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "original",
        weight_decay: float = 0.01,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool | None = None,
        track_update_rms: bool = True,
    ):
        if not hasattr(torch.optim, "Muon"):
            raise RuntimeError(
                f"MuonAdamW needs torch.optim.Muon, which first shipped in torch {MUON_MIN_TORCH}; "
                f"this is torch {torch.__version__}. Upgrade torch "
                f"(pip install 'torch>={MUON_MIN_TORCH}') or pick another optimizer."
            )
        muon_defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            weight_decay=weight_decay,
            ns_coefficients=_as_tuple(ns_coefficients),
            eps=eps,
        )
        adamw_defaults = dict(
            lr=adamw_lr,
            betas=_as_tuple(adamw_betas),
            eps=adamw_eps,
            weight_decay=adamw_weight_decay,
        )
        side_defaults = {"muon": muon_defaults, "adamw": adamw_defaults}
        _check_muon_settings(muon_defaults, "")

        muon_groups = _as_groups(muon_params, "muon_params")
        adamw_groups = _as_groups(adamw_params, "adamw_params")
        seen: dict[int, str] = {}
        for side, groups in (("muon", muon_groups), ("adamw", adamw_groups)):
            for i, g in enumerate(groups):
                where = "" if len(groups) == 1 else f" ({side} param group {i})"
                if g.get("optimizer", side) != side:
                    raise ValueError(
                        f"MuonAdamW: a group tagged optimizer={g['optimizer']!r} was passed in "
                        f"{side}_params{where}; move it to {g['optimizer']}_params or drop the tag."
                    )
                if side == "muon":
                    _check_muon_shapes(g, where)
                    _check_muon_settings({**muon_defaults, **g}, where)
                for p in g["params"]:
                    other = seen.setdefault(id(_unnamed(p)), side)
                    if other != side:
                        t = _unnamed(p)
                        raise ValueError(
                            f"MuonAdamW: a parameter of shape {tuple(t.shape)} is in both "
                            "muon_params and adamw_params; give each parameter to one side only."
                        )
                g["optimizer"] = side
                g.setdefault("base_lr", g.get("lr", side_defaults[side]["lr"]))

        if foreach is None and fused is None:
            on_cuda = [_unnamed(p).is_cuda for g in adamw_groups for p in g["params"]]
            fused = True if all(on_cuda) else None
        self._muon = _torch_optimizer(
            torch.optim.Muon, muon_groups, "a Muon setting (lr, momentum, weight_decay)",
            **muon_defaults,
        )
        self._adamw = _torch_optimizer(
            torch.optim.AdamW, adamw_groups, "an adamw_* setting",
            **adamw_defaults, foreach=foreach, fused=fused,
        )

        self.track_update_rms = track_update_rms
        self._telemetry: dict[str, Tensor] = {}
        defaults = {
            **muon_defaults,
            **{f"adamw_{k}": v for k, v in adamw_defaults.items()},
            "foreach": foreach,
            "fused": fused,
        }
        # Optimizer.__init__ hands each group to add_param_group, which adopts groups the inner
        # optimizers already own; the composite never holds copies, only the inner dicts.
        super().__init__(self._muon.param_groups + self._adamw.param_groups, defaults)
        self.state = _ChainedState(self._muon.state, self._adamw.state)  # type: ignore[assignment]

    # ----------------------------------------------------------------------------------------
    # the parts of the torch.optim.Optimizer surface that must see both inner optimizers

    def _inner(self) -> tuple[Optimizer, Optimizer]:
        return self._muon, self._adamw

    def _sync_groups(self) -> None:
        self.param_groups = self._muon.param_groups + self._adamw.param_groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to one side; it must carry `"optimizer": "muon"` or `"adamw"`."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        inner_groups = self._muon.param_groups + self._adamw.param_groups
        if any(param_group is g for g in inner_groups):  # adopted during __init__
            self.param_groups.append(param_group)
            return
        side = param_group.get("optimizer")
        if side not in SIDES:
            raise ValueError(
                "MuonAdamW.add_param_group: the group needs an 'optimizer' key, 'muon' or "
                f"'adamw'; got {side!r}."
            )
        group = {**param_group, "params": _as_list(param_group["params"])}
        where = " (added param group)"
        inner = self._muon if side == "muon" else self._adamw
        if side == "muon":
            _check_muon_shapes(group, where)
            _check_muon_settings({**inner.defaults, **group}, where)
        other = self._adamw if side == "muon" else self._muon
        other_ids = {id(p) for g in other.param_groups for p in g["params"]}
        if any(id(_unnamed(p)) in other_ids for p in group["params"]):
            raise ValueError(
                f"MuonAdamW.add_param_group: a parameter of the new {side} group already belongs "
                "to the other side; give each parameter to one side only."
            )
        group.setdefault("base_lr", group.get("lr", inner.defaults["lr"]))
        inner.add_param_group(group)
        self._sync_groups()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of both sides (to None by default, as torch.optim does)."""
        for opt in self._inner():
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step Muon, then AdamW (they own disjoint parameters, so the order is immaterial)."""
        loss = evaluate_closure(closure)
        # a public attribute, read per step: the engine turns it on only for steps it logs
        before = [_snapshot(opt) for opt in self._inner()] if self.track_update_rms else []
        self._muon.step()
        self._adamw.step()
        # zip stops at once when untracked: no keys, as documented in `telemetry`
        self._telemetry = {
            f"update_rms/{side}": _change_rms(*snapshot) for side, snapshot in zip(SIDES, before)
        }
        return loss

    def state_dict(self) -> dict[str, Any]:
        """`{"muon": Muon state dict, "adamw": AdamW state dict}` (torch's formats, unchanged)."""
        return {"muon": self._muon.state_dict(), "adamw": self._adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict made by `state_dict()`; the group dicts are replaced, as in torch.optim."""
        if not isinstance(state_dict, Mapping) or set(state_dict) != set(SIDES):
            keys = (
                sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            )
            raise ValueError(
                "MuonAdamW.load_state_dict: expected the dict MuonAdamW.state_dict() returns, with "
                f"exactly the keys 'muon' and 'adamw'; got {keys}. A checkpoint of another "
                "optimizer cannot resume a Muon run."
            )
        for side, opt in zip(SIDES, self._inner(), strict=True):
            try:
                opt.load_state_dict(state_dict[side])
            except ValueError as err:
                raise ValueError(
                    f"MuonAdamW.load_state_dict: the {side} part does not fit: {err}"
                ) from err
        # torch's load_state_dict swaps in new group dicts; point the composite at them.
        self._sync_groups()
        self.state = _ChainedState(self._muon.state, self._adamw.state)  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, Any]:
        # The base class pickles only defaults/state/param_groups; the inner optimizers hold
        # the truth, so copies and pickles must carry them.
        return {
            **super().__getstate__(),
            "_muon": self._muon,
            "_adamw": self._adamw,
            "track_update_rms": self.track_update_rms,
            "_telemetry": self._telemetry,
        }

    # ----------------------------------------------------------------------------------------

    def telemetry(self) -> dict[str, Tensor]:
        """`update_rms/muon` and `update_rms/adamw`: RMS of the parameter change of the last step.

        RMS over all coordinates of the parameters that side stepped (those with a gradient), as
        float32 0-d tensors on the parameters' device; nothing syncs with the host.

        Cost, because torch's optimizers do not expose their updates: per side, one foreach copy
        of the parameters before the step, then a foreach subtract and a foreach norm after it,
        i.e. ~3 extra passes over the parameters and one transient parameter-sized buffer. Next
        to Muon's Newton-Schulz matmuls that is small; next to AdamW's 28 B/param it is not, so
        set `track_update_rms = False` on steps that are not logged (the keys are then absent
        until a tracked step). Empty before the first step.
        """
        return dict(self._telemetry)


def _snapshot(opt: Optimizer) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters the next step will move (those with a gradient) and a copy of each."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    copies = [torch.empty_like(p) for p in params]
    if params:
        torch._foreach_copy_(copies, params)
    return params, copies


def _change_rms(params: list[Tensor], before: list[Tensor]) -> Tensor:
    """RMS of `params - before` over all coordinates; consumes `before`."""
    if not params:
        return torch.zeros((), dtype=torch.float32)
    torch._foreach_sub_(before, params)  # before := p_old - p_new, the sign does not matter
    norms = torch._foreach_norm(before, 2, dtype=torch.float32)
    device = params[0].device
    total_sq = torch.stack([n.to(device) for n in norms]).square().sum()
    numel = sum(p.numel() for p in params)
    return (total_sq / numel).sqrt()
