"""Private helpers shared by the optimizers: argument checks, tensor grouping, telemetry sums.

Nothing here is public API. The maths of each optimizer lives in its own file; this module only
holds the plumbing that would otherwise be copied into each of them.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# argument validation: every message names the argument, the bad value and what is allowed


def _where(group_index: int | None) -> str:
    return "" if group_index is None else f" (param group {group_index})"


def _is_real_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(name: str, value: Any, group_index: int | None = None) -> None:
    if not _is_real_number(value) or not value >= 0.0:  # `not >=` also rejects NaN
        raise ValueError(
            f"Invalid {name}={value!r}{_where(group_index)}: it must be a number >= 0."
        )


def check_positive(name: str, value: Any, group_index: int | None = None) -> None:
    if not _is_real_number(value) or not value > 0.0:
        raise ValueError(
            f"Invalid {name}={value!r}{_where(group_index)}: it must be a number > 0."
        )


def check_betas(betas: Any, group_index: int | None = None) -> None:
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise ValueError(
            f"Invalid betas={betas!r}{_where(group_index)}: expected a pair (beta1, beta2), "
            "each in [0, 1)."
        )
    for i, beta in enumerate(betas):
        if not _is_real_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(
                f"Invalid beta{i + 1}={beta!r} in betas={tuple(betas)!r}{_where(group_index)}: "
                "each beta must be in [0, 1)."
            )


def check_batch_size(bs: Any) -> None:
    if not _is_real_number(bs) or not bs > 0:
        raise ValueError(
            f"Invalid bs={bs!r}: it must be a number > 0, the number of tokens the sampled-label "
            "(GNB) loss was averaged over."
        )


# --------------------------------------------------------------------------------------------
# implementation-path selection


def default_foreach(params: Iterable[Tensor]) -> bool:
    """Whether the multi-tensor path should be the default for these tensors.

    Like torch.optim: on when every tensor lives on one device type whose foreach kernels are
    real multi-tensor kernels (CUDA and friends). On CPU a `_foreach_*` op is a loop over
    per-tensor ops, so the reference path costs the same and is easier to read in a profile.
    """
    try:
        from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

        supported = set(_get_foreach_kernels_supported_devices())
    except ImportError:  # private API; fall back to the one device type we know
        supported = {"cuda"}
    device_types = {p.device.type for p in params}
    return len(device_types) == 1 and device_types <= supported


def group_by_device_and_dtype(
    tensorlists: Sequence[list[Tensor]],
) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Split aligned tensor lists by (device, dtype) of the first list, keeping alignment.

    Foreach kernels only take their fast path when every tensor of a call shares device and dtype.
    """
    first = tensorlists[0]
    if not first:
        return {}
    key = (first[0].device, first[0].dtype)
    if all(p.device == key[0] and p.dtype == key[1] for p in first):
        return {key: [list(tl) for tl in tensorlists]}  # the usual case, every step: no regrouping
    groups: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    for i, p in enumerate(first):
        bucket = groups.setdefault((p.device, p.dtype), [[] for _ in tensorlists])
        for j, tl in enumerate(tensorlists):
            bucket[j].append(tl[i])
    return groups


def as_real(tensors: list[Tensor]) -> list[Tensor]:
    """View complex tensors as real pairs so the elementwise maths treats re/im as coordinates."""
    return [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors]


def real_numel(tensors: Iterable[Tensor]) -> int:
    """Number of real coordinates (a complex entry counts twice, as `as_real` sees it)."""
    return sum(2 * t.numel() if torch.is_complex(t) else t.numel() for t in tensors)


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """torch.optim's closure protocol: steps run under no_grad, the closure needs grad back."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# --------------------------------------------------------------------------------------------
# telemetry: everything stays a device tensor; the host only reads it when someone logs it


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for reductions: at least float32, never narrower than the input."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def sum_to(values: list[Tensor], device: torch.device) -> Tensor:
    """Sum 0-d tensors (possibly on several devices) into one float32 0-d tensor on `device`."""
    if not values:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([v.to(device=device, dtype=torch.float32) for v in values]).sum()


def l1_l2(tensors: list[Tensor], foreach: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """(sum |x|, sqrt(sum x^2)) over all tensors, as float32 0-d tensors on `device`."""
    l1_parts: list[Tensor] = []
    sq_parts: list[Tensor] = []
    tensors = as_real(tensors)
    if foreach:
        for (_, dtype), (ts,) in group_by_device_and_dtype([tensors]).items():
            l1_parts.extend(torch._foreach_norm(ts, 1, dtype=acc_dtype(dtype)))
            sq_parts.extend(n.square() for n in torch._foreach_norm(ts, 2, dtype=acc_dtype(dtype)))
    else:
        for t in tensors:
            l1_parts.append(torch.linalg.vector_norm(t, 1, dtype=acc_dtype(t.dtype)))
            sq_parts.append(torch.linalg.vector_norm(t, 2, dtype=acc_dtype(t.dtype)).square())
    return sum_to(l1_parts, device), sum_to(sq_parts, device).sqrt()

