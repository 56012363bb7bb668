"""The end-of-run summary: ``summary.json`` and the block printed when a run ends.

Built from the run dir's files alone (``metrics.jsonl``, ``config.yaml``, ``checkpoints/``, read
by :mod:`engine.run_dir`), so it describes any run, finished, stopped early or crashed, and the
sweep table can reuse it.
Every value that is missing or non-finite is ``null``: ``summary.json`` must stay valid JSON for
the tools that read it.
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any, Mapping

from data.files import write_text_atomic
from engine.branching import decay_start
from engine.checkpoint import checkpoint_step, list_checkpoints
from engine.errors import HarnessError
from engine.instability import divergence, loss_spikes
from engine.metrics import ConsoleSink
from engine.run_dir import METRICS_FILE, SUMMARY_FILE, RunDirError, read_config, read_metrics


def _finite(value: Any) -> float | int | None:
    """A finite number, or None for anything else ("nan" strings, null, text, bools)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _last(rows: list[dict[str, Any]], key: str) -> tuple[Any, int | None]:
    """The last row's value of ``key`` (finite or None) and that row's step."""
    for row in reversed(rows):
        if key in row:
            return _finite(row[key]), row["step"]
    return None, None


def _status(steps: int | None, max_steps: Any, stop_at: Any, has_metrics: bool) -> str:
    if not has_metrics:
        return "no metrics"
    if isinstance(max_steps, int) and steps is not None and steps >= max_steps:
        return "done"
    if isinstance(stop_at, int) and steps is not None and steps >= stop_at:
        return "stopped"  # train.stop_at_step: a planned pause, resumable
    return "incomplete"  # crashed, killed, or still running


def summarize_run(run_dir: Path, position: Mapping[str, Any] | None = None,
                  status: str | None = None) -> dict[str, Any]:
    """What a run achieved and what it cost, from its files; missing or non-finite values are None.

    Keys: run_dir, optimizer, model, status (done / stopped / incomplete / no metrics, or the
    ``status`` a run that has just ended gives: preempted, failed: disk full), step,
    max_steps, val_loss and val_loss_step (the last evaluation), best_val_loss and
    best_val_loss_step, train_loss, tokens, tokens_hessian, flops, elapsed_s (training wall-clock,
    eval excluded), throughput (tokens per second of elapsed_s), memory_peak_bytes, diverged
    (null, or the step and reason under engine/instability.py's rule), loss_spikes (the steps of
    train-loss spikes under the same module's rule), branch (null, or the parent run and the step a
    cooldown branch started from), checkpoint (the newest), next_commands.

    ``position``: the counters of a run that has just ended (the metrics keys step, tokens,
    tokens_hessian, flops, time/elapsed), newer than its last metrics line when it stopped
    between two log steps (train.stop_at_step).
    """
    run_dir = Path(run_dir)
    try:
        rows = read_metrics(run_dir / METRICS_FILE)
    except RunDirError:  # the summary describes what can be read; the sweep table relies on it
        rows = []
    if position is not None:
        rows.append(dict(position))
    cfg = read_config(run_dir) or {}
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    newest = checkpoints[-1] if checkpoints else None

    # A run stopped at a step with no log line still checkpointed that step.
    ckpt_step = checkpoint_step(newest) if newest else None
    known = [s for s in (rows[-1]["step"] if rows else None, ckpt_step) if s is not None]
    steps = max(known) if known else None

    val_loss, val_step = _last(rows, "val/loss")
    vals = [(v, row["step"]) for row in rows if (v := _finite(row.get("val/loss"))) is not None]
    best_val, best_step = min(vals, key=lambda pair: pair[0]) if vals else (None, None)
    tokens, _ = _last(rows, "tokens")
    elapsed, _ = _last(rows, "time/elapsed")
    peaks = [p for row in rows if (p := _finite(row.get("memory/peak"))) is not None]
    max_steps = _get(cfg, "train.max_steps")
    diverged = divergence(rows)

    return {
        "run_dir": str(run_dir),
        "optimizer": _get(cfg, "optimizer.name"),
        "model": _get(cfg, "model.preset"),
        "status": status or _status(steps, max_steps, _get(cfg, "train.stop_at_step"), bool(rows)),
        "step": steps,
        "max_steps": max_steps if isinstance(max_steps, int) else None,
        "val_loss": val_loss,
        "val_loss_step": val_step,
        "best_val_loss": best_val,
        "best_val_loss_step": best_step,
        "train_loss": _last(rows, "train/loss")[0],
        "tokens": tokens,
        "tokens_hessian": _last(rows, "tokens_hessian")[0],
        "flops": _last(rows, "flops")[0],
        "elapsed_s": elapsed,
        "throughput": tokens / elapsed if tokens is not None and elapsed else None,
        "memory_peak_bytes": max(peaks) if peaks else None,
        "diverged": {"step": diverged.step, "reason": diverged.reason} if diverged else None,
        "loss_spikes": [spike.step for spike in loss_spikes(rows)],
        "branch": _branch(cfg),
        "checkpoint": str(newest) if newest else None,
        "next_commands": next_commands(run_dir, newest),
    }


