"""Optimizer step cost: ms per step and effective memory bandwidth, per optimizer and code path.

    python -m benchmarks.bench_optim --model gpt2-small --device cpu --repeats 5 \\
        --json bench_optim_cpu.json
    python -m benchmarks.bench_optim --model gpt2-small,gpt2-medium --device cuda --repeats 50 \\
        --json bench_optim_cuda.json
    python -m benchmarks.bench_optim --shapes 768x768,768 --device cpu        # any parameter set
    python -m benchmarks.bench_optim --inductor-config combo_kernels=True ...  # a compiler setting
    python -m benchmarks.bench_optim --noise-check ...  # how far apart two equal steps look here

An elementwise optimizer step is memory-bound: per fp32 parameter AdamW must read p, g, m, v and
write p, m, v (28 bytes), SophiaG reads p, g, m, h and writes p, m (24 B), Lion reads p, g, m and
writes p, m (20 B). So each row reports the time of one `optimizer.step()` and the effective
bandwidth `bytes_floor / time`, next to the device's measured copy bandwidth
(`dst.copy_(src)` of a large tensor: 2 * bytes / time), whose fraction says how close the path
comes to the memory floor. A path that makes several passes over memory shows up as a small
fraction.

The parameter set is the model's: `model.GPT` is built on the meta device, grouped by the
harness's weight-decay rule (linear weights decay, the rest do not: two param groups, as in
training), and only its parameter tensors (plus a gradient for each) are materialised, in fp32.
Every contender steps the same tensors; contenders take turns round-robin, the first one
rotating each repeat, so drifting machine load hits them alike. A repeat times `--steps` steps
between device synchronisations; the reported time is the median over `--repeats` after
`--warmup` steps (which include torch.compile for fused paths: `first_step_s` records that).
`host_ms_per_step` is the part of it until the last `step()` returned, before synchronising: on
a GPU, where kernels run asynchronously, a step whose host time comes close to its whole time
is bound by Python, dynamo's guards and kernel launches rather than by memory (a column of the
table on CUDA; on a CPU the two are the same).
Sophia's Hessian is filled with positive values first so its clipping is not trivial; the step
timed is `step()` alone (Hessian refreshes are every k steps and cost a backward pass, which
`benchmarks/bench_train.py` measures).

How far apart two equal steps look in one run depends on the machine: on a shared VM the same
step can run at quite different speeds over different tensors of the same sizes (most likely
because of where they lie in physical memory). `--noise-check` measures that spread directly:
a second torch fused AdamW, the same step over the same parameters with state tensors of its
own, joins the round-robin as row `adamw fused-twin`, and its `vs AdamW fused` would be
exactly 1.00x without noise. A ratio between other contenders means something only beyond
that spread, and only what repeats over several processes.

Byte counts assume a read and a write cost the same, which is not true everywhere: on some CPUs
writing back a line the same loop has just read costs far less than reading one more stream
(docs/benchmarks.md). `--access-floor` therefore also times, in the same round-robin, a
compiled one-pass kernel with each optimizer's *access pattern* and almost no arithmetic
(AdamW: 4 tensors read, 3 of them written in place; SophiaG/SophiaH: 4 read, 2 written; Lion:
3 read, 2 written) on flat tensors of up to 2^26 elements, scaled to the model's parameter
count. Its row `floor` is what the device's memory system allows for that pattern, and
`vs floor` says how close each step comes to it.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import fnmatch
import gc
import inspect
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from benchmarks.common import command_line, cpu_threads, machine_name, synchronizer, write_json
from model import GPT, GPTConfig
from model.param_groups import MUON_INCLUDE, weight_decay_groups
from engine.optimizers import (PATHS, OptimizerEntry, default_groups, entries, optimizer_defaults,
                               path_config)

FLOOR_MAX_NUMEL = 2**26
# path label of --noise-check's second torch fused AdamW
TWIN_PATH = "fused-twin"


def benchmarked() -> dict[str, OptimizerEntry]:
    """The registered optimizers with a code path to time, by config name."""
    return {name: e for name, e in entries().items() if e.paths}


def bytes_floor(optimizer: str) -> int | None:
    """Bytes an ideal single-pass step moves per fp32 parameter (reads + writes), from the
    registry's access pattern; None for a step that is not elementwise (Muon's matmuls)."""
    access = entries()[optimizer].access
    return 4 * sum(access) if access else None


@dataclass
class Contender:
    optimizer: str
    path: str
    step: Callable[[], None]
    times: list[float]
    first_step_s: float = 0.0
    host_times: list[float] = field(default_factory=list)  # until step() returned, before sync
    scale: float = 1.0  # times are multiplied by this (access floors run on a sample)
    pattern: tuple[int, int] | None = None  # (reads, writes) of an access-floor contender


def _access_kernel(tensors: list[torch.Tensor], writes: int) -> None:
    # Reads every tensor once and writes the first `writes` back in place, in one loop; the
    # halving keeps the values bounded over many calls.
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    for t in tensors[:writes]:
        t.mul_(0.5).add_(total, alpha=0.5 / len(tensors))


def access_floor(reads: int, writes: int, n_params: int, device: torch.device) -> Contender:
    """A contender timing the (reads, writes) pattern on flat tensors of up to FLOOR_MAX_NUMEL
    elements, its times scaled to `n_params` coordinates."""
    numel = min(n_params, FLOOR_MAX_NUMEL)
    gen = torch.Generator(device=device).manual_seed(2)
    tensors = [torch.rand(numel, device=device, generator=gen) for _ in range(reads)]
    kernel = torch.compile(_access_kernel, fullgraph=True, dynamic=False)
    return Contender("floor", f"{reads}R/{writes}W", lambda: kernel(tensors, writes), [],
                     scale=n_params / numel, pattern=(reads, writes))


# ----------------------------------------------------------------------------- parameter sets
def param_shapes(model: str) -> list[list[torch.Size]]:
    """The parameter shapes of a model preset, as the harness groups them (decay, no decay)."""
    with torch.device("meta"):
        gpt = GPT(GPTConfig.from_preset(model))
    return [[p.shape for p in g["params"]] for g in weight_decay_groups(gpt, 0.1)]


def muon_owned(model: str | None) -> list[list[bool]]:
    """Per tensor of :func:`param_shapes`, whether Muon's side owns it in training (the hidden
    matrices of the transformer blocks); with --shapes, every 2-D tensor."""
    if model is None:
        return []
    with torch.device("meta"):
        gpt = GPT(GPTConfig.from_preset(model))
    names = {id(p): n for n, p in gpt.named_parameters()}
    return [[p.dim() == 2 and any(fnmatch.fnmatch(names[id(p)], pat) for pat in MUON_INCLUDE)
             for p in g["params"]] for g in weight_decay_groups(gpt, 0.1)]


def parse_shapes(spec: str) -> list[list[torch.Size]]:
    """`--shapes 768x768,768`: one param group of tensors with these shapes."""
    try:
        return [[torch.Size(int(d) for d in s.split("x")) for s in spec.split(",") if s]]
    except ValueError:
        raise SystemExit(f"--shapes {spec!r}: expected comma-separated shapes such as 64x32,32")


def materialise(groups: list[list[torch.Size]], device: torch.device,
                seed: int = 0) -> list[list[torch.nn.Parameter]]:
    """fp32 parameters of these shapes on ``device``, each with a random gradient."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for shapes in groups:
        params = []
        for s in shapes:
            p = torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02)
            p.grad = torch.randn(s, device=device, generator=gen) * 1e-3
            params.append(p)
        out.append(params)
    return out


