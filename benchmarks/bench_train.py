"""Training throughput per optimizer: tokens/s, MFU, peak memory and a step-time breakdown.

    python -m benchmarks.bench_train --model gpt2-micro --steps 20 --repeats 3        # CPU, offline
    python -m benchmarks.bench_train --model gpt2-small --device cuda --dtype bfloat16 --compile \\
        --batch-tokens 491520 --micro-batch-size 16 --steps 20 --repeats 5 \\
        --optimizers adamw,lion,sophia,sophiah,muon --hessian-micro-batches all,1/8 \\
        --nanogpt-baseline --json results/bench_train_gpt2-small.json

Every optimizer trains its own copy of the same initial model on the same batches (the same step
indices of the same token stream) through the engine's own ``Trainer.train_step``, in this one
process. The optimizers take turns, round-robin with the first one rotating each repeat, so that
drifting machine load hits all of them alike; every reported number is the median over repeats.

Each turn runs two passes of ``--steps`` optimizer steps:

- a clean pass, synchronised only at its ends, gives tokens/s, ms/step and MFU;
- an instrumented pass, synchronised around each phase (optimizer step pre/post hooks, and the
  Hessian refresher's own clock), gives the breakdown: forward+backward (which includes fetching
  the batches and global grad-norm clipping), the optimizer step, and the Hessian estimate
  amortised over the steps (total Hessian time / steps). ``other`` is what is left of the
  instrumented step (zero_grad and Python glue).

tokens/s counts training tokens only; Hessian passes are cost, so a Sophia refresh lowers it.
MFU counts the model FLOPs of the training tokens and of the Hessian passes (as metrics.jsonl
does) against the device's dense peak; it is n/a where the peak is unknown (CPUs).
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from engine.batching import BatchPlan, plan_batches
from benchmarks.common import (command_line, compose_config, config_choices, cpu_threads,
                                 machine_name, prepare_stdlib_corpus, synchronizer, write_json)
from engine.build import DTYPES, autocast_factory, build_model_config, build_trainer, resolve_dtype
from engine.distributed import DistEnv, launched_by_torchrun, resolve_device
from engine.errors import HarnessError
from engine.hessian import HessianRefresher
from engine.optimizers import entries
from engine.trainer import Trainer
from model import GPT
from model.flops import device_peak_flops

MB = 2**20


# ------------------------------------------------------------------------------------ options
def hessian_micro_batches(spec: str, accum: int) -> int | None:
    """Micro-batches feeding the Hessian estimate from a user spec: ``all`` (None: every
    micro-batch of the step, the official choice), a count such as ``2``, or a fraction of the
    step's micro-batches such as ``1/8`` or ``0.25`` (rounded, at least one)."""
    spec = spec.strip()
    if spec == "all":
        return None
    try:
        if "/" in spec or "." in spec:
            frac = Fraction(spec)
            if not 0 < frac <= 1:
                raise ValueError
            return max(1, round(frac * accum))
        count = int(spec)
    except (ValueError, ZeroDivisionError):
        raise HarnessError(
            f"--hessian-micro-batches entry {spec!r} is not 'all', a count like 2 or a fraction "
            f"in (0, 1] like 1/8 or 0.25."
        ) from None
    if not 1 <= count <= accum:
        raise HarnessError(
            f"--hessian-micro-batches={count} must be between 1 and the {accum} micro-batches of a "
            f"step; use a fraction (1/8) or 'all', or change --batch-tokens / --micro-batch-size."
        )
    return count


# ------------------------------------------------------------------------------ contenders
@dataclass
class Contender:
    """One optimizer (and Hessian batch choice) with its own model copy and Trainer."""

    label: str
    name: str
    trainer: Trainer | "NanoGPTLoop"  # anything with train_step(step), step, optimizer, raw_model
    hessian: HessianRefresher | None
    persistent_bytes: int = 0  # parameters + optimizer state: what stays allocated between turns
    clean: list[dict[str, float]] = field(default_factory=list)  # one entry per repeat
    breakdown: list[dict[str, float]] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for st in optimizer.state.values() for v in st.values())