def _branch(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A cooldown branch's parent run and branch step (engine/branching.py), from its config."""
    parent = _get(cfg, "checkpoint.branch_from")
    if not parent:
        return None
    try:
        step = decay_start(cfg)
    except (HarnessError, KeyError, TypeError):  # a config that could never have branched
        step = None
    return {"from": parent, "step": step}


def next_commands(run_dir: Path, checkpoint: Path | None) -> list[str]:
    """Shell commands to look at the run: compare its curves, and sample from its newest
    checkpoint (sample.py takes the run dir) when there is one."""
    commands = [f"python scripts/compare.py {shlex.quote(str(run_dir))}"]
    if checkpoint is not None:
        commands.append(f"python scripts/sample.py {shlex.quote(str(run_dir))}")
    return commands


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` atomically (temp file, rename); non-finite floats become null."""
    run_dir = Path(run_dir)
    # Sanitised first: a NaN a caller added must not crash the end of a long run; allow_nan=False
    # then guarantees the file is strict JSON whatever slipped through.
    text = json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(run_dir / SUMMARY_FILE, text)


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{prefix}"
    return f"{value:.0f}"


def _loss(value: float | None, step: int | None) -> str:
    return "none" if value is None else f"{value:.4f} at step {step}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _stability(summary: dict[str, Any]) -> str:
    spikes = summary.get("loss_spikes") or []
    text = f"DIVERGED: {summary['diverged']['reason']}" if summary.get("diverged") else "no divergence"
    return text + (f", {len(spikes)} loss spike{'s' if len(spikes) != 1 else ''} (steps "
                   f"{', '.join(map(str, spikes[:5]))}{', ...' if len(spikes) > 5 else ''})"
                   if spikes else ", no loss spikes")


def format_summary(summary: dict[str, Any]) -> str:
    """A short aligned block for the console at the end of a run."""
    s = summary
    steps = "?" if s.get("step") is None else str(s["step"])
    if s.get("max_steps"):
        steps += f"/{s['max_steps']}"
    tokens = _count(s.get("tokens"))
    if s.get("tokens_hessian"):
        tokens += f" (Hessian {_count(s['tokens_hessian'])})"
    flops = "?" if s.get("flops") is None else f"{s['flops']:.2e}"
    speed = "?" if s.get("throughput") is None else f"{s['throughput']:,.0f}"
    rows = [
        ("run", f"{s.get('run_dir')}"),
        ("optimizer", f"{s.get('optimizer') or '?'} on {s.get('model') or '?'}"),
        ("steps", f"{steps} [{s.get('status')}]"),
        ("val loss", f"{_loss(s.get('val_loss'), s.get('val_loss_step'))}"
                     f" (best {_loss(s.get('best_val_loss'), s.get('best_val_loss_step'))})"),
        ("train loss", "none" if s.get("train_loss") is None else f"{s['train_loss']:.4f}"),
        ("tokens", f"{tokens}, {flops} FLOPs"),
        ("time", f"{ConsoleSink.format_duration(s.get('elapsed_s'))} training (eval excluded), "
                 f"{speed} tok/s, peak memory {_bytes(s.get('memory_peak_bytes'))}"),
        ("stability", _stability(s)),
        *([("branch", f"from {s['branch']['from']} at step {s['branch']['step']}")]
          if s.get("branch") else []),
        ("checkpoint", s.get("checkpoint") or "none"),
    ]
    rows += [("next" if i == 0 else "", cmd) for i, cmd in enumerate(s.get("next_commands") or [])]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {text}" for label, text in rows)
