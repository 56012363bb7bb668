"""Metric sinks: the console (rank 0), ``metrics.jsonl`` (always) and W&B (when enabled).

The trainer builds one flat dict per logged step with the keys listed in docs/architecture.md
and hands it to :class:`MetricsLogger`, which fans it out. Only rank 0 ever holds sinks.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Protocol


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
    """Appends one JSON object per record; flushes each line so a crash loses at most one record."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # On resume, drop lines logged after the checkpoint (they will be logged again) and a
            # half-written last line left by a killed process.
            kept = [line for line in self.path.read_text().splitlines()
                    if (row := _parse(line)) is not None and row.get("step", -1) <= truncate_after_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)

    def log(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class ConsoleSink:
    """One compact line per record."""

    KEYS = (("train/loss", "loss {:.4f}"), ("val/loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
            ("grad/norm", "gnorm {:.2f}"), ("sophia/win_rate", "win {:.2f}"),
            ("throughput", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}"))

    def __init__(self, print_fn=print):
        self.print = print_fn

    def log(self, record: Mapping[str, Any]) -> None:
        parts = [f"step {record['step']:>6}"]
        for key, fmt in self.KEYS:
            value = _clean(record.get(key))
            if isinstance(value, (int, float)):
                parts.append(fmt.format(value))
        if "time/elapsed" in record:
            parts.append(f"{_clean(record['time/elapsed']):.1f}s")
        self.print(" | ".join(parts), flush=True)

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