def build_contender(label: str, cfg: DictConfig, env: DistEnv, data_dir: Path,
                    batch_tokens: int, hmb: int | None) -> Contender:
    """A Trainer from the engine's own builder, so what is timed is what train.py runs; every
    contender starts from the same weights (the builder seeds the model with ``cfg.seed``)."""
    settings: dict[str, Any] = {"data": {"source": None, "dir": str(data_dir),
                                         "prepare_if_missing": False},
                                "train": {"global_batch_tokens": batch_tokens}}
    if hmb is not None:
        settings["optimizer"] = {"hessian_micro_batches": hmb}
    trainer = build_trainer(OmegaConf.merge(cfg, settings), tempfile.gettempdir(), env)
    return Contender(label, trainer.optim.name, trainer, trainer.hessian)


class NanoGPTLoop:
    """The reference for the MFU comparison: nanoGPT's ``train.py`` inner loop, written plainly.

    Same model, batches, dtype, compile and grad clip as the engine's AdamW contender, but none of
    the engine's machinery: no LR schedule, no on-device metric counters, no non-finite checks, no
    telemetry. torch's AdamW (fused on CUDA) over nanoGPT's decay rule (every >= 2-D tensor). If
    the engine's AdamW row is not as fast as this one, the engine costs throughput.
    """

    def __init__(self, cfg: DictConfig, env: DistEnv, loader, plan: BatchPlan, vocab: int):
        torch.manual_seed(cfg.seed)
        self.raw_model = GPT(build_model_config(cfg, vocab)).to(env.device)
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = env.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=float(cfg.optimizer.lr), betas=(0.9, 0.95),
                                           fused=fused, foreach=None if fused else True)
        self.dtype = resolve_dtype(cfg.dtype, env.device)
        self.autocast = autocast_factory(self.dtype, env.device)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.dtype == torch.float16)
        self.loader, self.plan, self.grad_clip = loader, plan, float(cfg.train.grad_clip)
        self.step = 0

    def train_step(self, step: int) -> None:
        for micro in range(self.plan.accum_steps):
            x, y = self.loader.get(step, self.plan.row_start(micro, 0), self.plan.micro_batch_size)
            with self.autocast():
                _, loss = self.model(x, y)
                loss = loss / self.plan.accum_steps
            self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------- timing
def _hessian_totals(c: Contender) -> tuple[float, float]:
    return (c.hessian.cost.seconds, c.hessian.cost.flops) if c.hessian else (0.0, 0.0)


def run_steps(c: Contender, steps: int) -> None:
    t = c.trainer
    for _ in range(steps):
        t.train_step(t.step)
        t.step += 1


def clean_pass(c: Contender, steps: int, sync: Callable[[], None]) -> dict[str, float]:
    """Wall-clock of ``steps`` untouched training steps; Hessian FLOPs for MFU."""
    _, flops0 = _hessian_totals(c)
    sync()
    t0 = time.perf_counter()
    run_steps(c, steps)
    sync()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "hessian_flops": _hessian_totals(c)[1] - flops0}


