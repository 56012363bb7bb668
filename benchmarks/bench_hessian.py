"""The cost of a GNB Hessian estimate: the sampled-label loss itself, and how many micro-batches.

    python -m benchmarks.bench_hessian                     # CPU, offline, a few minutes
    python -m benchmarks.bench_hessian --device cuda --dtype bfloat16 --batch 16 --seq 1024 \\
        --model gpt2-small --mb-rows 16 --mb-seq 1024 --train-steps 200 \\
        --json results/bench_hessian_h100.json

Part 1, ``loss``: forward + backward of ``gnb_loss`` on random logits [B, T, V] (default
V = 50304, GPT-2's padded vocab), for

- ``legacy``: the implementation before the fused path (float32 softmax, ``torch.multinomial``,
  ``F.cross_entropy`` on a float32 copy), kept here for comparison only;
- ``reference``: ``gnb_loss(fused=False)`` (chunked inverse-CDF sampling, then ``F.cross_entropy``
  on a float32 copy);
- ``fused``: ``gnb_loss()``, the default (one chunked custom autograd function, recomputing the
  probabilities in backward);
- ``fused-saved-p``: the same, but saving the probabilities in the logits' dtype for backward
  instead of recomputing them: the alternative the fused design rejected, measured here.

Time is the median over ``--repeats`` (after one warm-up). Peak memory is the extra memory of the
call above the logits themselves (the logits' gradient, which every variant returns, included):
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of the peak resident set size of a
fresh subprocess per variant (a coarse number: the allocator and page granularity show through).

Part 2, ``micro_batches``: how good is one GNB estimate (no EMA) made from m micro-batches?
A small GPT (default gpt2-nano on the byte-tokenized stdlib corpus, briefly trained so its
predictions are not uniform) gets the sampled-label gradient g_j of each of many micro-batches.
From those, the estimators of ``optimizer.hessian_estimator`` (``--estimators``, default both):

- ``gnb`` (the official estimate, the default): one loss averaged over the m micro-batches,
  h = (m * tokens) * (mean_j g_j)^2;
- ``gnb_msq`` (same passes and FLOPs): the mean of per-micro-batch squares,
  h = mean_j (tokens * g_j^2);
- the reference: gnb_msq over ``--ref-micro-batches`` (default 64) other micro-batches,
  an unbiased estimate of E[h] = the Gauss-Newton diagonal of the mean loss.

Both estimators are computed from the same g_j in each trial (a paired comparison), with the
formulas the engine uses (``engine/hessian.py``; tests/test_gnb_msq.py checks the engine's).

Reported per m, averaged over ``--trials`` independent draws: the relative L2 error
||h - h_ref|| / ||h_ref||, the same with the reference's own sampling noise removed
(sqrt(err^2 - noise^2), noise estimated from the spread of the reference's terms), the relative
error of the L1 norm (the ``hessian/l1`` telemetry), and the cost: Hessian-pass tokens and their
FLOPs relative to using all ``--accum`` micro-batches of a step (the official choice), and as a
share of training FLOPs for a refresh every ``--k`` steps.
"""
from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.common import (STDLIB_CORPUS, command_line, cpu_threads, machine_name,
                                 prepare_stdlib_corpus, synchronizer, write_json)
from engine.build import DTYPES
from sophia.hessian import _chunk_rows, _draw_rows, _uniforms, gnb_loss

VARIANTS = ("legacy", "reference", "fused", "fused-saved-p")
# Part 2's estimators, named as optimizer.hessian_estimator names them.
ESTIMATORS = ("gnb", "gnb_msq")