# -------------------------------------------------------------------------------- optimizers
def build(optimizer: str, path: str, groups: list[list[torch.nn.Parameter]],
          owned: list[list[bool]] | None = None) -> torch.optim.Optimizer:
    """``optimizer`` on code path ``path`` over ``groups`` (the first decays), built by its
    registry entry from its yaml defaults, as training builds it; a Hessian-preconditioned
    optimizer's state is pre-filled so its first step is a typical one. ``owned`` marks the
    tensors Muon's side takes (the rest go to its AdamW side)."""
    entry = entries()[optimizer]
    cfg = {**optimizer_defaults(optimizer), **path_config(entry, path)}
    pg = [{"params": ps, "weight_decay": 0.1 if i == 0 else 0.0} for i, ps in enumerate(groups)]
    if entry.groups is not default_groups:  # Muon: its own group of the matrices it owns
        flags = owned or [[p.dim() == 2 for p in ps] for ps in groups]
        muon = [p for ps, fs in zip(groups, flags) for p, f in zip(ps, fs) if f]
        rest = [{"params": [p for p, f in zip(ps, fs) if not f], "weight_decay": 0.0}
                for ps, fs in zip(groups, flags)]
        pg = [{"params": muon, "muon": True}] + [g for g in rest if g["params"]]
    opt = entry.make(pg, cfg)
    if entry.hessian is not None:
        gen = torch.Generator(device=groups[0][0].device).manual_seed(1)
        for ps in groups:  # a plausible h (GNB estimates are squares of small gradients)
            for p in ps:
                opt.state[p]["hessian"] = torch.rand(p.shape, device=p.device, generator=gen) * 1e-8
                opt.state[p]["exp_avg"] = torch.zeros_like(p)
                opt.state[p]["step"] = torch.tensor(0.0)
    return opt


def step_kwargs(opt: torch.optim.Optimizer) -> dict:
    """What training passes to ``step()``: SophiaG's GNB batch size (the paper's 480 sequences
    of 1024 tokens)."""
    return {"bs": 480 * 1024} if "bs" in inspect.signature(opt.step).parameters else {}