def instrumented_pass(c: Contender, steps: int, sync: Callable[[], None]) -> dict[str, float]:
    """Mean ms per step of each phase, from synchronised timestamps inside ``train_step``.

    The optimizer step is bracketed by step pre/post hooks, which fire inside ``train_step``
    (also under GradScaler and for MuonAdamW); the Hessian refresh starts right after the post
    hook's synchronisation and keeps its own clock (it synchronises at its end on CUDA).
    """
    opt = c.trainer.optimizer
    marks: dict[str, float | None] = {}

    def pre(*_):
        sync()
        marks["opt0"] = time.perf_counter()

    def post(*_):
        sync()
        marks["opt1"] = time.perf_counter()

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    totals = dict.fromkeys(("fwd_bwd", "optim", "hessian", "step"), 0.0)
    try:
        for _ in range(steps):
            marks.update(opt0=None, opt1=None)
            h0, _ = _hessian_totals(c)
            sync()
            t0 = time.perf_counter()
            run_steps(c, 1)
            sync()
            t1 = time.perf_counter()
            hessian = _hessian_totals(c)[0] - h0
            if marks["opt0"] is None or marks["opt1"] is None:  # fp16 step skipped by GradScaler
                marks["opt0"] = marks["opt1"] = t1 - hessian
            totals["fwd_bwd"] += marks["opt0"] - t0
            totals["optim"] += marks["opt1"] - marks["opt0"]
            totals["hessian"] += hessian
            totals["step"] += t1 - t0
    finally:
        for h in handles:
            h.remove()
    ms = {f"{k}_ms": 1e3 * v / steps for k, v in totals.items()}
    ms["other_ms"] = ms["step_ms"] - ms["fwd_bwd_ms"] - ms["optim_ms"] - ms["hessian_ms"]
    return ms


