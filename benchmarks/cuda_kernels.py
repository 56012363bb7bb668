"""The CUDA kernels inductor writes for the fused optimizer steps, inspected on a machine without
a GPU: kernel launches per step and bytes moved per parameter, against the one-pass floor.

    pip install triton           # the code generator (in the dev extra); no GPU, no CUDA torch
    python -m benchmarks.cuda_kernels --optimizers sophia,lion --model gpt2-small
    python -m benchmarks.cuda_kernels --model gpt2-small --dump cuda_code/   # the generated code
    python -m benchmarks.cuda_kernels --inductor-config combo_kernels=True   # a compiler setting

What it does: the optimizer steps a model's parameter set on the CPU with `fused=True`, exactly
as in training (same chunks, flags and hyperparameter tensors), but each compiled chunk is
lowered a second time for a pretended H100 (fake CUDA tensors; the few device queries inductor
makes are answered with H100 numbers) and the Triton source is kept instead of compiled. Each
kernel launch is then read for its full-size loads and stores: a step that is one pass moves 24
bytes per float32 coordinate (SophiaG, SophiaH: read p, g, m, h, write p, m) or 20 (Lion), and a
temporary written by one kernel and read back by another shows up as more.

It relies on inductor internals (torch 2.13 here), so on another version it may fail; it does
not touch the optimizers' behaviour. On a real GPU, tests/test_fused.py's `gpu` tests make the
same count on the code inductor compiles there.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

# bench_optim: the parameter sets and the optimizers as it benchmarks them
from benchmarks import bench_optim
from engine.optimizers import entries
from sophia import _fused


def compiled_optimizers() -> list[str]:
    """The registered optimizers whose fused path is the library's compiled step (AdamW's is
    torch's own)."""
    return [name for name, entry in entries().items() if entry.compiled]


_DTYPE_BYTES = {"fp64": 8, "fp32": 4, "fp16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2,
                "i8": 1, "u8": 1, "i1": 1}
# what inductor asks of the device while generating code, answered for an H100 SXM
_H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (pretended)", major=9, minor=0, multi_processor_count=132,
    total_memory=80 * 2**30, max_threads_per_multi_processor=2048,
    regs_per_multiprocessor=65536, warp_size=32, shared_memory_per_block_optin=232448,
    L2_cache_size=50 * 2**20, gcnArchName="", max_threads_per_block=1024, clock_rate=1980000,
    memory_clock_rate=2619000, memory_bus_width=5120,
)


# ------------------------------------------------------------------------ reading the code
@dataclass
class Launch:
    """One kernel launch of a generated wrapper and the full-size memory traffic it makes."""

    kernel: str
    numels: tuple[int, ...]  # xnumel, then rnumel for reductions (of the first sub-kernel)
    bytes_read: int
    bytes_written: int
    subkernels: int = 1  # more than one: a combo kernel (`combo_kernels=True`)


def bytes_moved(launches: list[Launch]) -> int:
    """Full-size bytes read and written by these launches together."""
    return sum(launch.bytes_read + launch.bytes_written for launch in launches)


