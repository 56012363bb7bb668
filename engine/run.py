"""One training run: checks, the trainer, resume, the run directory's files, the loop, the summary.

:func:`run` is what ``train.py`` calls inside Hydra; it returns the run's summary, whose final
validation loss Hydra sweepers (Optuna) minimise.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from engine.build import build_trainer, resolve_dtype
from engine.checkpoint import load_resume_checkpoint
from engine.config_check import check_config
from engine.console_log import tee_console
from engine.distributed import DistEnv, broadcast_object, setup_distributed, teardown_distributed
from engine.errors import HarnessError
from engine.metrics import ConsoleSink, JsonlSink, MetricsLogger, WandbSink
from engine.resume import check_resume_config
from engine.summary import format_summary, summarize_run, write_summary


def _sweep_group(cfg: DictConfig) -> str | None:
    if cfg.wandb.group:
        return cfg.wandb.group
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).name
    except Exception:  # not under Hydra (tests calling run() directly)
        pass
    return None


def run(cfg: DictConfig, run_dir: str | os.PathLike,
        on_start: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train as configured; returns the run's summary (``val_loss``, ``step``, ``run_dir``, ...).

    ``on_start(run_dir)`` is called on rank 0 once every check has passed, just before the run
    dir's files are written: a refused run writes nothing.
    """
    check_config(cfg)
    env = setup_distributed(cfg.device)
    logger = MetricsLogger([])
    try:
        with contextlib.ExitStack() as console:
            try:
                return _run(cfg, Path(run_dir), env, logger, on_start, console)
            finally:
                logger.close()  # inside the console copy: W&B's closing lines are kept too
    finally:
        teardown_distributed()


def _run(cfg: DictConfig, run_dir: Path, env: DistEnv, logger: MetricsLogger,
         on_start: Callable[[Path], None] | None, console: contextlib.ExitStack) -> dict[str, Any]:
    if cfg.wandb.mode not in ("online", "offline", "disabled"):
        raise HarnessError(f"wandb.mode={cfg.wandb.mode!r}; choose online, offline or disabled.")
    if cfg.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise HarnessError(f"wandb.mode={cfg.wandb.mode} needs the wandb package: pip install -e "
                           f"'.[wandb]', or run with wandb.mode=disabled.")
    # Rank 0's run dir wins, so every rank reads and writes the same place whatever it composed.
    run_dir = Path(broadcast_object(str(run_dir), env))
    trainer = build_trainer(cfg, run_dir, env)
    resolved = trainer.checkpointer.extra["config"]

    # Resume before touching the run dir's files: a refused (mismatched) checkpoint must leave
    # its run's config and metrics as they were. Messages wait until train.log is open.
    notes: list[str] = []
    resumed = load_resume_checkpoint(cfg.checkpoint.resume, run_dir, warn=notes.append)
    if resumed is not None:
        resume_path, state = resumed
        trainer.checkpointer.restore(trainer, state)
        changes = check_resume_config(state.get("config", {}), resolved, source=str(resume_path),
                                      allow=bool(cfg.checkpoint.get("allow_config_change")))
        notes += [f"WARNING: resuming with {key} changed from {old!r} to {new!r} "
                  f"(checkpoint.allow_config_change=true)" for key, old, new in changes]
        trainer.checkpointer.extra["wandb_id"] = state.get("wandb_id")
        notes.append(f"resumed from {resume_path} at step {trainer.step}")

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        console.enter_context(tee_console(run_dir / "train.log"))
        for note in notes:
            print(note, flush=True)
        if on_start is not None:
            on_start(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        _open_sinks(cfg, run_dir, trainer, logger, resolved, resumed=resumed is not None)
        plan = trainer.plan
        print(f"run dir {run_dir} | {trainer.optim.name} | "
              f"{trainer.raw_model.num_params() / 1e6:.2f}M params | {plan.global_batch_tokens} "
              f"tokens/step = {plan.micro_batch_size} x {plan.block_size} x {plan.accum_steps} "
              f"accum x {env.world_size} ranks | {resolve_dtype(cfg.dtype, env.device)} on "
              f"{env.device}", flush=True)
    trainer.logger = logger
    trainer.fit()
    if not env.is_main:
        val = trainer.last_val_loss
        return {"val_loss": None if math.isnan(val) else val, "step": trainer.step,
                "run_dir": str(run_dir)}
    logger.close()  # flush metrics.jsonl before the summary reads it
    summary = summarize_run(run_dir, trainer.position())
    write_summary(run_dir, summary)
    print(format_summary(summary), flush=True)
    return summary


def _open_sinks(cfg: DictConfig, run_dir: Path, trainer, logger: MetricsLogger,
                resolved: dict[str, Any], resumed: bool) -> None:
    """metrics.jsonl (cut back to the resumed step), the console, and W&B when enabled."""
    logger.sinks.append(JsonlSink(run_dir / "metrics.jsonl",
                                  truncate_after_step=trainer.step if resumed else None))
    logger.sinks.append(ConsoleSink(total_steps=trainer.settings.max_steps,
                                    start_step=trainer.step))
    if cfg.wandb.mode != "disabled":
        extra = trainer.checkpointer.extra
        sink = WandbSink(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.entity, _sweep_group(cfg),
                         cfg.wandb.name or run_dir.name, resolved, run_dir, extra["wandb_id"])
        extra["wandb_id"] = sink.run_id
        logger.sinks.append(sink)