# ------------------------------------------------------------------------------ part 1: loss
def _legacy_gnb_loss(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The implementation before the fused path, verbatim in substance."""
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float().reshape(-1, logits.size(-1)), dim=-1)
        labels = torch.multinomial(probs, num_samples=1, generator=generator).view(-1)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels)


class _SavedProbsCE(torch.autograd.Function):
    """The fused function, but saving p in the logits' dtype instead of recomputing it."""

    @staticmethod
    def forward(ctx, logits, u):
        n, vocab = logits.shape
        step = _chunk_rows(n, vocab, logits.device, None)
        probs = torch.empty_like(logits)
        labels = torch.empty(n, dtype=torch.int64, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for r in range(0, n, step):
            rows = slice(r, r + step)
            labels[rows], lse[rows] = _draw_rows(logits[rows], u[rows])
            probs[rows] = torch.sub(logits[rows], lse[rows, None]).exp_()
        ctx.save_for_backward(probs, labels)
        return (lse - logits.gather(1, labels[:, None]).squeeze(1).float()).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        probs, labels = ctx.saved_tensors
        scale = (grad_loss.float() / probs.size(0)).to(probs.dtype)
        grad = probs * scale
        grad.scatter_add_(1, labels[:, None], (-scale).expand(labels.size(0), 1).contiguous())
        return grad, None


def _loss_fn(variant: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    if variant == "legacy":
        return _legacy_gnb_loss
    if variant == "reference":
        return lambda x, g: gnb_loss(x, g, fused=False)
    if variant == "fused":
        return lambda x, g: gnb_loss(x, g)
    if variant == "fused-saved-p":
        def saved(x, g):
            flat = x.reshape(-1, x.size(-1))
            return _SavedProbsCE.apply(flat, _uniforms(flat.size(0), flat.device, g))
        return saved
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _make_logits(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    # spread like a trained LM's logits: a few likely tokens and a long tail
    x = torch.randn(shape, generator=gen, device=device) * 3.0
    return x.to(dtype).requires_grad_()


def _fwd_bwd(fn, logits, device) -> None:
    loss = fn(logits, torch.Generator(device=device).manual_seed(1))
    loss.backward()
    logits.grad = None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_probe(variant: str, shape: tuple[int, ...], dtype_name: str, threads: int) -> int | None:
    """Peak-RSS growth (bytes) of one call, in a fresh process (CPU memory measurement).

    Linux only: the peak (VmHWM) is reset through /proc/self/clear_refs right before the call, so
    the transient peaks of importing torch do not hide the call's own.
    """
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    logits = _make_logits(shape, DTYPES[dtype_name], device)
    fn = _loss_fn(variant)
    _fwd_bwd(fn, _make_logits((2, 8, shape[-1]), DTYPES[dtype_name], device), device)  # lazy init
    try:
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, KeyError):
        return None
    _fwd_bwd(fn, logits, device)
    return (_status_kib("VmHWM") - before) * 1024


def bench_loss(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Part 1: time and peak extra memory of each loss variant's forward + backward."""
    shape = (args.batch, args.seq, args.vocab)
    dtype = DTYPES[args.dtype]
    logits = _make_logits(shape, dtype, device)
    n_bytes = logits.numel() * logits.element_size()
    sync = synchronizer(device)
    rows = []
    for variant in args.variants:
        fn = _loss_fn(variant)
        _fwd_bwd(fn, logits, device)  # warm-up
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            _fwd_bwd(fn, logits, device)
            sync()
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _fwd_bwd(fn, logits, device)
            peak = torch.cuda.max_memory_allocated(device) - base
            how = "cuda max_memory_allocated"
        elif args.cpu_memory:
            with mp.get_context("spawn").Pool(1) as pool:
                peak = pool.apply(_rss_probe, (variant, shape, args.dtype, torch.get_num_threads()))
            how = "peak RSS growth (VmHWM), fresh process"
        else:
            peak, how = None, "n/a"
        rows.append({"variant": variant, "ms": 1e3 * statistics.median(times),
                     "ms_all": [1e3 * t for t in times], "peak_extra_bytes": peak,
                     "peak_extra_over_logits": None if peak is None else peak / n_bytes,
                     "memory_measure": how})
    return rows


# ------------------------------------------------------------------------ part 2: micro-batches
def _batches(args, device: torch.device):
    """Endless (x, y) micro-batches, and the vocab they need: random tokens or a prepared corpus."""
    if args.data == "random":
        gen = torch.Generator().manual_seed(args.seed)
        vocab = 257

        def draw(i):
            x = torch.randint(0, vocab, (args.mb_rows, args.mb_seq + 1), generator=gen)
            return x[:, :-1], x[:, 1:]
    else:
        from data.loader import TokenLoader

        data_dir = Path(args.data) if args.data else prepare_stdlib_corpus()
        loader = TokenLoader(data_dir, "train", block_size=args.mb_seq, seed=args.seed)
        vocab = loader.vocab_size

        def draw(i):
            return loader.get(i, 0, args.mb_rows)

    def gen_batches():
        i = 0
        while True:
            x, y = draw(i)
            i += 1
            yield x.to(device), y.to(device)

    return gen_batches(), vocab


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def bench_micro_batches(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Part 2: the error of one GNB estimate from m micro-batches against a reference."""
    from model import GPT, GPTConfig

    torch.manual_seed(args.seed)
    batches, vocab = _batches(args, device)
    cfg = GPTConfig.from_preset(args.model, vocab_size=vocab, block_size=args.mb_seq)
    model = GPT(cfg).to(device)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype],
                              enabled=args.dtype != "float32")
    if args.train_steps:  # predictions of an untrained model are uniform: not a fair test
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(args.train_steps):
            x, y = next(batches)
            with autocast:
                _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        train_loss = loss.item()
    else:
        train_loss = None

    tokens_per_mb = args.mb_rows * args.mb_seq
    label_gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    def sampled_grad() -> torch.Tensor:
        """g_j: the gradient of one micro-batch's mean sampled-label loss."""
        x, _ = next(batches)
        model.zero_grad(set_to_none=True)
        with autocast:
            logits, _ = model(x)
        gnb_loss(logits, generator=label_gen).backward()
        return _flat_grad(model)

    t0 = time.perf_counter()
    # running sums rather than stacked gradients: GPT-2-sized models on a GPU must fit
    M = args.ref_micro_batches
    s1 = s2 = 0.0
    for _ in range(M):
        term = tokens_per_mb * sampled_grad() ** 2
        s1, s2 = s1 + term, s2 + term**2
    h_ref = s1 / M
    ref_norm = h_ref.norm()
    # the reference's own error: its terms are i.i.d., so E||h_ref - E h||^2 = sum(var) / M
    var_sum = float(((s2 - s1**2 / M) / (M - 1)).clamp(min=0).sum())
    ref_noise = math.sqrt(var_sum / M) / float(ref_norm)
    del s1, s2
    results = []
    for m in args.micro_batches:
        errs: dict[str, list[float]] = {name: [] for name in args.estimators}
        l1_errs: dict[str, list[float]] = {name: [] for name in args.estimators}
        for _ in range(args.trials):
            g_sum = sq_sum = 0.0
            for _ in range(m):
                g = sampled_grad()
                g_sum, sq_sum = g_sum + g, sq_sum + g**2
            for name in args.estimators:
                if name == "gnb":  # bs * g^2 for the loss averaged over all m micro-batches
                    h = (m * tokens_per_mb) * (g_sum / m) ** 2
                else:  # gnb_msq: mean_j (tokens * g_j^2)
                    h = tokens_per_mb * sq_sum / m
                errs[name].append(float((h - h_ref).norm() / ref_norm))
                l1_errs[name].append(abs(float(h.sum() / h_ref.sum()) - 1))
        for name in errs:
            err = statistics.fmean(errs[name])
            results.append({
                "estimator": name, "micro_batches": m, "tokens": m * tokens_per_mb,
                "rel_l2_err": err,
                "rel_l2_err_denoised": math.sqrt(max(err**2 - ref_noise**2, 0.0)),
                "rel_l2_err_std": statistics.pstdev(errs[name]),
                "rel_l1_norm_err": statistics.fmean(l1_errs[name]),
                "cost_vs_all": m / args.accum,
                "overhead_vs_training": m / (args.k * args.accum),
            })
    return {
        "model": args.model, "params": model.num_params(non_embedding=False), "vocab": vocab,
        "data": str(args.data or STDLIB_CORPUS),
        "train_steps": args.train_steps, "train_loss": train_loss,
        "tokens_per_micro_batch": tokens_per_mb, "accum": args.accum, "k": args.k,
        "ref_micro_batches": args.ref_micro_batches, "ref_noise": ref_noise,
        "trials": args.trials, "seconds": time.perf_counter() - t0,
        "flops_per_token": model.flops_per_token(), "rows": results,
    }


# ------------------------------------------------------------------------------ reporting
def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def print_tables(result: dict[str, Any]) -> None:
    """Print a table for each part that ran."""
    if result.get("loss"):
        meta = result["loss_shape"]
        print(f"\nGNB loss forward+backward, logits {meta} {result['args']['dtype']} "
              f"({_fmt_bytes(math.prod(meta) * DTYPES[result['args']['dtype']].itemsize)}), "
              f"{result['device']}")
        print(f"{'variant':<15}{'ms (median)':>12}{'peak extra':>12}{'x logits':>10}")
        for r in result["loss"]:
            over = r["peak_extra_over_logits"]
            ratio = "n/a" if over is None else f"{over:.2f}"
            print(f"{r['variant']:<15}{r['ms']:>12.1f}{_fmt_bytes(r['peak_extra_bytes']):>12}"
                  f"{ratio:>10}")
    mb = result.get("micro_batches")
    if mb:
        print(f"\nOne GNB estimate from m micro-batches of {mb['tokens_per_micro_batch']} tokens "
              f"({mb['model']}, {mb['params']} params, data {mb['data']}, trained "
              f"{mb['train_steps']} steps); reference: {mb['ref_micro_batches']} micro-batches, "
              f"own noise {mb['ref_noise']:.3f}; {mb['trials']} trials")
        print(f"{'estimator':<10}{'m':>3}{'rel L2 err':>12}{'denoised':>10}{'L1 norm err':>13}"
              f"{'cost vs all':>13}{'overhead @k':>13}")
        for r in mb["rows"]:
            print(f"{r['estimator']:<10}{r['micro_batches']:>3}{r['rel_l2_err']:>12.3f}"
                  f"{r['rel_l2_err_denoised']:>10.3f}{r['rel_l1_norm_err']:>13.3f}"
                  f"{r['cost_vs_all']:>13.3f}{100 * r['overhead_vs_training']:>12.2f}%")
        print(f"(cost vs all: Hessian-pass FLOPs relative to all {mb['accum']} micro-batches of a "
              f"step; overhead: share of training FLOPs with a refresh every k={mb['k']} steps)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``), checked."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="loss,micro_batches", help="which parts to run")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="logits dtype of part 1; autocast dtype of part 2")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("part 1: the loss")
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--seq", type=int, default=128)
    g.add_argument("--vocab", type=int, default=50304)
    g.add_argument("--variants", default=",".join(VARIANTS))
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--no-cpu-memory", dest="cpu_memory", action="store_false",
                   help="skip the subprocess peak-RSS measurement on CPU")
    g = p.add_argument_group("part 2: micro-batches per estimate")
    g.add_argument("--model", default="gpt2-nano")
    g.add_argument("--data", default=None,
                   help="prepared token dir, or 'random' (default: stdlib corpus, byte tokenizer, "
                        "prepared once into prepared/stdlib-byte)")
    g.add_argument("--mb-rows", type=int, default=8, help="rows per micro-batch")
    g.add_argument("--mb-seq", type=int, default=64, help="tokens per row")
    g.add_argument("--train-steps", type=int, default=300, help="AdamW steps before measuring")
    g.add_argument("--micro-batches", default="1,2,4,8")
    g.add_argument("--estimators", default=",".join(ESTIMATORS),
                   help=f"optimizer.hessian_estimator values to measure ({', '.join(ESTIMATORS)})")
    g.add_argument("--ref-micro-batches", type=int, default=64)
    g.add_argument("--trials", type=int, default=16)
    g.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step")
    g.add_argument("--k", type=int, default=10, help="Hessian refresh interval")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    args.variants = [s for s in args.variants.split(",") if s]
    args.micro_batches = [int(s) for s in args.micro_batches.split(",") if s]
    args.estimators = [s for s in args.estimators.split(",") if s]
    for e in args.estimators:
        if e not in ESTIMATORS:
            p.error(f"--estimators: unknown estimator {e!r}; choose from {', '.join(ESTIMATORS)}")
    for part in args.parts:
        if part not in ("loss", "micro_batches"):
            p.error(f"--parts: unknown part {part!r}; choose loss and/or micro_batches")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if any(m < 1 or m > args.accum for m in args.micro_batches):
        p.error(f"--micro-batches {args.micro_batches} must lie in 1..--accum ({args.accum})")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    with cpu_threads(args.threads):
        result: dict[str, Any] = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command_line("bench_hessian", argv),
            "device": machine_name(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "args": dict(vars(args)),
        }
        if "loss" in args.parts:
            result["loss_shape"] = [args.batch, args.seq, args.vocab]
            result["loss"] = bench_loss(args, device)
        if "micro_batches" in args.parts:
            result["micro_batches"] = bench_micro_batches(args, device)
    print_tables(result)
    if args.json:
        print(f"\nwrote {write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