def _call_args(text: str, start: int) -> str:
    """The text between the parenthesis opening at `start` and the one that closes it."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    raise ValueError(f"unbalanced parentheses after offset {start}")


def _accesses(source: str, op: str) -> list[tuple[str, str]]:
    """(pointer, index expression) of every `tl.<op>(pointer + (index), ...)` in a kernel."""
    out = []
    for m in re.finditer(rf"tl\.{op}\((\w+) \+ ", source):
        index = m.end()
        if source[index] == "(":
            out.append((m.group(1), _call_args(source, index)))
    return out


def _elements(index: str, numels: tuple[int, ...]) -> int:
    """How many elements an access with this index touches in one launch."""
    x = numels[0]
    r = numels[1] if len(numels) > 1 else 1
    has_x = re.search(r"\bx\d", index) is not None
    has_r = "r0_" in index
    return (x if has_x else 1) * (r if has_r else 1) if (has_x or has_r) else 1


def _traffic(name: str, part: str, itemsize: dict[str, int]) -> tuple[tuple[int, ...], int, int]:
    """(numels, bytes read, bytes written) of one kernel body, sized by its own numel lines."""
    sizes = [re.search(rf"^\s+{size} = (\d+)$", part, re.MULTILINE)
             for size in ("xnumel", "r0_numel")]
    if sizes[0] is None:
        raise ValueError(f"{name}: no static xnumel in its source (dynamic shapes?): this "
                         "reader cannot size its accesses")
    numels = tuple(int(size.group(1)) for size in sizes if size is not None)
    read, written = (
        sum(itemsize.get(p, 4) * _elements(index, numels) for p, index in _accesses(part, op))
        for op in ("load", "store"))
    return numels, read, written


def kernel_launches(wrapper: str) -> list[Launch]:
    """Every Triton kernel launch in an inductor wrapper module, in order, with its traffic.

    Loads and stores whose index depends on the program or reduction position count as full
    size (xnumel, times r0_numel where the index uses both); scalar loads count one element.
    Sizes are read from the kernel's source, as inductor writes them for static shapes; a combo
    kernel's sub-kernels (`if pid < num_xblocks_0:` ...) are sized one by one.
    """
    sources = {m.group(1): m.group(2) for m in re.finditer(
        r"async_compile\.triton\('(\w+)', '''(.*?)'''", wrapper, re.DOTALL)}
    launches = []
    for m in re.finditer(r"\b(\w+)\.run\(", wrapper):
        name, source = m.group(1), sources.get(m.group(1))
        if source is None:
            continue
        itemsize = {p: _DTYPE_BYTES[t] for p, t in re.findall(r"'(\w+)': '\*(\w+)'", source)}
        parts = re.split(r"^\s+(?:el)?if pid < num_xblocks_\d+:$", source, flags=re.MULTILINE)
        parts = parts[1:] if len(parts) > 1 else parts
        for op in ("load", "store"):  # inductor states its counts for plain kernels
            stated = re.search(rf"'num_{op}': (\d+)", source)
            found = sum(len(_accesses(part, op)) for part in parts)
            if stated and found != int(stated.group(1)):
                raise ValueError(f"{name}: {found} {op}s read where inductor states "
                                 f"{stated.group(1)}: this reader does not know this torch's code")
        traffic = [_traffic(name, part, itemsize) for part in parts]
        launches.append(Launch(name, traffic[0][0], sum(t[1] for t in traffic),
                               sum(t[2] for t in traffic), len(parts)))
    return launches


# ----------------------------------------------------------------- lowering for a pretended GPU
class _Generated(Exception):
    """Raised to stop inductor once the wrapper's source exists (it cannot be loaded here)."""

    def __init__(self, source: str):
        super().__init__("generated")
        self.source = source


