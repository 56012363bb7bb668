"""Metrics: the record of a logged step, and its sinks: the console (rank 0), ``metrics.jsonl``
(always) and W&B (when enabled).

:class:`StepStats` builds one flat dict per logged step with the keys of docs/metrics.md;
:class:`MetricsLogger` fans it out. Only rank 0 ever holds sinks.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch


# Optimizer telemetry names -> metric keys (docs/metrics.md).
TELEMETRY_KEYS = {"clip_frac": "sophia/clip_frac", "win_rate": "sophia/win_rate",
                  "hessian_l1": "hessian/l1", "hessian_l2": "hessian/l2",
                  "update_rms": "optim/update_rms"}


def memory_peak(device: torch.device) -> int:
    """CUDA peak allocated bytes, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StepStats:
    """The last step's loss and gradient norm and the count of clipped steps, kept on the device
    so that training never waits for the host; read into a metrics record on log steps only."""

    def __init__(self, device: torch.device, grad_clip: float):
        self.grad_clip = grad_clip
        self.clipped = torch.zeros((), device=device)
        self.loss = torch.zeros((), device=device)
        self.gnorm = torch.zeros((), device=device)

    def observe(self, loss: torch.Tensor, gnorm: torch.Tensor) -> None:
        if self.grad_clip > 0:
            self.clipped += (gnorm > self.grad_clip).float()
        self.loss, self.gnorm = loss, gnorm

    @property
    def clipped_steps(self) -> int:
        return int(self.clipped.item())

    @clipped_steps.setter
    def clipped_steps(self, count: int) -> None:
        self.clipped.fill_(count)

    def record(self, position: Mapping[str, Any], *, env: Any, seconds: float, tokens: int,
               flops: float, lr: float, peak_flops: float | None, hessian_seconds: float,
               telemetry: Mapping[str, Any], skipped_steps: int) -> dict[str, Any]:
        """The metrics line of a log step: ``tokens``/``flops``/``seconds`` are those of the last
        log interval (for throughput and MFU), ``position`` the cumulative counters."""
        from engine.distributed import all_reduce_mean

        loss = all_reduce_mean(self.loss.clone(), env).item()
        gnorm = self.gnorm.item()
        rec = {**position, "train/loss": loss, "lr": lr,
               "throughput": tokens / seconds if seconds > 0 else None,
               "mfu": (flops / seconds / (peak_flops * env.world_size)
                       if peak_flops and seconds > 0 else None),
               "grad/norm": gnorm, "grad/clipped": int(self.grad_clip > 0 and gnorm > self.grad_clip),
               "grad/clip_rate": self.clipped_steps / max(1, position["step"]),
               "time/hessian": hessian_seconds, "memory/peak": memory_peak(env.device)}
        for key, value in telemetry.items():
            rec[TELEMETRY_KEYS.get(key, f"optim/{key}")] = value.item()
        if skipped_steps:
            rec["nonfinite/skipped"] = skipped_steps
        return rec


