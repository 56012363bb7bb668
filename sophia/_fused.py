"""Plumbing of the fused step path: compiled, multi-tensor kernels, one pass over memory per step.

Each optimizer file writes its fused maths once (`_fused_*_kernel`, a plain function over lists
of tensors written like the reference path); this module compiles it with `torch.compile`
(inductor: fused Triton kernels on CUDA, vectorised C++/OpenMP loops on CPU), feeds it
hyperparameters as device tensors and turns compile failures into `FusedCompileError`. The only
public names are `clear_fused_cache` and `fused_cache_size` (re-exported by `sophia`).

Why each piece is the way it is:

- Inductor must keep each tensor's work in one loop: read p, g, m (and h) once, write p and m
  once, telemetry sums in the same loop. Functionalisation moves every in-place write to the
  end of the graph, and inductor refuses to fuse nodes more than 64 apart in graph order
  ("nodes are too far away", a guard against peak memory that does not apply to in-place
  updates). With its default heuristics, a graph over more than a handful of tensors therefore
  computes the update in one loop and stores m (or a clip ratio) from a second loop that reads
  the tensors again, moving more bytes than one pass needs (measured in docs/benchmarks.md). So
  the kernels are compiled with that one limit lifted for loops that share a tensor's data
  (`_OnePassFusion`); loops of different tensors, which share only the hyperparameter scalars,
  keep inductor's rule. tests/test_fused.py counts the loads and stores of the generated code.
- On CUDA the telemetry sums go row by row (`partial_sums`): a whole-tensor sum is split by
  inductor across a matrix's rows and cannot share the update's kernel, which then stores a
  parameter-sized temporary for it (GPT-2 small's SophiaG step: 32 bytes per coordinate instead
  of 24). Each chunk adds up its tensors' partial sums once. `benchmarks/cuda_kernels.py`
  generates and counts the CUDA code without a GPU.
- A group's tensors go to the compiled kernel in chunks of at most MAX_TENSORS_PER_KERNEL: the
  graphs stay small, chunks of a model's repeated layers share one compiled step, and with a
  torch whose inductor has no hook for the distance rule the chunks keep the distance short.
- One compiled function per *chunk structure* (device, dtype, shapes, the kernel's Python
  flags): a fresh code object each, because dynamo keeps its cache and its recompile limit (8) per code object.
  Shared by all optimizers in the process, so a second optimizer over the same shapes reuses it,
  and so do the chunks of one model whose layers repeat the same shapes.
- Hyperparameters (lr, betas, rho * bs, weight decay) enter as 0-d tensors on the parameters'
  device. A Python float would be baked into the graph, so an LR schedule would recompile every
  step; a tensor is just another kernel argument. They are immutable and cached by value, so a
  constant costs nothing after the first step and a scheduled lr costs one tiny fill per step,
  with no host-device synchronisation.
- `fullgraph=True`: each chunk is one graph or an error, never a half-executed chunk. Every chunk
  needs the same compiler, so a missing one fails the first chunk, before any tensor is written,
  and falling back to another path is safe; a later chunk failing on its own is reported as a
  partly applied step instead (never retried, which would apply the earlier chunks twice).
"""
from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ._common import default_foreach

# Device types inductor generates kernels for, and the dtypes the fused maths is written for.
FUSED_DEVICE_TYPES = ("cuda", "cpu")
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class FusedCompileError(RuntimeError):
    """torch.compile could not build the fused step (no C++ compiler, no Triton, ...)."""


def check_fused_and_foreach(
    fused: bool | None, foreach: bool | None, group_index: int | None
) -> None:
    """torch.optim's rule: the two explicit choices exclude each other."""
    if fused and foreach:
        where = "" if group_index is None else f" (param group {group_index})"
        raise ValueError(
            f"fused=True and foreach=True were both given{where}: they name two different "
            "implementation paths. Pass only one of them (fused=True for the compiled kernel, "
            "foreach=True for the torch._foreach_* path)."
        )