@contextlib.contextmanager
def _pretend_h100():
    """Answer inductor's device queries as an H100 would, and keep generated code uncompiled."""
    import torch.utils._triton as triton_utils
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor import graph, scheduler

    def keep_source(self, wrapper_code):
        raise _Generated(wrapper_code.value)

    fixed = {
        torch.cuda: {
            "get_device_properties": lambda *a, **k: _H100, "is_available": lambda: True,
            "device_count": lambda: 1, "current_device": lambda: 0,
            "get_device_capability": lambda *a, **k: (9, 0), "_exchange_device": lambda d: 0,
            "_maybe_exchange_device": lambda d: 0, "synchronize": lambda *a, **k: None,
            "get_rng_state": lambda *a, **k: torch.zeros(16, dtype=torch.uint8),
            "set_rng_state": lambda *a, **k: None,
        },
        torch.cuda.random: {
            "get_rng_state": lambda *a, **k: torch.zeros(16, dtype=torch.uint8),
            "set_rng_state": lambda *a, **k: None,
        },
        CudaInterface: {
            "get_device_properties": staticmethod(lambda *a, **k: _H100),
            "current_device": staticmethod(lambda: 0), "device_count": staticmethod(lambda: 1),
            "is_available": staticmethod(lambda: True),
            "get_compute_capability": staticmethod(lambda *a, **k: 90),
            "synchronize": staticmethod(lambda *a, **k: None),
            "exchange_device": staticmethod(lambda d: 0),
            "maybe_exchange_device": staticmethod(lambda d: 0),
            "set_device": staticmethod(lambda d: None),
            "get_raw_stream": staticmethod(lambda d: 0),
        },
        CudaInterface.Worker: {
            "get_device_properties": staticmethod(lambda *a, **k: _H100),
            "current_device": staticmethod(lambda: 0),
        },
        triton_utils: {
            "has_triton": lambda: True, "triton_backend": lambda: None,
            "triton_hash_with_backend": lambda: "0" * 64,
        },
        scheduler: {"has_triton": lambda: True},
        graph.GraphLowering: {"_compile_to_module_lines": keep_source},
    }
    with contextlib.ExitStack() as stack:
        # inductor warns that it keeps its temporary directory "on error": the stop above
        logger = logging.getLogger("torch._inductor.utils")
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
        for owner, attrs in fixed.items():
            for name, value in attrs.items():
                stack.enter_context(mock.patch.object(owner, name, value))
        yield


@dataclass
class _Meta:
    """Shape, strides and dtype of a graph input, without its (fake) tensor."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype = tuple(t.shape), tuple(t.stride()), t.dtype


def _copy_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    import copy
    return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))


def cuda_wrapper_source(gm: torch.fx.GraphModule, example_inputs: list[_Meta]) -> str:
    """Inductor's CUDA wrapper module (kernels included) for a post-AOT graph traced on CPU."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda = torch.device("cuda", 0)
    for node in gm.graph.nodes:  # constants the graph creates (e.g. a scalar) move too
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": cuda}
    gm.recompile()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        inputs = [torch.empty_strided(t.shape, t.stride, dtype=t.dtype, device=cuda)
                  for t in example_inputs]
    # never from inductor's cache: a hit would load (CUDA) code instead of generating it
    no_cache = torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False)
    with _pretend_h100(), fake_mode, no_cache:
        try:
            compile_fx_inner(gm, inputs)
        except Exception as err:  # inductor wraps what its steps raise
            cause = err
            while cause is not None and not isinstance(cause, _Generated):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            return cause.source
    raise RuntimeError("inductor finished without generating a wrapper")


@dataclass
class _Capture:
    """Stands in for `sophia._fused._compile`: runs each chunk eagerly on CPU (the post-AOT
    graph) and lowers each new chunk structure for CUDA once."""

    launches: list[list[Launch]] = field(default_factory=list)  # per chunk call, in order
    sources: list[str] = field(default_factory=list)  # per chunk structure

    def compile(self, kernel):
        from torch._dynamo.backends.common import aot_autograd
        from torch._inductor.decomposition import select_decomp_table

        graphs: list[tuple[torch.fx.GraphModule, list]] = []
        lowered: list[list[Launch]] = []

        def capture(gm, example_inputs):
            # lowered later: inside dynamo's compile, inductor would meet dynamo's fake mode
            graphs.append((_copy_graph(gm), [_Meta(t) for t in example_inputs]))
            return gm

        backend = aot_autograd(fw_compiler=capture, keep_inference_input_mutations=True,
                               decompositions=select_decomp_table())
        compiled = torch.compile(_fused._with_own_code(kernel), backend=backend,
                                 fullgraph=True, dynamic=False)

        def step_chunk(*args):
            out = compiled(*args)
            while len(lowered) < len(graphs):
                source = cuda_wrapper_source(*graphs[len(lowered)])
                self.sources.append(source)
                lowered.append(kernel_launches(source))
            self.launches.append(lowered[-1])
            return out
        return step_chunk