def _step(opt: torch.optim.Optimizer, kwargs: dict) -> None:
    opt.step(**kwargs)
    telemetry = getattr(opt, "telemetry", None)
    if telemetry is not None:
        telemetry()  # 0-d tensors, no host sync: their cost is in the device time


def copy_bandwidth(device: torch.device, mb: int, repeats: int, sync: Callable[[], None]) -> float:
    """GB/s of `dst.copy_(src)`: 2 * bytes (one read, one write) over the median time."""
    n = mb * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(max(repeats, 3)):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------------- running
def bench_model(name: str, groups_shapes: list[list[torch.Size]], args: argparse.Namespace,
                device: torch.device, sync: Callable[[], None], copy_gbps: float,
                owned: list[list[bool]] | None = None) -> dict:
    """Time every (optimizer, path) contender on one parameter set; its row per contender.

    Each step includes what training reads after it: the optimizer's telemetry (Sophia's clip
    fraction and norms, the update RMS), computed in the same pass where the path allows."""
    groups = materialise(groups_shapes, device)
    n_params = sum(p.numel() for ps in groups for p in ps)
    contenders = []
    for optimizer in args.optimizers:
        for path in entries()[optimizer].paths:
            if path not in args.paths:
                continue
            opt = build(optimizer, path, groups, owned)
            kw = step_kwargs(opt)
            contenders.append(Contender(optimizer, path, lambda o=opt, kw=kw: _step(o, kw), []))
            if args.noise_check and (optimizer, path) == ("adamw", "fused"):
                twin = build(optimizer, path, groups, owned)
                contenders.append(Contender(optimizer, TWIN_PATH, lambda o=twin: _step(o, {}), []))
    wanted = {entries()[o].access for o in args.optimizers if entries()[o].access}
    # (reads, writes) -> the contender timing that access pattern alone
    patterns = {p: access_floor(*p, n_params, device) for p in sorted(wanted)
                if args.access_floor}
    contenders += patterns.values()

    for c in contenders:  # warmup; the first step of a fused path compiles
        for i in range(args.warmup):
            sync()
            t0 = time.perf_counter()
            c.step()
            sync()
            if i == 0:
                c.first_step_s = (time.perf_counter() - t0) * c.scale
    for r in range(args.repeats):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                c.step()
            t_host = time.perf_counter()
            sync()
            c.times.append((time.perf_counter() - t0) / args.steps * c.scale)
            c.host_times.append((t_host - t0) / args.steps * c.scale)

    rows = []
    floor_ms = {p: statistics.median(c.times) * 1e3 for p, c in patterns.items()}
    for c in contenders:
        sec = statistics.median(c.times)
        if c.pattern:
            floor, pattern_ms = 4 * sum(c.pattern), sec * 1e3
        else:
            floor = bytes_floor(c.optimizer)
            pattern_ms = floor_ms.get(entries()[c.optimizer].access)
        nbytes = floor * n_params if floor else None
        rows.append({
            "optimizer": c.optimizer, "path": c.path,
            "ms_per_step": sec * 1e3, "ms_min": min(c.times) * 1e3,
            "host_ms_per_step": statistics.median(c.host_times) * 1e3,
            "first_step_s": c.first_step_s,
            "bytes_per_step": nbytes, "gbps": nbytes / sec / 1e9 if nbytes else None,
            "copy_fraction": nbytes / sec / 1e9 / copy_gbps if nbytes else None,
            "floor_ms": pattern_ms,
            "vs_floor": sec * 1e3 / pattern_ms if pattern_ms else None,
        })
    base = {r["path"]: r["ms_per_step"] for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        for path in ("foreach", "fused"):
            r[f"vs_adamw_{path}"] = r["ms_per_step"] / base[path] if path in base else None
    del contenders, groups, patterns
    gc.collect()
    return {"name": name, "params": n_params, "tensors": sum(len(g) for g in groups_shapes),
            "rows": rows}


def print_table(result: dict) -> None:
    """Print the results, one table per parameter set."""
    print(f"device: {result['device']} ({result['device_type']}, {result['threads']} threads), "
          f"torch {result['torch']}, copy bandwidth {result['copy_gbps']:.1f} GB/s")
    host = result["device_type"] == "cuda"  # on a CPU host time is the step time
    head = (f"{'optimizer':<9} {'path':<10} {'ms/step':>9} {'GB/s eff':>9} {'of copy':>8} "
            f"{'vs AdamW foreach':>17} {'vs AdamW fused':>15} {'vs floor':>9} "
            f"{'first step s':>13}" + (f" {'host ms':>8}" if host else ""))
    for model in result["models"]:
        print(f"\n{model['name']}: {model['params'] / 1e6:.2f}M parameters in "
              f"{model['tensors']} tensors")
        print(head)
        for r in model["rows"]:
            ratios = [f"{r[k]:.2f}x" if r[k] is not None else "n/a"
                      for k in ("vs_adamw_foreach", "vs_adamw_fused")]
            gbps = f"{r['gbps']:>9.2f} {r['copy_fraction']:>7.0%}" if r["gbps"] else \
                f"{'n/a':>9} {'n/a':>8}"
            vs_floor = f"{r['vs_floor']:.2f}x" if r.get("vs_floor") else "n/a"
            print(f"{r['optimizer']:<9} {r['path']:<10} {r['ms_per_step']:>9.2f} {gbps} "
                  f"{ratios[0]:>17} {ratios[1]:>15} {vs_floor:>9} {r['first_step_s']:>13.2f}"
                  + (f" {r['host_ms_per_step']:>8.2f}" if host else ""))


def inductor_setting(text: str) -> tuple[str, object]:
    """argparse type of --inductor-config: "KEY=VALUE" as (key, value), the value read as a
    Python literal (else kept as a string), KEY an option of torch._inductor.config."""
    from torch._inductor import config

    key, sep, value = text.partition("=")
    if not sep or not hasattr(config, key):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KEY=VALUE with KEY an option of torch._inductor.config "
            "(e.g. combo_kernels=True)")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_inductor_config_argument(ap: argparse.ArgumentParser, during: str) -> None:
    """--inductor-config KEY=VALUE (repeatable); the parsed value is a list of (key, value)."""
    ap.add_argument("--inductor-config", action="append", default=[], type=inductor_setting,
                    metavar="KEY=VALUE",
                    help=f"set a torch._inductor.config option {during} (repeatable), e.g. "
                         "combo_kernels=True")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``), checked."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small",
                    help="comma-separated model presets (gpt2-nano, gpt2-micro, gpt2-small, "
                         "gpt2-medium, ...) whose parameter sets are benchmarked")
    ap.add_argument("--shapes", default=None,
                    help="instead of --model: one param group of these shapes, e.g. 64x32,32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--optimizers", default="adamw,lion,sophia",
                    help=f"comma-separated, from {', '.join(benchmarked())}")
    ap.add_argument("--paths", default="reference,foreach,fused")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per contender (>= 1)")
    ap.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    ap.add_argument("--copy-mb", type=int, default=1024, help="tensor size of the copy test")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--access-floor", action="store_true",
                    help="also time each optimizer's memory access pattern alone (rows 'floor', "
                         "column 'vs floor'; see the module docstring)")
    ap.add_argument("--noise-check", action="store_true",
                    help="also time a second torch fused AdamW, identical to the first but for "
                         f"its own state tensors (row 'adamw {TWIN_PATH}'): its 'vs AdamW fused' "
                         "is what this run's noise makes of two equal steps (needs adamw and the "
                         "fused path)")
    add_inductor_config_argument(ap, "while benchmarking, to try compiler settings on the "
                                     "fused steps")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    args.inductor_config = dict(args.inductor_config)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [o for o in args.optimizers if o not in benchmarked()]
    if bad:
        ap.error(f"unknown optimizer(s) {bad}; choose from {', '.join(benchmarked())}")
    bad = [p for p in args.paths if p not in PATHS]
    if bad:
        ap.error(f"unknown path(s) {bad}; choose from {', '.join(PATHS)}")
    if args.noise_check and not ("adamw" in args.optimizers and "fused" in args.paths):
        ap.error("--noise-check compares two torch fused AdamW steps: add adamw to --optimizers "
                 "and fused to --paths")
    if args.repeats < 1 or args.warmup < 1 or args.steps < 1:
        ap.error("--repeats, --warmup and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu")
    sync = synchronizer(device)
    from torch._inductor import config as inductor_config

    with cpu_threads(args.threads), inductor_config.patch(args.inductor_config):
        copy_gbps = copy_bandwidth(device, args.copy_mb, args.repeats, sync)
        if args.shapes:
            sets = [("custom " + args.shapes, parse_shapes(args.shapes))]
        else:
            names = [m.strip() for m in args.model.split(",") if m.strip()]
            sets = [(m, param_shapes(m)) for m in names]
        models = [bench_model(name, shapes, args, device, sync, copy_gbps,
                              muon_owned(None if args.shapes else name)) for name, shapes in sets]
        result = {
            "device": machine_name(device), "device_type": device.type,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line("bench_optim", argv),
            "repeats": args.repeats, "warmup": args.warmup, "steps": args.steps,
            "copy_mb": args.copy_mb, "copy_gbps": copy_gbps, "bytes_floor": {o: bytes_floor(o) for o in args.optimizers},
            "inductor_config": args.inductor_config,
            "models": models,
        }
    print_table(result)
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