def check_fused_supported(params: Iterable[Tensor], optimizer: str) -> None:
    """Raise a ValueError naming the first parameter the fused path cannot handle."""
    for i, p in enumerate(params):
        if p.device.type not in FUSED_DEVICE_TYPES:
            raise ValueError(
                f"{optimizer}(fused=True) supports parameters on {', '.join(FUSED_DEVICE_TYPES)} "
                f"devices; parameter {i} is on '{p.device}'. Move the model to a supported device "
                "or pass fused=False."
            )
        if p.dtype not in FUSED_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in FUSED_DTYPES)
            raise ValueError(
                f"{optimizer}(fused=True) supports {names} parameters; parameter {i} is "
                f"{str(p.dtype).removeprefix('torch.')}. Pass fused=False (the reference and "
                "foreach paths also handle complex parameters)."
            )


@functools.cache
def _triton_available() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


# fused=None takes the fused path on CPU only for groups at least this large: a cold compile costs
# seconds to tens of seconds and each step saves only nanoseconds per parameter over the foreach
# path (both measured in docs/benchmarks.md), so only big groups repay it within a few dozen
# steps. Tiny models (tests, the offline quickstart) never would.
CPU_FUSED_MIN_NUMEL = 2**24


def default_fused(params: Sequence[Tensor]) -> bool:
    """Whether `fused=None` should pick the fused path for these tensors (one param group).

    CUDA (with Triton, which inductor needs there): always; it is one pass over memory instead of
    one per elementwise op. CPU: when the group holds at least CPU_FUSED_MIN_NUMEL parameters,
    where the measured per-step saving repays the compile time quickly. Elsewhere: never.
    """
    if not params or any(p.dtype not in FUSED_DTYPES for p in params):
        return False
    device_types = {p.device.type for p in params}
    if device_types == {"cuda"}:
        return _triton_available()
    if device_types == {"cpu"}:
        return sum(p.numel() for p in params) >= CPU_FUSED_MIN_NUMEL
    return False


def choose_path(
    group: dict, params: Sequence[Tensor], allow_fused: bool = True
) -> tuple[bool, bool]:
    """(foreach, fused) for one param group: explicit choices win, None picks as documented.

    An explicit foreach=True keeps fused=None off the fused path (torch.optim does the same).
    """
    fused = group["fused"]
    if fused is None:
        fused = allow_fused and group["foreach"] is not True and default_fused(params)
    if fused:
        return False, True
    foreach = group["foreach"]
    return (default_foreach(params) if foreach is None else bool(foreach)), False


# Device types on which `partial_sums` sums rows (benchmarks/cuda_kernels.py adds "cpu" to trace
# the CUDA step on a machine without a GPU).
_ROWS_FIRST_DEVICE_TYPES = ("cuda",)