# ------------------------------------------------------------------------------- benchmark
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:7]))
    p.add_argument("--model", default="gpt2-micro",
                   help=f"preset: {', '.join(config_choices('model'))}")
    p.add_argument("--optimizers", default=",".join(entries()),
                   help="comma-separated; muon is skipped with a note if it does not compose")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per optimizer step (default: 4 micro-batches)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--block-size", type=int, default=None, help="default: the model's")
    p.add_argument("--steps", type=int, default=20,
                   help="optimizer steps per timed pass (a multiple of --k)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per optimizer first (default: k, so one Hessian refresh "
                        "and any compilation happen before timing)")
    p.add_argument("--repeats", type=int, default=5, help="round-robin rounds; medians over them")
    p.add_argument("--k", type=int, default=10, help="Hessian refresh interval of sophia/sophiah")
    p.add_argument("--hessian-micro-batches", default="all",
                   help="comma-separated choices, each 'all', a count, or a fraction of the step's "
                        "micro-batches (1/8, 0.25); each Sophia variant runs once per choice")
    p.add_argument("--data", default=None, help="prepared token dir (default: stdlib corpus, "
                                                "prepared once into prepared/stdlib-byte)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--nanogpt-baseline", action="store_true",
                   help="also time a plain nanoGPT-style AdamW loop (needs adamw in --optimizers)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="device peak FLOP/s for MFU (default: looked up for known GPUs)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    for name in ("steps", "repeats", "k", "micro_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be >= 0")
    return args


GPT2_SIZES = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")  # real sizes: GPT-2's vocab


def _overrides(args: argparse.Namespace, optimizer: str, block: int | None) -> list[str]:
    ov = [f"optimizer={optimizer}", f"model={args.model}", f"device={args.device}",
          f"dtype={args.dtype}", f"compile={str(args.compile).lower()}", f"seed={args.seed}",
          f"train.micro_batch_size={args.micro_batch_size}",
          f"train.block_size={block if block else 'null'}"]
    if entries()[optimizer].hessian:
        ov.append(f"optimizer.k={args.k}")
    return ov


def benchmark(args: argparse.Namespace, print_fn: Callable[..., None] = print) -> dict[str, Any]:
    """Build every contender, time them round-robin, and return the results as a dict."""
    from data.bins import read_meta
    from data.loader import TokenLoader

    if launched_by_torchrun():
        raise HarnessError("bench_train.py measures one process on one device; run it with "
                           "plain python, not torchrun.")
    env = DistEnv(0, 0, 1, resolve_device(args.device))
    sync = synchronizer(env.device)
    data_dir = Path(args.data) if args.data else prepare_stdlib_corpus()
    notes: list[str] = []

    wanted = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if args.model not in config_choices("model"):
        raise HarnessError(f"--model={args.model!r} is unknown; choose one of "
                           f"{', '.join(config_choices('model'))}.")
    cfgs: dict[str, DictConfig] = {}
    for name in wanted:
        if name not in config_choices("optimizer"):
            note = (f"optimizer {name!r} skipped: configs/optimizer/{name}.yaml does not exist "
                    f"(choices: {', '.join(config_choices('optimizer'))})")
            notes.append(note)
            print_fn(f"note: {note}")
            continue
        cfgs[name] = compose_config(_overrides(args, name, args.block_size))
    if not cfgs:
        raise HarnessError(f"no optimizer of --optimizers={args.optimizers!r} could be built.")

    any_cfg = next(iter(cfgs.values()))
    vocab = int(read_meta(data_dir)["vocab_size"])
    if args.model in GPT2_SIZES and vocab < 50257:
        note = (f"{data_dir} has a {vocab}-token vocabulary, so {args.model} gets a small "
                f"embedding and LM head: its throughput and MFU are not GPT-2's. For GPT-2 "
                f"numbers prepare GPT-2 tokens (python -m data.prepare stdlib --tokenizer gpt2) "
                f"and pass --data prepared/stdlib-gpt2.")
        notes.append(note)
        print_fn(f"note: {note}")
    model_block = build_model_config(any_cfg, vocab).block_size
    block = args.block_size or model_block
    if block > model_block:
        raise HarnessError(f"--block-size={block} is longer than {args.model}'s block size "
                           f"{model_block}; lower it.")
    batch_tokens = args.batch_tokens or 4 * args.micro_batch_size * block
    plan = plan_batches(batch_tokens, block, args.micro_batch_size, 1)
    k = args.k
    if any(entries()[n].hessian for n in cfgs) and args.steps % k:
        raise HarnessError(
            f"--steps={args.steps} is not a multiple of --k={k}: a timed pass would hold a "
            f"varying number of Hessian refreshes, so their cost would be mis-amortised. Use "
            f"--steps {max(k, args.steps // k * k)} or {(args.steps // k + 1) * k}.")
    warmup = k if args.warmup is None else args.warmup
    loader = TokenLoader(data_dir, "train", block, seed=any_cfg.seed, device=env.device)

    contenders: list[Contender] = []
    for name, cfg in cfgs.items():
        specs = [s for s in args.hessian_micro_batches.split(",") if s.strip()] \
            if entries()[name].hessian else [None]
        for spec in specs:
            hmb = hessian_micro_batches(spec, plan.accum_steps) if spec is not None else None
            label = name if spec is None or len(specs) == 1 else \
                f"{name}[hess {hmb or plan.accum_steps}/{plan.accum_steps}]"
            contenders.append(build_contender(label, cfg, env, data_dir, batch_tokens, hmb))

    if args.nanogpt_baseline:
        if "adamw" not in cfgs:
            raise HarnessError("--nanogpt-baseline compares against the engine's AdamW: add adamw "
                               "to --optimizers.")
        contenders.append(Contender("nanogpt-loop", "nanogpt-loop",
                                    NanoGPTLoop(cfgs["adamw"], env, loader, plan, vocab), None))

    dtype = resolve_dtype(args.dtype, env.device)
    peak_flops = args.peak_flops or device_peak_flops(env.device, dtype)
    raw0 = contenders[0].trainer.raw_model
    flops_per_token = float(raw0.flops_per_token())
    print_fn(f"{args.model}: {raw0.num_params() / 1e6:.2f}M params | {batch_tokens} tokens/step = "
             f"{plan.micro_batch_size} x {block} x {plan.accum_steps} accum | {dtype} on "
             f"{env.device} ({machine_name(env.device)}) | compile={args.compile} | "
             f"{len(contenders)} contenders x {args.repeats} repeats x 2 x {args.steps} steps")

    for c in contenders:  # warmup (and compilation) before any timing; persistent state exists now
        run_steps(c, warmup)
    sync()
    for c in contenders:
        c.persistent_bytes = (tensor_bytes(c.trainer.raw_model.parameters())
                              + optimizer_state_bytes(c.trainer.optimizer))
    for r in range(args.repeats):
        for i in range(len(contenders)):
            c = contenders[(r + i) % len(contenders)]  # rotate who goes first
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(env.device)
            c.clean.append(clean_pass(c, args.steps, sync))
            c.breakdown.append(instrumented_pass(c, args.steps, sync))
            if env.device.type == "cuda":
                others = sum(o.persistent_bytes for o in contenders if o is not c)
                c.peak_bytes.append(torch.cuda.max_memory_allocated(env.device) - others)
        print_fn(f"repeat {r + 1}/{args.repeats} done")

    rows = []
    for c in contenders:
        tps = [args.steps * batch_tokens / p["seconds"] for p in c.clean]
        mfu = ([(args.steps * batch_tokens * flops_per_token + p["hessian_flops"])
                / p["seconds"] / peak_flops for p in c.clean] if peak_flops else None)
        breakdown = {key: statistics.median(b[key] for b in c.breakdown) for key in c.breakdown[0]}
        rows.append({
            "optimizer": c.label, "name": c.name,
            "hessian_micro_batches": (c.hessian.micro_batches if c.hessian else None),
            "hessian_tokens_per_refresh": (c.hessian.tokens_per_refresh if c.hessian else 0),
            "tokens_per_s": statistics.median(tps), "tokens_per_s_repeats": tps,
            "ms_per_step": statistics.median(1e3 * p["seconds"] / args.steps for p in c.clean),
            **breakdown, "breakdown_repeats": c.breakdown,
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_mem_mb": max(c.peak_bytes) / MB if c.peak_bytes else None,
            "state_mb": optimizer_state_bytes(c.trainer.optimizer) / MB,
        })
    base = next((r["tokens_per_s"] for r in rows if r["name"] == "adamw"), None)
    for row in rows:
        row["ratio_vs_adamw"] = row["tokens_per_s"] / base if base else None
    if env.device.type != "cuda":
        notes.append("peak_mem_mb is n/a on CPU: the only measure is the process-wide peak RSS "
                     "(cpu_peak_rss_mb), shared by all optimizers in this process.")

    return {
        "device": str(env.device), "device_name": machine_name(env.device),
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": {"model": args.model, "params": raw0.num_params(), "dtype": str(dtype),
                     "compile": args.compile, "batch_tokens": batch_tokens, "block_size": block,
                     "micro_batch_size": plan.micro_batch_size, "accum_steps": plan.accum_steps,
                     "steps": args.steps, "warmup": warmup, "repeats": args.repeats, "k": k,
                     "threads": torch.get_num_threads(), "data": str(data_dir),
                     "flops_per_token": flops_per_token, "peak_flops": peak_flops},
        "cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows, "notes": notes,
    }


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (printed, and pasted into docs/benchmarks.md)."""
    head = ["optimizer", "tokens/s", "vs adamw", "ms/step", "fwd+bwd ms", "optim ms",
            "hessian ms (amort.)", "other ms", "MFU", "peak mem MB", "state MB"]

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["optimizer"], num(r["tokens_per_s"], ",.0f"), num(r["ratio_vs_adamw"], ".3f"),
                 num(r["ms_per_step"], ".2f"), num(r["fwd_bwd_ms"], ".2f"),
                 num(r["optim_ms"], ".2f"), num(r["hessian_ms"], ".2f"), num(r["other_ms"], ".2f"),
                 num(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""),
                 num(r["peak_mem_mb"], ".0f"), num(r["state_mb"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a message for bad settings)."""
    from data.errors import DataError

    args = parse_args(argv)
    try:
        with cpu_threads(args.threads):
            result = benchmark(args)
    except (HarnessError, DataError) as err:
        print(f"\nerror: {err}\n", file=sys.stderr, flush=True)
        return 2
    result["command"] = command_line("bench_train", argv)
    print()
    print(format_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
