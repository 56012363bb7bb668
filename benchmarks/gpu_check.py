"""The GPU evidence pack: one command, at most 8 minutes, at most 8 result files.

    bash benchmarks/gpu_check.sh [OUT]              # on the GPU machine (OUT: $OUT, else results/gpu-check)
    python -m benchmarks.gpu_check --dry-run        # anywhere: every phase's commands and time cap

Made for a short, bare, offline GPU lease (one H100/H200, Python with a CUDA build of torch, no
hydra-core / omegaconf, no network): `benchmarks/gpu_check.sh` installs the wheels carried in
`gpu-wheels/` (see that script for the one-line download on a CPU machine), then this driver runs
the phases below in order of importance, each under its own time cap so a slow phase cannot eat
the others, and rewrites its results after every phase, so a run cut short still says something:

1. `gpu`-marked tests; a CUDA smoke of train.py (gpt2-small, bf16, compile=true, every optimizer:
   it must run and write finite metrics);
2. optimizer step time at GPT-2-small's 124M parameters (fused SophiaG vs torch's fused AdamW,
   Lion, SophiaH, Muon; telemetry computed in the same step);
3. training throughput (gpt2-small, bf16 + compile, k = 10): AdamW, SophiaG with the full and a
   1/10 Hessian batch, and the plain nanoGPT loop: tokens/s, ratio to AdamW, MFU, peak memory;
4. if time remains, a mini study: gpt2-mini (~30M parameters) on GPT-2 tokens, AdamW vs SophiaG vs
   Muon at their default settings for the same token budget, with compare.py's figures.

Files in OUT: summary.txt (the tables, the targets judged, how long each phase took),
results.json (every number, the device facts and every command), log.txt (all output), and the
mini study's loss.png / diagnostics.png / speedup.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the whole pack, setup included (gpu_check.sh's setup is given SETUP_S of it)
SETUP_S = 50
DATA = "prepared/stdlib-gpt2"
WORK = "results/gpu-check-work"  # run dirs and JSON of the phases (not returned: OUT holds copies)

# Targets of docs/benchmarks.md, judged in the summary.
TARGET_OPTIM_FUSED = 0.9  # fused SophiaG step time / torch fused AdamW step time, at most
TARGET_TRAIN_FULL = 0.90  # SophiaG tokens/s with the full Hessian batch / AdamW's, at least
TARGET_TRAIN_TENTH = 0.95  # ... with 1/10 of the micro-batches feeding the Hessian, at least

SMOKE = ["model=gpt2-small", "data=prepared", f"data.dir={DATA}", "device=cuda",
         "dtype=bfloat16", "compile=true", "train.max_steps=10", "train.global_batch_tokens=16384",
         "train.micro_batch_size=16", "train.warmup_steps=2", "train.log_interval=5",
         "train.eval_interval=5", "train.eval_batches=2", "checkpoint.interval=0"]
MINI = ["model=gpt2-mini", "data=prepared", f"data.dir={DATA}", "device=cuda", "dtype=bfloat16",
        "train.max_steps=200", "train.global_batch_tokens=65536", "train.micro_batch_size=32",
        "train.warmup_steps=20", "train.log_interval=20", "train.eval_interval=40",
        "train.eval_batches=10", "checkpoint.interval=0"]


@dataclass
class Phase:
    """A named list of commands run one after another under one time cap (seconds)."""

    name: str
    cap_s: int
    commands: list[list[str]]
    optional: bool = False  # run only if its whole cap still fits in the budget
    results: dict = field(default_factory=dict)


def phases(work: str = WORK) -> list[Phase]:
    """Every phase and its commands (paths relative to the repository root)."""
    from engine.optimizers import entries

    py = "python"
    fused = [name for name, entry in entries().items() if "fused" in entry.paths]
    return [
        Phase("1a gpu tests", 55, [[py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]]),
        Phase("1b train.py smoke", 120, [[
            py, "train.py", "-m", f"optimizer={','.join(entries())}", *SMOKE,
            f"hydra.sweep.dir={work}/smoke"]]),
        Phase("2 optimizer step", 40, [[
            py, "-m", "benchmarks.bench_optim", "--model", "gpt2-small", "--device", "cuda",
            "--optimizers", ",".join(fused), "--paths", "fused", "--access-floor",
            "--noise-check",
            "--repeats", "20", "--steps", "5", "--warmup", "3", "--copy-mb", "2048",
            "--json", f"{work}/bench_optim.json"]]),
        Phase("3 training throughput", 150, [[
            py, "-m", "benchmarks.bench_train", "--model", "gpt2-small", "--device", "cuda",
            "--dtype", "bfloat16", "--compile", "--data", DATA, "--batch-tokens", "163840",
            "--micro-batch-size", "16", "--steps", "10", "--warmup", "10", "--repeats", "1",
            "--k", "10", "--optimizers", "adamw,sophia", "--hessian-micro-batches", "all,1/10",
            "--nanogpt-baseline", "--json", f"{work}/bench_train.json"]]),
        Phase("4 mini study", 65, [
            [py, "train.py", "-m", "optimizer=adamw,sophia,muon", *MINI,
             f"hydra.sweep.dir={work}/mini"],
            [py, "scripts/compare.py", f"{work}/mini", "--out", f"{work}/mini_compare"],
        ], optional=True),
    ]


def device_facts() -> dict:
    """Card, driver, torch and CUDA versions, date: what the numbers were measured on."""
    facts: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "python": sys.version.split()[0]}
    try:
        import torch

        facts.update(torch=torch.__version__, cuda=torch.version.cuda,
                     cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            facts["card"] = torch.cuda.get_device_name(0)
    except ImportError:
        facts["torch"] = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True)
        facts["nvidia_smi"] = out.stdout.strip()
    return facts


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _optimizer_name(job: Path) -> str:
    try:
        import yaml

        return yaml.safe_load((job / "config.yaml").read_text())["optimizer"]["name"]
    except (OSError, ImportError, KeyError, TypeError):
        return job.name


def _smoke_results(sweep: Path) -> dict:
    """Per optimizer: the last step reached and whether every logged loss is finite."""
    out = {}
    for job in sorted(p for p in sweep.glob("*") if p.is_dir() and p.name.isdigit()):
        rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()] \
            if (job / "metrics.jsonl").exists() else []
        name = _optimizer_name(job)
        losses = [r[k] for r in rows for k in ("train/loss", "val/loss") if k in r]
        out[name] = {"last_step": rows[-1]["step"] if rows else None,
                     "finite": bool(losses) and all(isinstance(v, float) for v in losses),
                     "throughput": next((r["throughput"] for r in reversed(rows)
                                         if r.get("throughput")), None)}
    return out


def collect(phase: Phase, work: Path) -> dict:
    """The numbers a phase produced, read from the files its commands wrote."""
    if phase.name.startswith("1b"):
        return {"smoke": _smoke_results(work / "smoke")}
    if phase.name.startswith("2"):
        return {"bench_optim": _read_json(work / "bench_optim.json")}
    if phase.name.startswith("3"):
        return {"bench_train": _read_json(work / "bench_train.json")}
    if phase.name.startswith("4"):
        return {"mini": _smoke_results(work / "mini"),
                "speedup": _read_json(work / "mini_compare" / "speedup.json")}
    return {}


def judge(results: dict) -> list[str]:
    """The targets, each as one line: measured value, target, met or not."""
    from engine.optimizers import entries

    lines = []
    optim = (results.get("2 optimizer step") or {}).get("bench_optim") or {}
    for model in optim.get("models", []):
        rows = {(r["optimizer"], r["path"]): r for r in model["rows"]}
        adamw = rows.get(("adamw", "fused"))
        # the Sophias first: their step is what the target is about
        for name in sorted((n for n, e in entries().items() if e.compiled),
                           key=lambda n: entries()[n].hessian is None):
            ours = rows.get((name, "fused"))
            if adamw and ours:
                ratio = ours["ms_per_step"] / adamw["ms_per_step"]
                verdict = "met" if ratio <= TARGET_OPTIM_FUSED else "NOT met"
                lines.append(f"{model['name']}: fused {name} step = {ratio:.2f}x torch fused AdamW "
                             f"(target <= {TARGET_OPTIM_FUSED}x: {verdict})")
        shares = []
        for name in entries():
            row = rows.get((name, "fused")) or {}
            if row.get("host_ms_per_step") is not None and row["ms_per_step"] > 0:
                shares.append(f"{name} {row['host_ms_per_step'] / row['ms_per_step']:.2f}")
        if shares:
            lines.append(f"{model['name']}: host share of each fused step's time: "
                         f"{', '.join(shares)} (near 1.0: the step waits on Python, guards and "
                         "kernel launches, not on memory)")
        twin = rows.get(("adamw", "fused-twin"))
        if adamw and twin:
            twin_ratio = twin["ms_per_step"] / adamw["ms_per_step"]
            lines.append(f"{model['name']}: noise check: a second, identical torch fused AdamW "
                         f"took {twin_ratio:.2f}x the first (ratios this close to 1.0 are within "
                         "this run's noise)")
        floors = {r["path"]: r["ms_per_step"] for r in model["rows"] if r["optimizer"] == "floor"}
        if "4R/2W" in floors and "4R/3W" in floors:
            lines.append(f"{model['name']}: memory floor of Sophia's access pattern = "
                         f"{floors['4R/2W'] / floors['4R/3W']:.2f}x AdamW's (what this device "
                         "allows; not a target)")
    train = (results.get("3 training throughput") or {}).get("bench_train") or {}
    accum = (train.get("settings") or {}).get("accum_steps")
    for row in train.get("rows", []):
        if row["name"] == "sophia" and row.get("ratio_vs_adamw") is not None:
            ratio, label = row["ratio_vs_adamw"], row["optimizer"]
            full = row.get("hessian_micro_batches") == accum
            target = TARGET_TRAIN_FULL if full else TARGET_TRAIN_TENTH
            verdict = "met" if ratio >= target else "NOT met"
            lines.append(f"training: {label} = {ratio:.3f}x AdamW tokens/s "
                         f"(target >= {target}x: {verdict})")
    return lines


def summary_text(results: dict, facts: dict, timings: dict) -> str:
    lines = [f"GPU check, {facts.get('date')}: {facts.get('card', 'no CUDA card')} | torch "
             f"{facts.get('torch')} | CUDA {facts.get('cuda')} | {facts.get('nvidia_smi', '')}", ""]
    lines += ["phase times (s): " + ", ".join(f"{k} {v['seconds']:.0f}/{v['cap_s']} "
                                               f"({v['status']})" for k, v in timings.items()), ""]
    smoke = (results.get("1b train.py smoke") or {}).get("smoke") or {}
    for name, r in smoke.items():
        lines.append(f"smoke {name:<8} last step {r['last_step']}, finite {r['finite']}, "
                     f"{r['throughput'] or 0:,.0f} tok/s")
    lines += ["", "targets:"] + (judge(results) or ["(no phase with a target completed)"])
    mini = (results.get("4 mini study") or {}).get("mini") or {}
    if mini:
        lines += ["", "mini study (gpt2-mini, same tokens): " + ", ".join(
            f"{k} {v['last_step']} steps" for k, v in mini.items())]
    return "\n".join(lines) + "\n"


def run(out: Path, budget_s: float, log) -> int:
    work = REPO / WORK
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    facts, results, timings = device_facts(), {}, {}
    start = time.monotonic()
    all_phases = phases()

    def write() -> None:
        payload = {"device": facts, "budget_s": budget_s, "timings": timings, "results": results,
                   "commands": {p.name: [shlex.join(c) for c in p.commands] for p in all_phases}}
        (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
        (out / "summary.txt").write_text(summary_text(results, facts, timings))

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    for phase in all_phases:
        left = budget_s - (time.monotonic() - start)
        cap = min(phase.cap_s, left)
        if phase.optional and cap < phase.cap_s or cap < 10:
            timings[phase.name] = {"seconds": 0.0, "cap_s": phase.cap_s, "status": "skipped: no time"}
            write()
            continue
        t0, status = time.monotonic(), "ok"
        log(f"\n===== {phase.name} (cap {cap:.0f} s) =====\n")
        for cmd in phase.commands:
            remaining = cap - (time.monotonic() - t0)
            log(f"$ {shlex.join(cmd)}\n")
            try:
                done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=max(1.0, remaining))
                log(done.stdout[-20000:] + done.stderr[-20000:])
                if done.returncode != 0:
                    status = f"failed (exit {done.returncode})"
                    break
            except subprocess.TimeoutExpired as err:
                log(f"{(err.stdout or b'')[-20000:]!r}\n")
                status = "timed out"
                break
        timings[phase.name] = {"seconds": time.monotonic() - t0, "cap_s": phase.cap_s,
                               "status": status}
        results[phase.name] = collect(phase, work)
        write()
    for name in ("loss.png", "diagnostics.png", "speedup.json"):
        src = work / "mini_compare" / name
        if src.exists():
            shutil.copy(src, out / f"mini_{name}")
    write()
    log(summary_text(results, facts, timings))
    return 0 if all(t["status"] in ("ok", "skipped: no time") for t in timings.values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT") or "results/gpu-check",
                    help="results folder (default: $OUT when set, else results/gpu-check)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print every phase's commands and time cap; needs no GPU")
    ap.add_argument("--budget", type=float, default=BUDGET_S - SETUP_S,
                    help=f"seconds for all phases (default {BUDGET_S - SETUP_S}: the pack's "
                         f"{BUDGET_S} s less gpu_check.sh's setup)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        total = SETUP_S
        print(f"setup (gpu_check.sh): cap {SETUP_S} s")
        for phase in phases():
            total += phase.cap_s
            print(f"{phase.name}: cap {phase.cap_s} s{' (if time remains)' if phase.optional else ''}")
            for cmd in phase.commands:
                print(f"  $ {shlex.join(cmd)}")
        print(f"total of the caps: {total} s (budget {BUDGET_S} s)")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; run it on a GPU machine "
              "(--dry-run prints the plan anywhere).", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a") as log_file:
        def log(text: str) -> None:
            log_file.write(text)
            log_file.flush()
            sys.stdout.write(text[-4000:])
            sys.stdout.flush()
        return run(out, args.budget, log)


if __name__ == "__main__":
    sys.exit(main())
