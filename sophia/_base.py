"""The torch.optim.Optimizer plumbing that Lion and the two Sophias share.

Nothing here is public API and nothing here is maths: each optimizer's update lives in its own
file (`lion.py`, `sophia.py`). This class holds what would otherwise be copied into each of them:
validating every param group, defaults for group keys that state dicts of the official
implementations lack, gathering a group's tensors, running the update on the path the group asks
for (reference, foreach or fused) with the fused-path fallback, and `telemetry()`.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import check_betas, check_nonnegative, evaluate_closure, real_numel
from ._fused import FusedCompileError, check_fused_and_foreach, check_fused_supported, choose_path

T = TypeVar("T")

# What a group's update returns: one or a few 0-d tensors summed on the device, which the
# optimizer turns into telemetry (see `MultiPathOptimizer._telemetry_from`).
GroupSums = Tensor | tuple[Tensor, ...]


class MultiPathOptimizer(Optimizer):
    """Base of Lion, SophiaG and SophiaH: an Optimizer whose update has three paths.

    Subclasses set `_STATE_KEYS`, implement `_init_state` and `_telemetry_from`, may extend
    `_check_hyperparameters`, and write `step` as "build the group update, call `_step`".
    """

    # Per-parameter state tensors the update reads, in the order it takes them after params, grads.
    _STATE_KEYS: tuple[str, ...] = ()
    # Group keys of ours that state dicts saved by the official implementations lack.
    _GROUP_KEY_DEFAULTS: Mapping[str, Any] = {"maximize": False, "foreach": None, "fused": None}

    def __init__(self, params: Any, defaults: dict[str, Any]):
        # Checked before the groups so that a bad constructor argument is reported as such,
        # not as an error of "param group 0".
        self._check_hyperparameters(defaults, None)
        check_fused_and_foreach(defaults["fused"], defaults["foreach"], None)
        defaults = {**defaults, "betas": tuple(defaults["betas"])}  # lists from config files
        self._telemetry: dict[str, Tensor] = {}
        self._fused_failed = False  # fused=None met a compile failure: stop trying
        super().__init__(params, defaults)

    def _check_hyperparameters(self, group: Mapping[str, Any], group_index: int | None) -> None:
        """Raise a ValueError naming the first invalid setting (of the defaults if index None)."""
        check_nonnegative("lr", group["lr"], group_index)
        check_betas(group["betas"], group_index)
        check_nonnegative("weight_decay", group["weight_decay"], group_index)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        self._check_hyperparameters(group, index)
        check_fused_and_foreach(group["fused"], group["foreach"], index)
        if group["fused"]:
            check_fused_supported(group["params"], type(self).__name__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict and unpickling, with groups that may predate our keys.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._GROUP_KEY_DEFAULTS.items():
                group.setdefault(key, value)
        self._telemetry = {}
        self._fused_failed = getattr(self, "_fused_failed", False)

    def _init_state(self, state: dict[str, Any], p: Tensor) -> dict[str, Any]:
        """Fill in the missing state of parameter `p` (lazily, on its first gradient)."""
        raise NotImplementedError

    def _gather(self, group: dict[str, Any]) -> list[list[Tensor]]:
        """[params, grads, *state in `_STATE_KEYS` order] for the group's params with a grad."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        states: list[list[Tensor]] = [[] for _ in self._STATE_KEYS]
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; use dense "
                    "gradients (e.g. nn.Embedding(sparse=False))."
                )
            params.append(p)
            grads.append(grad)
            state = self._init_state(self.state[p], p)
            for tensors, key in zip(states, self._STATE_KEYS):
                tensors.append(state[key])
        return [params, grads, *states]

    def _run_on_chosen_path(
        self, group: dict[str, Any], params: list[Tensor], update: Callable[..., T]
    ) -> T:
        """`update(foreach=..., fused=...)` on the path `choose_path` picks for this group.

        The fused path raises FusedCompileError before it writes any tensor, so retrying on
        another path is safe. Under fused=None that retry happens with one warning, and the fused
        path stays off for this optimizer; an explicit fused=True re-raises instead.
        """
        foreach, fused = choose_path(group, params, allow_fused=not self._fused_failed)
        try:
            return update(foreach=foreach, fused=fused)
        except FusedCompileError as err:
            if group["fused"]:
                raise
            warnings.warn(
                f"{err} Falling back to the non-fused path for this {type(self).__name__} "
                "(fused=None).",
                RuntimeWarning,
                stacklevel=4,
            )
            self._fused_failed = True
        foreach, _ = choose_path(group, params, allow_fused=False)
        return update(foreach=foreach, fused=False)

    def _step(
        self,
        closure: Callable[[], Any] | None,
        group_update: Callable[[dict[str, Any], list[list[Tensor]]], Callable[..., GroupSums]],
    ) -> Any:
        """One step over all groups; `group_update(group, tensors)` binds a group's update.

        The bound update is called as `update(foreach=..., fused=...)` and returns the group's
        telemetry sums; groups without any gradient are skipped.
        """
        loss = evaluate_closure(closure)
        per_group: list[tuple[dict[str, Any], GroupSums]] = []
        numel = 0
        device: torch.device | None = None
        for group in self.param_groups:
            tensors = self._gather(group)
            params = tensors[0]
            if not params:
                continue
            sums = self._run_on_chosen_path(group, params, group_update(group, tensors))
            per_group.append((group, sums))
            numel += real_numel(params)
            device = device or params[0].device
        self._telemetry = self._telemetry_from(per_group, numel, device) if numel else {}
        return loss

    def _telemetry_from(
        self,
        per_group: list[tuple[dict[str, Any], GroupSums]],
        numel: int,
        device: torch.device,
    ) -> dict[str, Tensor]:
        """The telemetry dict of a step, from each stepped group's sums (no host sync)."""
        raise NotImplementedError

    def telemetry(self) -> dict[str, Tensor]:
        """Statistics of the last step as 0-d device tensors (no host sync until you read them).

        Empty before the first step and after a step in which no parameter had a gradient.
        """
        return dict(self._telemetry)