def partial_sums(values: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A 1-D tensor of partial sums of `values`, for use inside the compiled kernels: on CUDA
    the sums along the last dimension, elsewhere the one whole sum. A kernel collects these for
    each of its tensors and adds them up once, with `sum_of_partials`.

    Same sum, another order, for the sake of inductor's fusion. On CUDA a large whole-tensor sum
    becomes a split reduction whose chunks cut across a matrix's rows; their index then no
    longer matches the one the same step writes p and m with, so inductor cannot fuse the two
    and stores a parameter-sized temporary for the sum to read back (32 bytes per SophiaG
    coordinate instead of 24, `benchmarks/cuda_kernels.py`). Row sums keep the update's own index,
    and finishing every tensor's row sums in one reduction saves two kernel launches per tensor.
    On CPU it is the other way round: the whole-tensor sum stays in the update's loop, while row
    sums would split it in two.
    """
    if values.dim() >= 2 and values.device.type in _ROWS_FIRST_DEVICE_TYPES:
        return values.sum(dim=-1, dtype=dtype).flatten()
    return values.sum(dtype=dtype).reshape(1)


def sum_of_partials(parts: Sequence[Tensor]) -> Tensor:
    """The total of `partial_sums` results, as a 0-d tensor (int64 for integer counts)."""
    return torch.cat(list(parts)).sum()


def count_partials(mask: Tensor) -> Tensor:
    """`partial_sums` of a boolean mask: how many entries are True, for `sum_of_partials`.

    Counting in int32 where it cannot overflow lets inductor's CPU code keep the count in one
    vector register; an int64 count splits it across two and slows the whole fused step.
    """
    return partial_sums(mask, torch.int32 if mask.numel() < 2**31 else torch.int64)


# --------------------------------------------------------------------------------------------
# scalars as tensors


@functools.lru_cache(maxsize=256)
def _scalar(value: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.full((), value, dtype=dtype, device=device)


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype eager kernels compute a Python scalar in (the op math type): float32 for the
    half types, so the fused path rounds its hyperparameters exactly as the reference does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scalars(device: torch.device, dtype: torch.dtype, *values: float) -> list[Tensor]:
    """0-d tensors holding `values` (computed in Python double, rounded once, like eager ops)."""
    sdtype = scalar_dtype(dtype)
    return [_scalar(float(v), device, sdtype) for v in values]


# --------------------------------------------------------------------------------------------
# compiling and running

_COMPILED: dict[tuple, Callable] = {}
# structures whose compiled step has run at least once: past the first call, errors are real
_WARMED: set[tuple] = set()


def fused_cache_size() -> int:
    """Number of compiled fused steps this process holds (one per kernel and chunk structure).

    Every optimizer instance shares them: a second optimizer over the same parameter shapes
    reuses the first one's compiled step instead of compiling again.
    """
    return len(_COMPILED)


def clear_fused_cache() -> None:
    """Forget every compiled fused step; the next fused step of each structure compiles afresh.

    Needed only after changing how torch.compile behaves (its config, a patched compiler) or to
    release the compiled code; training never has to call it.
    """
    _COMPILED.clear()
    _WARMED.clear()


# Loops sharing at least this many bytes of reads are fused however far apart they are in the
# graph. The loops of one tensor's update share g and m (8 bytes a float32 coordinate), so they
# qualify from 128 coordinates up; loops of different tensors share only the 0-d
# hyperparameters, and never do.
_MIN_SHARED_BYTES_TO_FUSE_FAR = 1024


class _OnePassFusion:
    """Inductor's fusion heuristics (the current `V.choices`), less the node-distance limit for
    loops over the same tensor's data. Everything else is delegated unchanged."""

    def __init__(self, inner: object | None = None):
        if inner is None:
            from torch._inductor.choices import InductorChoices

            inner = InductorChoices()
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def uuid(self) -> str:
        # part of inductor's cache key, so that code compiled under these heuristics and code
        # compiled under the default ones are never mistaken for each other
        return f"sophia._fused._OnePassFusion(min_shared_bytes={_MIN_SHARED_BYTES_TO_FUSE_FAR})"

    def can_fuse_horizontal(self, scheduler, node1, node2, shared_data_score, *args, **kwargs):
        if shared_data_score >= _MIN_SHARED_BYTES_TO_FUSE_FAR:
            scheduler = _NoDistantNodes(scheduler)
        return self._inner.can_fuse_horizontal(
            scheduler, node1, node2, shared_data_score, *args, **kwargs
        )


class _NoDistantNodes:
    """A view of inductor's scheduler in which no two nodes are too far apart to fuse."""

    def __init__(self, scheduler: object):
        self._scheduler = scheduler

    def __getattr__(self, name: str):
        return getattr(self._scheduler, name)

    def are_long_distant_nodes(self, node1, node2) -> bool:
        return False


@functools.cache
def _fusion_hook():
    """inductor's `V` if it lets a heuristics handler decide horizontal fusion, else None."""
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.virtualized import V
    except ImportError:
        return None
    return V if hasattr(InductorChoices, "can_fuse_horizontal") else None


@functools.cache
def _compile_options() -> dict:
    # size_asserts off: dynamo's guards already check every input's shape and strides, and the
    # generated code's second check of each tensor was a third of a chunk's call overhead.
    options: dict = {"size_asserts": False}
    if _fusion_hook() is None:
        return options
    from torch._inductor import config

    # The heuristics handler in effect is not part of inductor's cache key, so code compiled
    # under the default heuristics could be served for ours. Where the config can name a
    # handler in the key (its uuid()), it does; elsewhere these steps skip inductor's cache.
    if "inductor_choices_class" in getattr(config, "_cache_config_factory_keys", ()):
        options["inductor_choices_class"] = _OnePassFusion
    else:
        options["fx_graph_cache"] = False
    return options


@contextlib.contextmanager
def _one_pass_fusion():
    """Inductor compiles under `_OnePassFusion` inside this context (a no-op without the hook).

    Entered around every call of a compiled step, not only the first: dynamo recompiles by
    itself when a guard fails.
    Reading `V.choices` first also gives the thread its default handler outside any compile, so
    the option above never becomes the handler of the thread's other compiles (a model's).
    """
    V = _fusion_hook()
    if V is None:
        yield
        return
    inner = V.choices
    V.set_choices_handler(_OnePassFusion(inner))
    try:
        yield
    finally:
        V.set_choices_handler(inner)


def _with_own_code(function: Callable) -> Callable:
    """The same function with a code object of its own, so with a dynamo cache of its own
    (see the module docstring)."""
    return types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__,
        function.__defaults__, function.__closure__,
    )