class MetricsSink(Protocol):
    def log(self, record: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors to Python numbers, non-finite floats kept as strings JSON can hold."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": json.dumps would write invalid JSON otherwise
    return value


def _parse(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


class JsonlSink:
    """Appends one JSON object per record; flushes each line so a crash loses at most one record.

    ``truncate_after_step``: a resumed run's step; the rows after it are dropped first. ``fresh``:
    a run starting from step 0 empties the file first, so that the rows of an earlier attempt
    that saved no checkpoint never mix with its own.
    """

    def __init__(self, path: Path, truncate_after_step: int | None = None, fresh: bool = False):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # On resume, drop lines logged after the checkpoint (they will be logged again) and a
            # half-written last line left by a killed process.
            kept = [line for line in self.path.read_text().splitlines()
                    if (row := _parse(line)) is not None and row.get("step", -1) <= truncate_after_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "w" if fresh else "a", buffering=1)

    def log(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class ConsoleSink:
    """One compact line per record; with a known total, also progress and an ETA.

    The ETA comes from wall-clock time (``clock``) between this sink's records, not from the
    records' ``time/elapsed``: that counter leaves out evaluation and checkpoint time, which the
    user waits for all the same, so an ETA built on it would come out short by the eval share. The rate
    is measured from the first record this sink sees, so the steps of an earlier invocation (on
    resume) and one-off start-up costs (compilation, data preparation, the first eval) do not skew
    it; only the first line, before any interval is measured, falls back to the time since the sink
    was made at ``start_step``.
    """

    KEYS = (("train/loss", "loss {:.4f}"), ("val/loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
            ("grad/norm", "gnorm {:.2f}"), ("sophia/win_rate", "win {:.2f}"),
            ("throughput", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}"))

    def __init__(self, print_fn: Callable[..., None] = print, total_steps: int | None = None,
                 start_step: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        """``total_steps``: the step the run ends at (None: no progress or ETA); ``start_step``:
        the step this invocation started or resumed at."""
        self.print = print_fn
        self.total_steps = total_steps
        self.clock = clock
        self._start = (start_step, clock())
        self._anchor: tuple[int, float] | None = None  # (step, time) of the first record seen
        self._last_step = start_step

    def log(self, record: Mapping[str, Any]) -> None:
        now = self.clock()
        step = int(record["step"])
        parts = [self._progress(step)]
        for key, fmt in self.KEYS:
            value = _clean(record.get(key))
            if isinstance(value, (int, float)):
                parts.append(fmt.format(value))
            elif isinstance(value, str):  # a non-finite value ("nan") is news: show it
                parts.append(fmt[:fmt.index("{")] + value + fmt[fmt.index("}") + 1:])
        elapsed = _clean(record.get("time/elapsed"))
        if isinstance(elapsed, (int, float)):
            shown = f"{elapsed:.1f}s" if elapsed < 60 else self.format_duration(elapsed)
            parts.append(f"{shown} elapsed")
        eta = self._eta(step, now)
        if eta is not None:
            parts.append(f"ETA {self.format_duration(eta)}")
        self.print(" | ".join(parts), flush=True)

    def _progress(self, step: int) -> str:
        if not self.total_steps:
            return f"step {step:>6}"
        pct = int(100 * step / self.total_steps)  # floored: 100% only once the last step is done
        return f"step {step:>6}/{self.total_steps} ({pct}%)"

    def _eta(self, step: int, now: float) -> float | None:
        """Seconds left at this invocation's measured rate; None while no rate is known."""
        if self._anchor is None or step < self._last_step:
            # First record, or a rollback moved the step back: measure afresh from here.
            first = self._anchor is None
            self._anchor = (step, now)
            base = self._start if first else None
        else:
            base = self._anchor
        self._last_step = step
        if not self.total_steps or step >= self.total_steps or base is None:
            return None
        done, seconds = step - base[0], now - base[1]
        if done <= 0 or seconds <= 0:
            return None
        return (self.total_steps - step) * seconds / done

    @staticmethod
    def format_duration(seconds: float) -> str:
        """Human-readable duration: ``4.2s``, ``45s``, ``3m05s``, ``1h02m``; ``?`` when unknown."""
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
            return "?"
        if seconds < 9.95:  # short runs and ETAs: whole seconds would round most of them to 0s
            return f"{seconds:.1f}s"
        total = int(round(seconds))
        if total < 60:
            return f"{total}s"
        if total < 3600:
            return f"{total // 60}m{total % 60:02d}s"
        minutes = int(round(seconds / 60))
        return f"{minutes // 60}h{minutes % 60:02d}m"

    def close(self) -> None:
        pass


class WandbSink:
    """One W&B run per job: resumed by id after a checkpoint restart, finished on close."""

    def __init__(self, mode: str, project: str, entity: str | None, group: str | None,
                 name: str | None, config: Mapping[str, Any], run_dir: Path, run_id: str | None):
        try:
            import wandb
        except ImportError as err:
            from engine.errors import HarnessError

            raise HarnessError(f"wandb.mode={mode} needs the wandb package: pip install -e "
                               f"'.[wandb]', or run with wandb.mode=disabled.") from err
        self._wandb = wandb
        self.run = wandb.init(mode=mode, project=project, entity=entity, group=group, name=name,
                              config=dict(config), dir=str(run_dir), id=run_id, resume="allow",
                              reinit="finish_previous")
        # Tokens and wall-clock are offered as alternative x-axes for every chart.
        for axis in ("tokens", "flops", "time/elapsed"):
            self.run.define_metric(axis)
        self.run.define_metric("*", step_metric="step")

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record: Mapping[str, Any]) -> None:
        self.run.log({k: _clean(v) for k, v in record.items() if v is not None})

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Fans records out to sinks; closing is idempotent so it can sit in a ``finally``."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = sinks

    def log(self, record: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