# ------------------------------------------------------------------------------------- main
def inspect(optimizer: str, model: str | None = None, shapes: str | None = None,
            dump: Path | None = None, rows_first: bool = True,
            inductor_config: dict | None = None) -> dict:
    """One fused step of `optimizer` over a model preset's parameter set, or over one param
    group of `shapes` ("768x3072,3072"), lowered for CUDA. `rows_first=False` lowers the
    kernels with whole-tensor sums instead, as they were written before (for comparison);
    `inductor_config` options (e.g. {"combo_kernels": True}) apply while lowering."""
    shape_groups = bench_optim.parse_shapes(shapes) if shapes else bench_optim.param_shapes(model)
    groups = bench_optim.materialise(shape_groups, torch.device("cpu"))
    opt = bench_optim.build(optimizer, "fused", groups)
    capture = _Capture()
    # traced on CPU tensors, so the kernels take their CUDA branch on request; compiled steps
    # of their own, apart from the process's cache of fused steps
    rows_first_on = ("cuda", "cpu") if rows_first else ()
    with mock.patch.object(_fused, "_compile", capture.compile), \
            mock.patch.object(_fused, "_ROWS_FIRST_DEVICE_TYPES", rows_first_on), \
            mock.patch.object(_fused, "_COMPILED", {}), \
            mock.patch.object(_fused, "_WARMED", set()), \
            torch._inductor.config.patch(inductor_config or {}):
        opt.step()
    n_params = sum(p.numel() for ps in groups for p in ps)
    launches = [launch for chunk in capture.launches for launch in chunk]
    moved = bytes_moved(launches)
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        for i, source in enumerate(capture.sources):
            (dump / f"{optimizer}_{model or 'shapes'}_{i}.py").write_text(source)
    return {"optimizer": optimizer, "model": model or shapes, "params": n_params,
            "tensors": sum(len(ps) for ps in groups), "chunk_calls": len(capture.launches),
            "launches": len(launches), "bytes_per_param": moved / n_params,
            "inductor_config": inductor_config or {},
            "floor": bench_optim.bytes_floor(optimizer)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", default=",".join(compiled_optimizers()),
                    help=f"comma-separated, from {', '.join(compiled_optimizers())}")
    ap.add_argument("--model", default="gpt2-small", help="model preset whose parameters step")
    ap.add_argument("--shapes", help="instead of --model: one param group of these shapes, "
                                     "e.g. 768x3072,3072")
    ap.add_argument("--whole-tensor-sums", action="store_true",
                    help="lower the kernels with whole-tensor telemetry sums, as they were "
                         "written before row-first sums (for comparison)")
    bench_optim.add_inductor_config_argument(ap, "while lowering")
    ap.add_argument("--dump", type=Path,
                    help="write each generated wrapper (kernels included) here")
    args = ap.parse_args(argv)
    try:
        import triton
    except ImportError:
        raise SystemExit("cuda_kernels.py needs the triton package to generate code: "
                         "pip install triton (no GPU needed)")
    names = [o for o in args.optimizers.split(",") if o]
    for name in names:
        if name not in compiled_optimizers():
            raise SystemExit(f"--optimizers: {name!r} has no fused step of ours; choose from "
                             f"{', '.join(compiled_optimizers())}")
    print(f"torch {torch.__version__}, triton {triton.__version__}; code generated for a "
          "pretended H100, not run")
    width = max(12, len(args.shapes or args.model))
    print(f"{'optimizer':10} {'parameters':{width}} {'tensors':>7} {'chunks':>6} {'launches':>8} "
          f"{'bytes/param':>11} {'floor':>5} {'vs floor':>8}")
    for name in names:
        r = inspect(name, None if args.shapes else args.model, args.shapes, args.dump,
                    rows_first=not args.whole_tensor_sums,
                    inductor_config=dict(args.inductor_config))
        print(f"{name:10} {r['model']:{width}} {r['tensors']:>7} {r['chunk_calls']:>6} "
              f"{r['launches']:>8} {r['bytes_per_param']:>11.2f} {r['floor']:>5} "
              f"{r['bytes_per_param'] / r['floor']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