def _compile(kernel: Callable) -> Callable:
    return torch.compile(
        _with_own_code(kernel), dynamic=False, fullgraph=True, options=_compile_options()
    )


def _structure(tensorlists: Sequence[list[Tensor]], flags: tuple) -> tuple:
    # Only picks the cache; dynamo's guards still check every tensor, so a mismatch elsewhere
    # (strides, a state tensor's dtype) recompiles rather than misbehaves. Kept cheap: it runs
    # every step.
    params = tensorlists[0]
    return (params[0].device, params[0].dtype, tuple(p.shape for p in params), flags)


# Most tensors one compiled call steps (see the module docstring).
MAX_TENSORS_PER_KERNEL = 16


def run_fused(
    kernel: Callable,
    tensorlists: Sequence[list[Tensor]],
    scalar_args: Sequence[Tensor],
    flags: tuple = (),
    optimizer: str = "optimizer",
) -> list:
    """Call the compiled `kernel(*chunk_lists, *scalar_args, *flags)` on each chunk of tensors.

    The lists are cut into aligned chunks of at most MAX_TENSORS_PER_KERNEL tensors; the result
    is the kernel's return value for each chunk, in order. `flags` are Python constants the kernel
    branches on (e.g. maximize): part of the structure key. If the first chunk fails to compile,
    FusedCompileError is raised and nothing has been written to any tensor; a compile failure of
    a later chunk raises a RuntimeError saying the step was partly applied.
    """
    n = len(tensorlists[0])
    results = []
    with _one_pass_fusion():
        for start in range(0, n, MAX_TENSORS_PER_KERNEL):
            chunk = [tensors[start:start + MAX_TENSORS_PER_KERNEL] for tensors in tensorlists]
            try:
                results.append(_run_chunk(kernel, chunk, scalar_args, flags, optimizer))
            except FusedCompileError as err:
                if start == 0:
                    raise
                raise RuntimeError(
                    f"{err} The first {start} of this group's {n} tensors were already stepped, "
                    "so this step cannot be retried on another path; restore the last "
                    "checkpoint and pass fused=False."
                ) from err
    return results


def _run_chunk(
    kernel: Callable,
    tensorlists: Sequence[list[Tensor]],
    scalar_args: Sequence[Tensor],
    flags: tuple,
    optimizer: str,
):
    key = (kernel, _structure(tensorlists, flags))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = _compile(kernel)
    if key in _WARMED:
        return fn(*tensorlists, *scalar_args, *flags)
    try:
        out = fn(*tensorlists, *scalar_args, *flags)
    except Exception as err:  # noqa: BLE001 -- any failure here happened while compiling
        del _COMPILED[key]
        device = tensorlists[0][0].device.type
        need = "a working C++ compiler (gcc/clang)" if device == "cpu" else "Triton"
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise FusedCompileError(
            f"{optimizer}: torch.compile could not build the fused step on {device} "
            f"({type(err).__name__}: {first_line}). "
            f"The fused path needs {need}; install it, or pass fused=False to use the foreach "
            "or reference path."
        ) from err
    _WARMED.add(key)
    return out
